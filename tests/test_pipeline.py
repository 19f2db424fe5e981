"""The orchestrator and the model commands on a bundle of small, untrained stages: the plumbing
(sizes, seeds, files, chain checks, errors). Training quality is tested per stage and in the slow
end-to-end test."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cascade.bundle import save_stage, write_manifest
from cascade.cli import main
from cascade.errors import UserError
from cascade.pipeline import Cascade, Settings, stage_generator
from bundle_helpers import CONFIG_STEPS, SR, seeded_stage

FAST = "prior=3,decoder=3,sr256=2,sr1024=2"


def _fast_settings():
    return Settings(steps={"prior": 3, "decoder": 3, "sr256": 2, "sr1024": 2})


@pytest.mark.parametrize("until,size", [("decoder", 64), ("sr256", 256)])
def test_generate_returns_each_resolution_and_repeats_with_a_seed(cascade, until, size):
    a = cascade.generate(["a red circle", "a blue square"], seed=3, until=until, settings=_fast_settings())
    b = cascade.generate(["a red circle", "a blue square"], seed=3, until=until, settings=_fast_settings())
    assert a.final.shape == (2, 3, size, size)
    assert a.final.min() >= -1 and a.final.max() <= 1
    assert torch.equal(a.final, b.final)
    c = cascade.generate(["a red circle", "a blue square"], seed=4, until=until, settings=_fast_settings())
    assert not torch.equal(a.final, c.final)


def test_stopping_earlier_keeps_the_earlier_images(cascade):
    short = cascade.generate(["a green star"], seed=1, until="decoder", settings=_fast_settings())
    long = cascade.generate(["a green star"], seed=1, until="sr256", settings=_fast_settings())
    assert torch.equal(short.images["decoder"], long.images["decoder"])


def test_generate_cli_writes_pngs_with_settings(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--prompt", "a red circle at the top left", "--model", str(bundle), "--num-images", "1",
            "--until", "sr1024", "--steps", FAST, "--seed", "5", "--out", str(out), "--quiet"]
    assert main(args) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 1  # one image at 1024^2: no grid, which would copy it
    with Image.open(paths[0]) as im:
        assert im.size == (1024, 1024) and im.mode == "RGB"
        assert im.text["prompt"] == "a red circle at the top left" and im.text["seed"] == "5"
        assert json.loads(im.text["steps"])["decoder"] == 3
        first = np.asarray(im)
    shutil.rmtree(out)
    small = [a if a != "sr1024" else "decoder" for a in args]
    assert main(small) == 0
    with Image.open(capsys.readouterr().out.split()[0]) as im:
        low = np.asarray(im)
    assert main(small) == 0
    with Image.open(capsys.readouterr().out.split()[0]) as im:
        assert np.array_equal(np.asarray(im), low)  # same seed and settings -> identical pixels
    assert first.std() > 0


def test_without_settings_every_stage_samples_with_its_config(cascade):
    calls = []
    result = cascade.generate(["a red circle"], seed=0, until="sr1024", progress=lambda *call: calls.append(call))
    assert calls == [(stage, done, total) for stage, total in CONFIG_STEPS.items() for done in range(total + 1)]
    text = Settings().as_text(cascade.stages)
    assert json.loads(text["steps"]) == CONFIG_STEPS and text["sampler"] == "ddim" and text["aug_level"] == "0.2"
    assert json.loads(text["guidance"]) == {"prior": 4.0, "decoder": 3.0, "sr256": 1.0, "sr1024": 1.0}
    assert result.final.shape == (1, 3, 1024, 1024)


def test_progress_reports_every_sampling_step_of_every_stage(cascade):
    calls = []
    cascade.generate(["a red circle"], seed=0, until="sr256", settings=_fast_settings(),
                     progress=lambda *call: calls.append(call))
    assert calls == [(stage, done, total) for stage, total in (("prior", 3), ("decoder", 3), ("sr256", 2))
                     for done in range(total + 1)]


def test_a_one_pass_sr_stage_reports_one_step_not_its_configs_steps(cascade, monkeypatch):
    """An SR stage trained as a regressor (objective l1 / l2) samples in one pass whatever the steps say."""
    sr256 = cascade.stages["sr256"]
    monkeypatch.setattr(sr256, "config", sr256.config.model_copy(update={"objective": "l1"}))
    calls = []
    result = cascade.generate(["a red circle"], seed=0, until="sr256", settings=_fast_settings(),
                              progress=lambda *call: calls.append(call))
    assert [c for c in calls if c[0] == "sr256"] == [("sr256", 0, 1), ("sr256", 1, 1)]
    assert result.final.shape == (1, 3, 256, 256)


def _bar_draws(err: str) -> dict[str, list[str]]:
    """Every drawn state of each tqdm bar in `err`, by label, the labels in the order the bars appeared."""
    draws = {}
    for line in filter(None, re.split(r"[\r\n]+", err)):
        draws.setdefault(line.split(":")[0].strip(), []).append(line)
    return draws


def test_generate_cli_shows_a_bar_per_stage_that_reaches_its_steps(bundle, tmp_path, capsys):
    steps = {"prior": 3, "decoder": 4, "sr256": 2, "sr1024": 1}
    args = ["generate", "--prompt", "a red circle", "--model", str(bundle), "--num-images", "1",
            "--steps", ",".join(f"{k}={v}" for k, v in steps.items()), "--out", str(tmp_path / "o")]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 1  # stdout: the path only (one image at 1024^2 has no grid)
    draws = _bar_draws(err)
    assert list(draws) == list(steps), err
    for stage, total in steps.items():
        first, last = draws[stage][0], draws[stage][-1]
        assert re.search(rf"\b0/{total}\b", first) and re.search(rf"100%.*\b{total}/{total}\b", last), draws[stage]
    assert main(args + ["--until", "decoder", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and len(out.split()) == 2


def _pixels(paths: list[str]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)).astype(int) for p in paths]


def test_vary_interpolate_textdiff_write_their_frames(bundle, tmp_path, capsys):
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(src)
    other = tmp_path / "other.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(other)
    common = ["--model", str(bundle), "--until", "decoder", "--steps", FAST, "--quiet"]

    def run(*args, out="o"):
        assert main([*args, *common, "--out", str(tmp_path / out)]) == 0
        paths = capsys.readouterr().out.split()
        assert paths[-1].endswith("-grid.png")
        return _pixels(paths[:-1])

    varied = run("vary", "--image", str(src), "--num-images", "3")
    assert len(varied) == 3 and all((a != b).any() for a, b in [(varied[0], varied[1]), (varied[1], varied[2])])
    again = run("vary", "--image", str(src), "--num-images", "3", out="o2")
    assert all((a == b).all() for a, b in zip(varied, again))  # the seed fixes every draw
    # (An untrained decoder hardly reads its embedding, so what frames show is tested on the embeddings below.)
    assert len(run("interpolate", "--image", str(src), "--image", str(other), "--frames", "4")) == 4
    assert len(run("textdiff", "--image", str(src), "--from", "a photo", "--to", "a red square", "--frames", "3")) == 3


def test_interpolate_and_textdiff_move_the_embedding_step_by_step(cascade):
    from decoder.manipulation import text_diff_direction

    a, b = torch.rand(3, 64, 64) * 2 - 1, torch.rand(3, 64, 64) * 2 - 1
    s = Settings(steps={"decoder": 2})
    z = cascade.encode_image(torch.stack([a, b]))
    frames = cascade.interpolate(a, b, frames=5, seed=0, until="decoder", settings=s).image_embeddings
    towards_b = frames @ z[1]
    assert torch.all(towards_b[1:] > towards_b[:-1]) and torch.allclose(frames.norm(dim=-1), torch.ones(5))
    z_t = cascade.encode_text(["a photo", "a red square"])[0]
    edits = cascade.textdiff(a, "a photo", "a red square", frames=4, max_theta=0.5, seed=0, until="decoder",
                             settings=s).image_embeddings
    along = edits @ text_diff_direction(z_t[0], z_t[1])
    assert torch.all(along[1:] > along[:-1]) and torch.allclose(edits[0], z[0], atol=1e-5)


@pytest.mark.parametrize("job", ["interpolate", "textdiff"])
def test_frames_share_every_stages_noise_through_sr1024(cascade, job):
    """With one embedding in every frame, the frames are identical at every resolution: x_T and the SR
    augmentation noise are shared by the frames."""
    image = torch.rand(3, 64, 64) * 2 - 1
    settings = Settings(steps={"prior": 2, "decoder": 3, "sr256": 2, "sr1024": 1}, sampler="ddim")
    if job == "interpolate":
        result = cascade.interpolate(image, image, frames=3, seed=4, until="sr1024", settings=settings)
    else:  # theta = 0 everywhere: the image's own embedding in every frame
        result = cascade.textdiff(image, "a photo", "a red square", frames=3, max_theta=0.0, seed=4,
                                  until="sr1024", settings=settings)
    for name, size in (("decoder", 64), ("sr256", 256), ("sr1024", 1024)):
        images = result.images[name]
        assert images.shape == (3, 3, size, size)
        assert torch.equal(images[0], images[1]) and torch.equal(images[1], images[2]), name


def test_each_stage_draws_from_one_generator_and_no_draw_repeats_another(cascade, monkeypatch):
    """x_T, the SR augmentation noise and the sampler's own noise of one stage come from one generator in
    turn: the augmentation noise is not the starting noise, nor is ddpm's first step noise."""
    seen = {}
    for name in ("decoder", "sr256"):
        stage = cascade.stages[name]

        def spy(cond, *, _real=stage.sample, _name=name, **kwargs):
            after = torch.Generator()
            after.set_state(kwargs["generator"].get_state())  # where the stage's own draws begin
            seen[_name] = (kwargs, torch.randn(kwargs["noise"][:1].shape, generator=after))
            return _real(cond, **kwargs)

        monkeypatch.setattr(stage, "sample", spy)
    image = torch.rand(3, 64, 64) * 2 - 1
    cascade.interpolate(image, -image, frames=2, seed=0, until="sr256",
                        settings=Settings(steps={"decoder": 2, "sr256": 1}, sampler="ddpm"))
    decoder_kwargs, decoder_next = seen["decoder"]
    assert not torch.equal(decoder_next, decoder_kwargs["noise"][:1])
    sr_kwargs, _ = seen["sr256"]
    assert not torch.equal(sr_kwargs["aug_noise"][:1], sr_kwargs["noise"][:1])


def test_stage_generators_take_every_seed_below_2_63_and_refuse_the_rest(cascade):
    """Seeds that fitted before keep their generators; 10**16 * 7919 no longer overflows torch's 64 bits."""
    assert stage_generator(5, "decoder").initial_seed() == 5 * 7919 + 2
    seeds = {stage_generator(seed, stage).initial_seed() for seed in (10**16, 2**63 - 1) for stage in CONFIG_STEPS}
    assert len(seeds) == 8
    for seed in (-1, 2**63, 1.5):
        with pytest.raises(UserError, match="out of range"):
            stage_generator(seed, "prior")
    image = torch.rand(3, 64, 64) * 2 - 1
    for theta in (-0.5, 7.0):
        with pytest.raises(UserError, match="max_theta"):
            cascade.textdiff(image, "a cat", "a dog", max_theta=theta, until="decoder")


def test_a_text_conditioned_sr256_gets_the_prompt_in_the_full_cascade(bundle, tmp_path, monkeypatch):
    root = tmp_path / "textsr"
    shutil.copytree(bundle, root)
    shutil.rmtree(root / "sr256")
    torch.manual_seed(1)
    sr = seeded_stage("sr256", **SR, text=True, text_dim=384, head_dim=8, steps=2)
    with torch.no_grad():  # an untrained cross-attention may start at zero; make the text visible
        for p in sr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_stage(sr, root / "sr256")
    write_manifest(root)
    cascade = Cascade.from_bundle(root)
    seen = []
    real = cascade.stages["sr256"].sample
    monkeypatch.setattr(cascade.stages["sr256"], "sample", lambda cond, **kw: seen.append(cond) or real(cond, **kw))
    settings = Settings(steps={"prior": 2, "decoder": 2}, guidance={"sr256": 3.0})
    red = cascade.generate(["a red circle"], seed=0, until="sr256", settings=settings)
    _, tokens, mask = cascade.encode_text(["a red circle"])
    assert torch.equal(seen[0]["clip_tokens"], tokens) and torch.equal(seen[0]["clip_mask"], mask)
    # The same 64x64 input upsampled under another caption comes out differently.
    _, blue_tokens, blue_mask = cascade.encode_text(["a blue star"])
    up = cascade.upsample(red.images["decoder"], until="sr256", settings=settings, seed=0,
                          text={"clip_tokens": blue_tokens, "clip_mask": blue_mask})
    assert torch.equal(up["decoder"], red.images["decoder"]) and not torch.equal(up["sr256"], red.images["sr256"])


def test_interpolation_endpoints_decode_the_endpoint_embeddings(cascade):
    a = torch.rand(3, 64, 64) * 2 - 1
    b = -a
    s = _fast_settings()
    frames = cascade.interpolate(a, b, frames=3, seed=2, until="decoder", settings=s)
    z = cascade.encode_image(torch.stack([a, b]))
    assert torch.allclose(frames.image_embeddings[0], z[0], atol=1e-5)
    assert torch.allclose(frames.image_embeddings[-1], z[1], atol=1e-5)
    ends = cascade.decode(z, settings=s, seed=2, shared_noise=True)
    assert torch.allclose(frames.images["decoder"][[0, -1]], ends, atol=1e-5)


@pytest.mark.parametrize("args,needle", [
    (["generate", "--prompt", "   "], "prompt is empty"),
    (["generate", "--prompt", "x" * 400], "at most"),
    (["generate", "--prompt", "a cat", "--steps", "decoder=0"], "between 1 and 1000"),
    (["generate", "--prompt", "a cat", "--guidance", "prior=abc"], "not a number"),
    (["generate", "--prompt", "a cat", "--num-images", "0"], "between 1 and 64"),
    (["interpolate", "--image", "a.png"], "exactly two"),
])
def test_bad_options_are_one_line_and_exit_2(bundle, args, needle, capsys):
    assert main(args + ["--model", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import cascade.cli

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cascade.cli, "cmd_generate", interrupt)
    assert main(["generate", "--prompt", "a cat"]) == 130
    assert capsys.readouterr().err == "cascade: interrupted\n"


def test_missing_or_corrupt_bundle_and_non_image(bundle, tmp_path, capsys):
    assert main(["generate", "--prompt", "a cat", "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "cascade.json").write_text("{not json")
    assert main(["generate", "--prompt", "a cat", "--model", str(broken)]) == 2
    assert "corrupt" in capsys.readouterr().err
    (broken / "cascade.json").write_text((bundle / "cascade.json").read_text())
    (broken / "decoder" / "model.safetensors").write_bytes(b"garbage")
    assert main(["generate", "--prompt", "a cat", "--model", str(broken)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["vary", "--image", str(text), "--model", str(bundle)]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_chain_mismatch_is_named(bundle, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(bundle, odd)
    shutil.rmtree(odd / "prior")
    save_stage(seeded_stage("prior", embed_dim=48, token_dim=384, max_text_len=16, width=32, depth=1, heads=2),
               odd / "prior")
    with pytest.raises(UserError, match="prior was trained with embed_dim=48"):
        Cascade.from_bundle(odd)


def test_eval_cli_reports_every_stage_and_the_text_to_image_score(bundle, tmp_path, capsys):
    """`cascade eval` on embedded shapes shards: one JSON and Markdown report over the stages asked for,
    the prior -> decoder score, and a sample grid per image stage (the SR grid shows 3 images per sample)."""
    from cascade.data.shapes import samples
    from cascade.data.shards import ShardWriter

    data = tmp_path / "data"
    items = list(samples(10, (64, 256), seed=0))
    for split, chosen in (("train", items[:6]), ("val", items[6:])):
        with ShardWriter(data / split, max_count=8) as writer:
            for s in chosen:
                writer.write(s.key, {"64.png": s.images[64], "256.png": s.images[256], "txt": s.txt, "json": s.json})
    assert main(["data", "embed", "--data", str(data), "--clip", str(bundle / "clip")]) == 0
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "--model", str(bundle), "--data", str(data), "--out", str(out),
                 "--stages", "clip,prior,decoder,sr256", "--limit", "4"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert set(report) == {"clip", "prior", "decoder", "sr256", "cascade"}
    assert {"i2t_r1", "ridge_i2t_r1"} <= set(report["clip"])
    assert {"prior_cos", "text_cos", "nn_cos"} <= set(report["prior"])
    assert {"colour_acc@g1", "colour_acc@g3", "fd_effnet@g1", "placed_acc@g3"} <= set(report["decoder"])
    assert {"psnr_bicubic", "ssim_bicubic", "psnr_best"} <= set(report["sr256"])
    assert {"colour_acc@prior_g1", "colour_acc@prior_g3"} <= set(report["cascade"])
    assert all(0.0 <= v <= 1.0 for k, v in report["decoder"].items() if k.endswith(("acc@g1", "acc@g3")))
    assert 0.0 <= report["decoder"]["centre_when_asked_elsewhere@g1"] <= 1.0
    table = (out / "eval.md").read_text()
    assert table.count("\n") == 2 + sum(len(m) for m in report.values())  # header, rule, one row per metric
    assert "| sr256 | psnr_bicubic |" in table and "| cascade | colour_acc@prior_g3 |" in table
    for name in ("decoder", "sr256"):
        assert Image.open(out / f"{name}-samples.png").size[0] > 64
    assert Image.open(out / "decoder-placement-g3.png").size[0] >= 9 * 64  # --limit 4: one object in 9 cells
    assert str(out / "eval.json") in capsys.readouterr().out


def test_t_min_overrides_where_each_stage_stops_as_its_config_would(cascade, bundle, tmp_path, capsys):
    """Settings.t_min (the CLI's --t-min) ends a stage's sampling at that timestep: the images are those of
    the stage with t_min in its config, differ from stopping at step 0, and the PNG text records it."""
    fast = _fast_settings()
    base = cascade.generate(["a red circle"], seed=2, until="decoder", settings=fast)
    early = Settings(steps=dict(fast.steps), t_min={"decoder": 300})
    stopped = cascade.generate(["a red circle"], seed=2, until="decoder", settings=early)
    decoder = cascade.stages["decoder"]
    config = decoder.config
    try:
        decoder.config = config.model_copy(update={"t_min": 300})
        configured = cascade.generate(["a red circle"], seed=2, until="decoder", settings=fast)
        assert Settings().for_stage("decoder", decoder)["t_min"] == 300  # the config's, when not overridden
    finally:
        decoder.config = config
    torch.testing.assert_close(stopped.final, configured.final)
    assert not torch.equal(stopped.final, base.final)  # (by little: the untrained decoder's eps is near 0)
    assert json.loads(early.as_text(cascade.stages)["t_min"]) == {"prior": 0, "decoder": 300, "sr256": 0, "sr1024": 0}
    assert "t_min" not in fast.as_text(cascade.stages)  # every stage walks to step 0: nothing to record
    with pytest.raises(UserError, match="below the stage's 1000 timesteps"):
        Settings(t_min={"decoder": 1000}).for_stage("decoder", decoder)
    args = ["generate", "--prompt", "a red circle", "--model", str(bundle), "--until", "decoder", "--steps", FAST,
            "--quiet", "--out", str(tmp_path / "o")]
    for bad, message in (("decoder=-1", "must be 0 or more"), ("decoder=x", "not a number"),
                         ("clip=3", "STAGE=VALUE")):
        assert main([*args, "--t-min", bad]) == 2
        assert message in capsys.readouterr().err
    assert main([*args, "--t-min", "decoder=300"]) == 0
    (grid,) = (tmp_path / "o").glob("*-grid.png")
    assert json.loads(Image.open(grid).text["t_min"]) == {"prior": 0, "decoder": 300}  # the stages it loaded
