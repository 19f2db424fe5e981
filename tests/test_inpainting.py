"""Inpainting: the sampling-time method against a correlated Gaussian's exact conditional, RePaint's walk,
the masks, the GLIDE-style decoder and its fine-tuning start, the stages, the orchestrator and the CLI."""
import numpy as np
import pytest
import torch
from PIL import Image

from bundle_helpers import DECODER, SR, seeded_stage
from cascade.diffusion import NoiseSchedule, SAMPLERS, inpaint_steps, repaint_walk, sample_inpaint
from cascade.errors import UserError
from cascade.masks import box_mask, feather, paste, random_masks, read_mask, resize_mask

RHO, KNOWN = 0.9, 1.5


def correlated_oracle(schedule, rho=RHO):
    """eps of x_t (B, ..., 2) for data whose last-axis pairs are x0 ~ N(0, [[1, rho], [rho, 1]]): along the
    covariance's eigenvectors (1, 1) / sqrt 2 and (1, -1) / sqrt 2 (variances 1 + rho and 1 - rho),
    E[x0 | x_t] = a lambda / (a^2 lambda + s^2) x_t, a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)."""
    ab = schedule.alphas_cumprod

    def denoise(x, t):
        shape = (-1,) + (1,) * (x.dim() - 1)
        a, s = ab[t].sqrt().view(shape).to(x.dtype), (1 - ab[t]).sqrt().view(shape).to(x.dtype)
        u, v = (x[..., 0] + x[..., 1]) / 2**0.5, (x[..., 0] - x[..., 1]) / 2**0.5
        a1, s1 = a[..., 0], s[..., 0]
        u0 = a1 * (1 + rho) / (a1**2 * (1 + rho) + s1**2) * u
        v0 = a1 * (1 - rho) / (a1**2 * (1 - rho) + s1**2) * v
        x0 = torch.stack([(u0 + v0) / 2**0.5, (u0 - v0) / 2**0.5], dim=-1)
        return (x - a * x0) / s

    return denoise


def _inpaint_gaussian(sampler, resample=1, jump=1, n=3000):
    s = NoiseSchedule.from_name("cosine", 1000)
    known = torch.zeros(n, 2, dtype=torch.float64)
    known[:, 0] = KNOWN
    out = sample_inpaint(correlated_oracle(s), known, torch.tensor([0.0, 1.0], dtype=torch.float64), schedule=s,
                         sampler=sampler, steps=50, resample=resample, jump=jump,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], known[:, 0])  # the known coordinate is kept exactly
    return out[:, 1]


def test_repaint_resampling_reaches_the_exact_conditional_that_replacement_alone_misses():
    """x0 = (a, b) correlated 0.9; knowing a = 1.5, b | a ~ N(1.35, 0.19). Replacement alone lands far
    short of that mean (the known half steers the other only through the noisy x); RePaint's resampling
    gets within 0.1 of it, with about the right spread."""
    exact_mean, exact_var = RHO * KNOWN, 1 - RHO**2
    plain = _inpaint_gaussian("ddpm")
    resampled = _inpaint_gaussian("ddpm", resample=10)
    assert abs(plain.mean().item() - exact_mean) > 0.3
    assert abs(resampled.mean().item() - exact_mean) < 0.1
    assert abs(resampled.var().item() - exact_var) < 0.06
    jumped = _inpaint_gaussian("ddim", resample=5, jump=5)  # DDIM with jumps, as RePaint's own schedule
    assert abs(jumped.mean().item() - exact_mean) < abs(_inpaint_gaussian("ddim").mean().item() - exact_mean) / 3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_keeps_the_known_region_and_fills_the_rest(sampler):
    s = NoiseSchedule.from_name("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    known = torch.randn(4, 3, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    steps = []
    out = sample_inpaint(correlated_oracle(s, 0.0), known.view(4, -1, 2), mask.expand(4, 3, 8, 8).reshape(4, -1, 2),
                         schedule=s, sampler=sampler, steps=6, generator=g,
                         callback=lambda info: steps.append(info["i"])).view(4, 3, 8, 8)
    assert torch.equal(out * (1 - mask), known * (1 - mask))
    assert torch.isfinite(out).all() and not torch.allclose(out * mask, known * mask)
    assert steps == list(range(5, -1, -1))


def test_resampling_needs_a_one_step_sampler_and_sane_counts():
    s = NoiseSchedule.from_name("cosine", 100)
    known, mask = torch.zeros(2, 4), torch.ones(2, 4)
    for sampler, resample, jump, match in (("dpmpp", 2, 1, "one-step sampler"), ("ddim", 0, 1, "resample"),
                                           ("ddim", 2, 0, "jump")):
        with pytest.raises(UserError, match=match):
            sample_inpaint(correlated_oracle(s, 0.0), known.view(2, 2, 2), mask.view(2, 2, 2), schedule=s,
                           sampler=sampler, steps=4, resample=resample, jump=jump)
    with pytest.raises(UserError, match="between 0 .keep. and 1"):
        sample_inpaint(correlated_oracle(s, 0.0), known.view(2, 2, 2), 2 * mask.view(2, 2, 2), schedule=s,
                       sampler="ddim", steps=4)


@pytest.mark.parametrize("levels,jump,resample", [(6, 1, 1), (6, 1, 3), (10, 3, 4), (50, 10, 10)])
def test_repaint_walk(levels, jump, resample):
    moves = repaint_walk(levels, jump, resample)
    level, passes = levels - 1, {}
    for kind, at in moves:
        assert at == level
        if kind == "down":
            passes[level] = passes.get(level, 0) + 1
            level -= 1
        else:
            level += jump
            assert level <= levels - 1
    assert level == -1  # ends at x_0
    points = {L for L in range(levels) if L + jump <= levels - 1 and (levels - 1 - L) % jump == 0}
    # a jump point is left upwards resample - 1 times, so the levels above it are walked again
    ups = [at for kind, at in moves if kind == "up"]
    assert sorted(set(ups)) == sorted(points if resample > 1 else []) and all(ups.count(p) == resample - 1 for p in set(ups))
    assert passes[0] == 1 and sum(passes.values()) == inpaint_steps(levels, jump, resample)
    if resample == 1:
        assert moves == [("down", L) for L in range(levels - 1, -1, -1)]


# ---------------------------------------------------------------- masks
def test_feather_ramps_inside_the_mask_only():
    mask = torch.zeros(1, 1, 20, 20)
    mask[..., 5:15, 5:15] = 1
    f = feather(mask, 4)
    assert torch.equal(f * (1 - mask), torch.zeros_like(f))  # nothing outside
    assert f[0, 0, 10, 5].item() == pytest.approx(0.25) and f[0, 0, 10, 6].item() == pytest.approx(0.5)
    assert f[0, 0, 10, 8].item() == 1.0 and torch.equal(feather(mask, 1), mask)
    known, made = torch.zeros(1, 3, 20, 20), torch.ones(1, 3, 20, 20)
    pasted = paste(made, known, mask, 4)
    assert torch.equal(pasted * (1 - mask), known) and pasted[0, 0, 10, 10] == 1.0


def test_resize_mask_keeps_any_coverage_and_box_mask_checks_its_box():
    mask = box_mask("10,20,11,21", (256, 128))  # one pixel of a 256 x 128 image
    assert mask.shape == (1, 128, 256) and mask.sum() == 1 and mask[0, 20, 10] == 1
    square = box_mask("100,100,101,101", (256, 256))
    small = resize_mask(square[None], 64)
    assert small.sum() == 1 and small[0, 0, 25, 25] == 1  # a 1-pixel mask survives at 64x64
    assert torch.equal(resize_mask(resize_mask(square[None], 64), 256).sum(), torch.tensor(16.0))
    for bad, match in (("1,2,3", "four whole numbers"), ("5,5,5,9", "not a box"), ("0,0,300,10", "not a box")):
        with pytest.raises(UserError, match=match):
            box_mask(bad, (256, 256))


def test_read_mask(tmp_path):
    array = np.zeros((40, 30), np.uint8)
    array[10:20, 5:15] = 255
    Image.fromarray(array).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png", (30, 40))
    assert mask.shape == (1, 40, 30) and mask.sum() == 100 and mask[0, 15, 10] == 1
    with pytest.raises(UserError, match="the mask is 30x40 but the image is 40x40"):
        read_mask(tmp_path / "m.png", (40, 40))
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(UserError, match="the mask is empty"):
        read_mask(tmp_path / "empty.png", (30, 40))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="not a readable mask image"):
        read_mask(tmp_path / "text.png", (30, 40))


def test_random_training_masks():
    masks = random_masks(400, 64, p_whole=0.25, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    cover = masks.mean(dim=(1, 2, 3))
    whole = (cover == 1).float().mean().item()
    assert 0.18 < whole < 0.32
    partial = cover[cover < 1]
    assert partial.min() > 0.01 and partial.median() < 0.6 and partial.max() <= 0.8
    again = random_masks(400, 64, p_whole=0.25, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


# ---------------------------------------------------------------- the decoder
def _alive(stage, seed=9):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return stage.eval()


def _cond(b=2):
    g = torch.Generator().manual_seed(0)
    cond = {"clip_image": torch.nn.functional.normalize(torch.randn(b, 32, generator=g), dim=-1),
            "clip_tokens": torch.randn(b, 5, 384, generator=g), "clip_mask": torch.ones(b, 5, dtype=torch.bool)}
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:40, 20:50] = 1
    return cond, torch.rand(b, 3, 64, 64, generator=g) * 2 - 1, mask


@pytest.mark.parametrize("extra", [{}, {"coord_channels": True}, {"self_condition": True}])
def test_init_from_a_plain_decoder_computes_what_it_did(tmp_path, extra):
    """A decoder with `inpaint: true` started from a plain one's weights (its new stem channels zero) gives
    the plain one's output whatever the masked image and mask hold, so fine-tuning starts from a working
    generator."""
    from cascade.bundle import init_from, save_stage

    plain = _alive(seeded_stage("decoder", **DECODER, **extra))
    save_stage(plain, tmp_path / "decoder")
    inpainter = seeded_stage("decoder", **DECODER, **extra, inpaint=True)
    lines = init_from(inpainter, tmp_path / "decoder")
    assert len(lines) == 1 and "inpaint" in lines[0]
    cond, image, mask = _cond()
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([100, 700])
    ins = 6 if extra.get("self_condition") else 3
    x_in = torch.randn(2, ins, 64, 64, generator=g)
    emb, context, text_mask = plain._condition(cond, torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    want = plain._unet(x_in, t, emb, context, text_mask)
    channels = inpainter.inpaint_channels(image, mask, image.shape, torch.device("cpu"))
    got = inpainter.eval()._unet(x_in, t, emb, context, text_mask, channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="can only add inputs"):
        init_from(seeded_stage("decoder", **DECODER), _saved(tmp_path / "inp", inpainter))
    with pytest.raises(UserError, match="holds a decoder stage, not a sr256"):
        init_from(seeded_stage("sr256", **SR), tmp_path / "decoder")


def test_init_from_adds_a_pixel_head_that_starts_by_computing_what_the_source_did(tmp_path):
    """A decoder config with `pixel_head` started from a decoder without one (and an inpainting one, which adds
    inputs too) computes the source's output; a config that drops the source's head is a one-line error."""
    from cascade.bundle import init_from, save_stage

    plain = _alive(seeded_stage("decoder", **DECODER))
    save_stage(plain, tmp_path / "decoder")
    headed = seeded_stage("decoder", **DECODER, pixel_head=8, inpaint=True)
    lines = init_from(headed, tmp_path / "decoder")
    assert len(lines) == 2 and "pixel_head" in lines[0] and "inpaint" in lines[1]
    cond, image, mask = _cond()
    x_in, t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([100, 700])
    emb, context, text_mask = plain._condition(cond, torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    want = plain._unet(x_in, t, emb, context, text_mask)
    channels = headed.inpaint_channels(image, mask, image.shape, torch.device("cpu"))
    got = headed.eval()._unet(x_in, t, emb, context, text_mask, channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert headed.unet.pixel_head.conv1.weight.abs().sum() > 0  # its own initialisation, not zeros
    with pytest.raises(UserError, match="pixel head"):
        init_from(seeded_stage("decoder", **DECODER), _saved(tmp_path / "headed", headed))


def _saved(path, stage):
    from cascade.bundle import save_stage

    save_stage(stage, path)
    return path


def test_inpainting_decoder_trains_on_masked_images():
    stage = _alive(seeded_stage("decoder", **DECODER, inpaint=True, inpaint_whole=0.5)).train()
    assert stage.unet.stem.in_channels == 7 * 4  # (3 + 4) channels folded by the 2x2 patch
    cond, image, _ = _cond(4)
    batch = {**cond, "clip_image": cond["clip_image"], "image_64": image}
    batch = {k: (v.repeat(2, *[1] * (v.dim() - 1))) for k, v in batch.items()}
    loss = stage.loss(batch)
    loss.backward()
    grad = stage.unet.stem.weight.grad
    assert torch.isfinite(loss) and grad[:, 12:].abs().sum() > 0  # the inpainting channels learn


@pytest.mark.parametrize("method,config", [("replace", {}), ("replace", {"inpaint": True}),
                                           ("glide", {"inpaint": True})])
def test_decoder_inpainting_keeps_the_known_region(method, config):
    stage = _alive(seeded_stage("decoder", **DECODER, **config, steps=3))
    cond, image, mask = _cond()
    out = stage.sample(cond, known=image, mask=mask, inpaint_method=method, guidance=2.0,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(out * (1 - mask), image * (1 - mask))
    plain = stage.sample(cond, guidance=2.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out * mask, image * mask) and not torch.allclose(out * mask, plain * mask)


def test_glide_inpainting_reads_the_masked_image_and_needs_an_inpainting_decoder():
    stage = _alive(seeded_stage("decoder", **DECODER, inpaint=True, steps=3))
    cond, image, mask = _cond()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = stage.sample(cond, known=image, mask=mask, inpaint_method="glide", generator=g())
    b = stage.sample(cond, known=-image, mask=mask, inpaint_method="glide", generator=g())
    assert not torch.allclose(a * mask, b * mask)  # what is outside the mask changes what is drawn inside
    with pytest.raises(UserError, match="needs a decoder trained with model.inpaint"):
        seeded_stage("decoder", **DECODER, steps=3).sample(cond, known=image, mask=mask, inpaint_method="glide")
    with pytest.raises(UserError, match="inpainting mask must be"):
        stage.sample(cond, known=image, mask=mask[..., :32, :32])


@pytest.mark.parametrize("residual", [True, False])
def test_superres_inpainting_keeps_the_known_region(residual):
    stage = _alive(seeded_stage("sr256", **SR, residual=residual, steps=2))
    g = torch.Generator().manual_seed(0)
    low, known = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 8:40, 16:48] = 1
    out = stage.sample({"low_res": low}, known=known, mask=mask, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out * (1 - mask), known * (1 - mask), rtol=0, atol=1e-6)
    assert not torch.allclose(out * mask, known * mask)


# ---------------------------------------------------------------- the orchestrator and the CLI
def test_cascade_inpaint_keeps_the_original_outside_the_mask_at_every_stage(bundle):
    from cascade.masks import resize_image
    from cascade.pipeline import Cascade

    cascade = Cascade.from_bundle(bundle)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 256, 256, generator=g) * 2 - 1
    mask = box_mask("40,60,150,200", (256, 256))
    reports = []
    result = cascade.inpaint(image, mask, "a red circle", num_images=2, until="sr256", resample=2, seed=3,
                             progress=lambda stage, done, total: reports.append((stage, done, total)))
    for stage, out in result.images.items():
        size = out.shape[-1]
        known, m = resize_image(image[None], size), resize_mask(mask[None], size)
        assert torch.equal(out * (1 - m), known.expand_as(out) * (1 - m)), stage
        assert (out * m - known * m).abs().sum() > 0
    totals = {stage: total for stage, _, total in reports}
    assert totals["decoder"] == inpaint_steps(4, 1, 2) == 7 and totals["sr256"] == 3  # resampling: decoder only
    with pytest.raises(UserError, match="the mask is empty"):
        cascade.inpaint(image, torch.zeros(1, 256, 256), "a red circle", until="decoder")
    with pytest.raises(UserError, match="the mask is 128x128 but the image is 256x256"):
        cascade.inpaint(image, torch.ones(1, 128, 128), "a red circle", until="decoder")
    with pytest.raises(UserError, match="glide inpainting method needs"):
        cascade.inpaint(image, mask, "a red circle", until="decoder", method="glide")


def _cli(*argv):
    from cascade.cli import main

    return main(list(argv))


def test_cli_inpaint_leaves_every_pixel_outside_the_mask_alone(bundle, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    region = np.zeros((256, 256), np.uint8)
    region[30:100, 140:250] = 255
    Image.fromarray(region).save(tmp_path / "mask.png")
    assert _cli("inpaint", "--image", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "mask.png"),
                "--prompt", "a blue star", "--model", str(bundle), "--until", "sr256", "--num-images", "2",
                "--out", str(tmp_path / "out"), "--quiet") == 0
    written = sorted((tmp_path / "out").glob("inpaint-a-blue-star-replace-s0-0*.png"))
    assert len(written) == 2
    for path in written:
        with Image.open(path) as im:
            got, text = np.asarray(im), dict(im.text)
        outside = region == 0
        assert np.array_equal(got[outside], pixels[outside])  # byte for byte
        assert np.abs(got[~outside].astype(int) - pixels[~outside]).mean() > 5
        assert text["method"] == "replace" and text["mask"].endswith("mask.png") and text["prompt"] == "a blue star"
        assert text["until"] == "sr256" and "sr256" in text["steps"]


@pytest.mark.parametrize("extra,message", [
    (["--box", "0,0,300,20"], "not a box inside the 256x256 image"),
    (["--box", "0,0,20,20", "--mask", "mask.png"], "either --mask PNG or --box"),
    ([], "either --mask PNG or --box"),
    (["--mask", "small.png"], "the mask is 64x64 but the image is 256x256"),
    (["--mask", "empty.png"], "the mask is empty"),
    (["--box", "0,0,20,20", "--method", "glide"], "glide inpainting method needs"),
    (["--box", "0,0,20,20", "--resample", "3", "--sampler", "heun"], "one-step sampler"),
    (["--box", "0,0,20,20", "--resample", "0"], "--resample 0: must be between 1 and 50"),
    (["--box", "0,0,20,20", "--resample", "51"], "--resample 51: must be between 1 and 50"),
])
def test_cli_inpaint_input_errors_are_one_line(bundle, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (256, 256), "white").save("scene.png")
    Image.new("L", (256, 256), 255).save("mask.png")
    Image.new("L", (64, 64), 255).save("small.png")
    Image.new("L", (256, 256), 0).save("empty.png")
    assert _cli("inpaint", "--image", "scene.png", "--prompt", "a star", "--model", str(bundle), "--quiet",
                *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_inpaint_help_has_an_example(capsys):
    with pytest.raises(SystemExit):
        _cli("inpaint", "--help")
    out = capsys.readouterr().out
    assert "Example: cascade inpaint --image" in " ".join(out.split()) and "--resample" in out
