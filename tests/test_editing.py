"""Image to image (SDEdit) and negative prompts: the diffusion function, the stages, the orchestrator and
the CLI."""
import pytest
import torch

from bundle_helpers import DECODER, seeded_stage
from cascade.diffusion import NoiseSchedule, sample, sample_from_image
from cascade.errors import UserError
from test_diffusion_sampling import gaussian_oracle


# ---------------------------------------------------------------- sample_from_image
def test_strength_zero_keeps_the_image_and_one_is_plain_sampling():
    s = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, generator=g), torch.randn(64, generator=g)
    d = gaussian_oracle(s)
    assert torch.equal(sample_from_image(d, x0, 0.0, schedule=s, sampler="ddim", steps=10, noise=noise), x0)
    full = sample_from_image(d, x0, 1.0, schedule=s, sampler="ddim", steps=10, noise=noise)
    assert torch.equal(full, sample(d, x0.shape, schedule=s, sampler="ddim", steps=10, x_T=noise))
    with pytest.raises(UserError, match="strength must be between 0 and 1"):
        sample_from_image(d, x0, 1.5, schedule=s, sampler="ddim", steps=10, noise=noise)


@pytest.mark.parametrize("sampler,tolerance", [("ddim", 0.1), ("dpmpp", 0.05), ("heun", 0.05)])
def test_img2img_lands_where_the_exact_ode_from_the_noised_image_does(sampler, tolerance):
    """With the Gaussian oracle (data N(mu, sd^2)) the probability-flow ODE from x_t0 ends at
    mu + sd (x_t0 - a mu) / sqrt(a^2 sd^2 + 1 - a^2), a = sqrt(alpha_bar_t0); from an image far out at 3.0
    a low strength keeps it and the mean moves towards mu as the strength grows."""
    from test_diffusion_sampling import MU, SD

    s = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.full((2000,), 3.0, dtype=torch.float64), torch.randn(2000, generator=g, dtype=torch.float64)
    d = gaussian_oracle(s)
    means = []
    for strength in (0.05, 0.3, 0.6, 0.95):
        out = sample_from_image(d, x0, strength, schedule=s, sampler=sampler, steps=50, noise=noise)
        a = s.alphas_cumprod[round(strength * 999)].item() ** 0.5
        exact = MU + SD * (a * x0 + (1 - a * a) ** 0.5 * noise - a * MU) / (a * a * SD**2 + 1 - a * a) ** 0.5
        assert (out - exact).abs().max().item() < tolerance, (strength, sampler)  # DDIM: first order
        means.append(out.mean().item())
    assert means[0] == pytest.approx(3.0, abs=0.1) and means == sorted(means, reverse=True)


@pytest.mark.parametrize("strength,t_min", [(0.6, 0), (0.6, 200), (0.6, 599), (0.1, 200), (1.0, 200)])
def test_img2img_with_t_min_calls_back_as_often_as_image_steps_says_and_stops_at_t_min(strength, t_min):
    """What `image_steps` counts (the pipeline's progress bar) is what runs; the last step is at t_min, or
    where the image was noised to when that is lower (one estimate from there)."""
    from cascade.diffusion.sampling import image_steps

    s = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(2)
    x0, noise, seen, steps = torch.randn(64, generator=g), torch.randn(64, generator=g), [], []
    oracle = gaussian_oracle(s)
    sample_from_image(lambda x, t: seen.append(int(t[0])) or oracle(x, t), x0, strength, schedule=s,
                      sampler="ddim", steps=20, noise=noise, t_min=t_min, callback=steps.append)
    assert len(steps) == image_steps(1000, 20, strength, t_min) == len(seen)
    assert seen[-1] == min(t_min, round(strength * 999))


# ---------------------------------------------------------------- the decoder
def _alive(stage):
    """The stage with every weight nudged at random: a fresh one's zero-initialised output layers would
    make its output ignore the conditioning, and these tests need it to depend on it."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return stage


def _decoder_inputs(b=2):
    g = torch.Generator().manual_seed(0)
    cond = {"clip_image": torch.nn.functional.normalize(torch.randn(b, 32, generator=g), dim=-1),
            "clip_tokens": torch.randn(b, 5, 384, generator=g), "clip_mask": torch.ones(b, 5, dtype=torch.bool)}
    return cond, torch.rand(b, 3, 64, 64, generator=g) * 2 - 1


def test_decoder_img2img_strength_zero_and_one():
    stage = seeded_stage("decoder", **DECODER, steps=3)
    cond, image = _decoder_inputs()
    assert torch.equal(stage.sample(cond, init=image, strength=0.0, generator=torch.Generator().manual_seed(4)),
                       image.clamp(-1, 1))
    plain = stage.sample(cond, guidance=2.0, generator=torch.Generator().manual_seed(4))
    full = stage.sample(cond, guidance=2.0, init=image, strength=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(plain, full)
    half = stage.sample(cond, guidance=2.0, init=image, strength=0.5, generator=torch.Generator().manual_seed(4))
    assert half.shape == image.shape and not torch.equal(half, plain)


def test_a_negative_equal_to_the_conditioning_cancels_guidance():
    """eps_u + w (eps_c - eps_u) with eps_u = eps_c is the conditional model: guidance against the
    prompt's own conditioning samples what guidance 1 samples (deterministic DDIM, same x_T)."""
    stage = _alive(seeded_stage("decoder", **DECODER, steps=3))
    cond, _ = _decoder_inputs()
    noise = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    plain = stage.sample(cond, guidance=1.0, noise=noise, sampler="ddim")
    against_itself = stage.sample(cond, guidance=4.0, noise=noise, sampler="ddim", negative=cond)
    torch.testing.assert_close(against_itself, plain, rtol=1e-4, atol=1e-4)
    other = {**cond, "clip_image": cond["clip_image"].flip(0)}
    assert not torch.allclose(stage.sample(cond, guidance=4.0, noise=noise, sampler="ddim", negative=other), plain,
                              atol=1e-3)

    prior = _alive(seeded_stage("prior", embed_dim=32, token_dim=384, max_text_len=16, width=32, depth=1, heads=2,
                                steps=3))
    g = torch.Generator().manual_seed(5)
    text = {"clip_text": torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1),
            "clip_tokens": torch.randn(2, 16, 384, generator=g), "clip_mask": torch.ones(2, 16, dtype=torch.bool)}
    x_T = torch.randn(2, 32, generator=g)
    plain = prior.sample(text, guidance=1.0, x_T=x_T, sampler="ddim", candidates=1)
    guided = dict(guidance=4.0, x_T=x_T, sampler="ddim", candidates=1)
    torch.testing.assert_close(prior.sample(text, negative=text, **guided), plain, rtol=1e-4, atol=1e-4)
    other = {**text, "clip_text": text["clip_text"].flip(0)}
    assert not torch.allclose(prior.sample(text, negative=other, **guided), plain, atol=1e-3)


# ---------------------------------------------------------------- the orchestrator and the CLI
def test_cascade_img2img_keeps_the_image_at_zero_and_generates_at_one(bundle):
    from cascade.pipeline import Cascade

    cascade = Cascade.from_bundle(bundle)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    kept = cascade.img2img(image, "a red circle", strength=0.0, num_images=2, seed=1, until="sr256")
    assert torch.equal(kept.images["decoder"], image.expand(2, -1, -1, -1))
    assert kept.images["sr256"].shape == (2, 3, 256, 256)
    redrawn = cascade.img2img(image, "a red circle", strength=1.0, num_images=2, seed=1, until="sr256")
    made = cascade.generate(["a red circle"] * 2, seed=1, until="sr256")
    for name in ("decoder", "sr256"):
        assert torch.equal(redrawn.images[name], made.images[name])
    with pytest.raises(UserError, match="3x64x64"):
        cascade.img2img(torch.zeros(3, 32, 32), "a red circle", strength=0.5, until="decoder")
    reports = []
    cascade.img2img(image, "a red circle", strength=0.5, seed=1, until="decoder",
                    progress=lambda stage, done, total: reports.append((stage, done, total)))
    decoder = [r for r in reports if r[0] == "decoder"]
    assert decoder[-1] == ("decoder", 2, 2)  # half of the config's 4 steps, and the bar ends full


def test_a_negative_prompt_changes_what_generate_and_vary_make(bundle):
    from cascade.pipeline import Cascade

    cascade = Cascade.from_bundle(bundle)
    for name in ("prior", "decoder"):
        _alive(cascade.stages[name])  # the small bundle's fresh output layers would ignore any conditioning
    plain = cascade.generate(["a red circle"], seed=0, until="decoder")
    steered = cascade.generate(["a red circle"], seed=0, until="decoder", negative_prompt="red")
    assert not torch.equal(plain.images["decoder"], steered.images["decoder"])
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = cascade.vary(image, num_images=2, seed=0, until="decoder")
    b = cascade.vary(image, num_images=2, seed=0, until="decoder", negative_prompt="red")
    assert not torch.equal(a.images["decoder"], b.images["decoder"])


def test_img2img_cli_writes_pngs_with_every_setting(bundle, tmp_path, capsys):
    from PIL import Image

    from cascade.cli import main

    source = tmp_path / "scene.png"
    Image.new("RGB", (80, 80), (200, 30, 30)).save(source)
    out = tmp_path / "out"
    assert main(["img2img", "--image", str(source), "--prompt", "a green star", "--strength", "0.5",
                 "--negative-prompt", "red", "--num-images", "1", "--model", str(bundle), "--until", "decoder",
                 "--out", str(out), "--quiet"]) == 0
    (png,) = sorted(out.glob("img2img-*-00.png"))
    with Image.open(png) as im:
        assert im.size == (64, 64)
        assert im.text["prompt"] == "a green star" and im.text["strength"] == "0.5"
        assert im.text["negative_prompt"] == "red" and im.text["source"] == str(source)


@pytest.mark.parametrize("args,needle", [
    (["img2img", "--image", "IMG", "--prompt", "a dot", "--strength", "1.5"], "--strength 1.5"),
    (["img2img", "--image", "IMG", "--prompt", "a dot", "--negative-prompt", "  "], "prompt"),
    (["generate", "--prompt", "a dot", "--negative-prompt", ""], "prompt"),
])
def test_editing_mistakes_are_one_line_errors(args, needle, bundle, tmp_path, capsys):
    from PIL import Image

    from cascade.cli import main

    source = tmp_path / "scene.png"
    Image.new("RGB", (64, 64)).save(source)
    args = [str(source) if a == "IMG" else a for a in args]
    assert main([*args, "--model", str(bundle), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_the_negative_prompt_benchmark_counts_the_named_colour():
    from benchmarks.negative_prompt import colour_fractions
    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import CELL, SIZES, render

    def red_square(size):
        obj = {"shape": "square", "color": "red", "size": size, "cell": [1, 1], "position": "center",
               "center": [0.5, 0.5], "radius": SIZES[size] * CELL}
        return image_to_tensor(render({"objects": [obj], "background": {"colors": ["white"], "split": "none"}}, 64))

    big, small = colour_fractions(red_square("big")[None], "red"), colour_fractions(red_square("small")[None], "red")
    # most object pixels are red (the anti-aliased edge blends with white into other palette colours)
    assert big[0] > small[0] > 0.01 and big[1] > 0.75 and small[1] > 0.5
    assert big[0] / small[0] == pytest.approx((SIZES["big"] / SIZES["small"]) ** 2, rel=0.25)  # area
    assert colour_fractions(red_square("big")[None], "blue") == (0.0, 0.0)
