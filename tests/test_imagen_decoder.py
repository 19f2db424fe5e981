"""The Imagen-style decoder (`conditioning: imagen`): captions through the frozen MiniLM into cross-attention
and the timestep embedding, no image embedding; its training through the engine on shards that were never
embedded, and the cascade without a prior (generate, inpaint; vary refused in one line)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from bundle_helpers import CONFIG_STEPS, DECODER, SR, seeded_stage, small_bundle
from cascade.errors import UserError
from cascade.registry import EMBEDDING_JOBS

IMAGEN = {**DECODER, "conditioning": "imagen", "text_len": 16}
PROMPTS = ["a big red star at the top left", "a small blue circle below a green heart on a cream background"]


def _awake(stage):
    """The stage with its zero-initialised layers (the output conv, the blocks' last layers) drawn at random,
    so that its output depends on its conditioning."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in stage.parameters():
            if param.dim() >= 2 and not param.any():
                torch.nn.init.normal_(param, std=0.05)
    return stage


def test_frozen_minilm_gives_its_sentence_embedding_and_masked_token_states():
    from cascade.encoders import frozen_text_encoder

    enc = frozen_text_encoder("minilm_l6", max_len=16)
    pooled, tokens, mask = enc.encode(PROMPTS + [PROMPTS[0]])
    assert tokens.shape == (3, 16, 384) and mask.shape == (3, 16) and pooled.shape == (3, 384)
    assert mask[0].sum() < mask[1].sum()  # the longer caption has more tokens
    assert torch.all(tokens[~mask] == 0)
    # all-MiniLM-L6-v2's sentence embedding: the masked mean of the token states, L2-normalised
    mean = tokens.sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, F.normalize(mean, dim=-1))
    torch.testing.assert_close(pooled[0], pooled[2])  # the same text, the same features (cached or not)
    assert all(not p.requires_grad for p in enc.model.parameters())


def test_imagen_decoder_learns_from_captions_alone_and_saves_no_language_model():
    decoder = seeded_stage("decoder", **IMAGEN)
    assert decoder.needs_embeddings is False and decoder.image_sizes == (64,)
    names = list(decoder.state_dict())
    assert not any("image" in n for n in names) and len(names) < 200  # MiniLM's ~100 tensors are not in it
    g = torch.Generator().manual_seed(0)
    batch = {"image_64": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1, "txt": PROMPTS * 2}
    opt = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(step % 2)  # two fixed (t, noise) draws, so the fall is learning, not luck
        loss = decoder.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) < 0.9 * sum(losses[:2])
    assert decoder.conditioning.pooled_to_emb.weight.grad.abs().sum() > 0  # the pooled embedding is read


def test_the_caption_steers_the_image_and_guidance_drops_it():
    decoder = _awake(seeded_stage("decoder", **IMAGEN, steps=3)).eval()
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a = decoder.sample({"txt": PROMPTS}, guidance=3.0, noise=noise)
    assert a.shape == (2, 3, 64, 64) and not torch.allclose(a[0], a[1])  # same x_T, other caption
    b = decoder.sample({"txt": PROMPTS[::-1]}, guidance=3.0, noise=noise)
    torch.testing.assert_close(a, b.flip(0))
    # the unconditional model (text dropped) is the same for any caption
    denoise = decoder.denoiser({"txt": PROMPTS})
    x, t = torch.randn(2, 3, 64, 64), torch.full((2,), 500)
    uncond = denoise(x, t, cond_mask=torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(uncond[0], denoise(x[:1].expand(2, -1, -1, -1), t, torch.zeros(2, dtype=torch.bool))[1])
    assert not torch.allclose(denoise(x, t)[0], uncond[0])


def test_imagen_decoder_inpaints_and_keeps_the_known_region():
    decoder = _awake(seeded_stage("decoder", **IMAGEN, steps=3, inpaint=True)).eval()
    known = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    for method in ("glide", "replace"):
        out = decoder.sample({"txt": PROMPTS}, known=known, mask=mask, inpaint_method=method,
                             generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out[..., :16, :], known[..., :16, :])
        assert not torch.allclose(out[..., 16:48, 16:48], known[..., 16:48, 16:48])


def test_imagen_config_needs_the_frozen_models_width():
    from cascade.config import ConfigError
    from decoder.config import DecoderConfig

    with pytest.raises((ValueError, ConfigError), match="text_dim 256"):
        DecoderConfig(conditioning="imagen", text_dim=256)


@pytest.fixture(scope="module")
def imagen_bundle(tmp_path_factory):
    """The small bundle with its prior removed and its decoder replaced by an Imagen-style one."""
    from cascade.bundle import save_stage, write_manifest

    root = small_bundle(tmp_path_factory.mktemp("imagen"))
    shutil.rmtree(root / "prior")
    shutil.rmtree(root / "decoder")
    save_stage(_awake(seeded_stage("decoder", **IMAGEN, steps=CONFIG_STEPS["decoder"])), root / "decoder")
    write_manifest(root)
    return root


def test_cascade_runs_text_to_base_to_sr_without_a_prior(imagen_bundle, tmp_path, capsys):
    from cascade.cli import main
    from cascade.pipeline import Cascade, Settings

    cascade = Cascade.from_bundle(imagen_bundle)
    assert "prior" not in cascade.stages and cascade.text_only
    settings = Settings(steps={"decoder": 3, "sr256": 2})
    out = cascade.generate(PROMPTS, seed=3, until="sr256", settings=settings)
    assert out.images["decoder"].shape == (2, 3, 64, 64) and out.final.shape == (2, 3, 256, 256)
    assert out.image_embeddings is None
    again = cascade.generate(PROMPTS, seed=3, until="decoder", settings=settings)
    assert torch.equal(again.images["decoder"], out.images["decoder"])
    negative = cascade.generate(PROMPTS, seed=3, until="decoder", settings=settings, negative_prompt="red")
    assert not torch.equal(negative.images["decoder"], out.images["decoder"])
    with pytest.raises(UserError, match="Imagen-style decoder"):
        cascade.vary(out.images["decoder"][0], until="decoder")
    assert main(["generate", "--prompt", PROMPTS[0], "--model", str(imagen_bundle), "--until", "decoder",
                 "--steps", "decoder=2", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out").glob("*-grid.png")
    capsys.readouterr()
    image = tmp_path / "in.png"
    from cascade.images import save_png
    save_png(out.images["decoder"][0], image)
    assert main(["vary", "--image", str(image), "--model", str(imagen_bundle), "--until", "decoder",
                 "--out", str(tmp_path / "v"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "conditioning: imagen" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("job", EMBEDDING_JOBS)
def test_image_embedding_jobs_name_the_imagen_decoder_before_a_missing_upsampler(imagen_bundle, job):
    """A decoder-only Imagen-style bundle asked for the default --until sr1024: the error is the one that
    matters (no image embeddings), not that the bundle lacks sr256."""
    from cascade.pipeline import Cascade

    cascade = Cascade.from_bundle(imagen_bundle, ("decoder",))
    image = torch.rand(3, 64, 64)
    call = {"vary": lambda: cascade.vary(image),
            "interpolate": lambda: cascade.interpolate(image, image),
            "textdiff": lambda: cascade.textdiff(image, "a red circle", "a blue star")}[job]
    with pytest.raises(UserError, match=f"{job} works on CLIP image embeddings.*Imagen-style"):
        call()


def test_engine_trains_an_imagen_decoder_on_shards_without_embeddings(tmp_path):
    from cascade.bundle import load_stage
    from cascade.data.build import build
    from cascade.training.engine import TrainArgs, train

    data = tmp_path / "data"
    build("shapes", data, sizes=(64,), count=12, seed=0, progress=False)
    assert not list((data / "train").glob("*.npy"))
    config = tmp_path / "decoder.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "decoder", "model": {**IMAGEN, "steps": 2, "eval_samples": 2, "eval_guidance": [3.0]},
        "train": dict(batch_size=4, lr=1e-3, warmup_steps=1, max_steps=2, log_every=1, ckpt_every=0,
                      sample_every=0, eval_every=0, eval_at_end=False, seed=0)}))
    result = train(TrainArgs(stage="decoder", config=config, data=data, run_dir=tmp_path / "run",
                             export=tmp_path / "bundle"))
    assert result.step == 2
    stage = load_stage(result.export_dir)
    assert stage.config.conditioning == "imagen"
    assert stage.sample({"txt": PROMPTS[:1]}, steps=2).shape == (1, 3, 64, 64)


def test_a_bundle_without_clip_runs_text_to_base_to_sr_when_nothing_reads_clip(imagen_bundle, tmp_path, capsys):
    """An Imagen-style decoder and text-free upsamplers read no CLIP, so their bundle needs no clip stage:
    the same images as with one. Add a prior, or an upsampler that reads text, and the load says why not."""
    from cascade.bundle import save_stage, write_manifest
    from cascade.cli import main
    from cascade.pipeline import Cascade, Settings, check_chain

    bare = tmp_path / "bare"
    shutil.copytree(imagen_bundle, bare, ignore=shutil.ignore_patterns("clip"))
    write_manifest(bare)
    cascade = Cascade.from_bundle(bare)
    assert cascade.clip is None and cascade.device == torch.device("cpu")
    settings = Settings(steps={"decoder": 3, "sr256": 2})
    with_clip = Cascade.from_bundle(imagen_bundle).generate(PROMPTS, seed=3, until="sr256", settings=settings)
    without = cascade.generate(PROMPTS, seed=3, until="sr256", settings=settings)
    assert torch.equal(without.final, with_clip.final)
    negative = cascade.generate(PROMPTS, seed=3, until="decoder", settings=settings, negative_prompt="red")
    assert not torch.equal(negative.images["decoder"], without.images["decoder"])
    assert main(["generate", "--prompt", PROMPTS[0], "--model", str(bare), "--until", "sr256",
                 "--steps", "decoder=2,sr256=1", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()

    reader = seeded_stage("sr256", **SR, text=True, text_dim=384, head_dim=8, steps=2)
    save_stage(reader, bare / "sr256")
    with pytest.raises(UserError, match="no clip stage, which its sr256 reads"):
        Cascade.from_bundle(bare)
    with pytest.raises(UserError, match="sr256 reads CLIP embeddings or tokens, and there is no clip stage"):
        check_chain(None, {"decoder": cascade.stages["decoder"], "sr256": reader})
    assert Cascade.from_bundle(bare, stages=("decoder",)).clip is None  # a stage not loaded is not checked
    save_stage(seeded_stage("prior", embed_dim=32, token_dim=384, max_text_len=16, width=32, depth=1, heads=2),
               bare / "prior")
    shutil.rmtree(bare / "sr256")
    write_manifest(bare)
    shutil.rmtree(bare / "decoder")
    save_stage(seeded_stage("decoder", **DECODER), bare / "decoder")
    assert main(["generate", "--prompt", PROMPTS[0], "--model", str(bare), "--until", "decoder",
                 "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no clip stage, which its prior and decoder read" in err and len(err.splitlines()) == 1


def test_eval_scores_an_imagen_bundle_without_clip_on_val_one_object_prompts_and_placement(imagen_bundle, tmp_path):
    """`cascade eval` gives a clip-less Imagen-style bundle the same decoder scores as one with a CLIP:
    text -> decoder on val captions, on generated one-object prompts, and the placement probe."""
    from bundle_helpers import write_embedded_shards
    from cascade.bundle import write_manifest
    from cascade.evaluation import evaluate_bundle

    bare = tmp_path / "bare"
    shutil.copytree(imagen_bundle, bare, ignore=shutil.ignore_patterns("clip", "sr256", "sr1024"))
    write_manifest(bare)
    data = write_embedded_shards(tmp_path / "data", train=2, val=4, d=32, dt=384, length=16)
    results = evaluate_bundle(bare, data, tmp_path / "eval", stages=["decoder"], limit=4, one_object=9)
    assert 0 <= results["cascade"]["colour_acc@one_object_g3"] <= 1
    assert any(k.startswith("colour_acc@text_g") for k in results["cascade"])
    assert any(k.startswith("placed_acc@g") for k in results["decoder"])
    assert not any(k.startswith("clip_score") for k in results["cascade"])  # no CLIP to score with


def test_eval_on_a_set_without_a_stages_image_sizes_is_one_line_before_any_stage_runs(imagen_bundle, tmp_path):
    """The set holds 64 px images only: sr256 needs 256 too. The decoder, first in line, is not evaluated
    and no report is written (it used to end in a traceback, "no validation samples", after the decoder)."""
    from bundle_helpers import write_embedded_shards
    from cascade.evaluation import evaluate_bundle

    data = write_embedded_shards(tmp_path / "data", train=2, val=4, d=32, dt=384, length=16)
    with pytest.raises(UserError, match=r"holds images at 64 px, and the sr256 stage needs 64, 256: .*--sizes 64,256"):
        evaluate_bundle(imagen_bundle, data, tmp_path / "eval", stages=["decoder", "sr256"], limit=4, one_object=9)
    assert not (tmp_path / "eval" / "eval.json").exists()


LAYOUT = "a big red star at the top left and a blue circle in the center"


def test_each_objects_guidance_term_acts_only_inside_its_cell():
    """Decoder.sample(regions=): eps_u + w (eps_c - eps_u) + W sum_k M_k (eps_k - eps_u), eps_k from the
    object's own phrase; outside every cell it is plain guidance exactly."""
    from cascade.diffusion.guidance import guided_denoise
    from cascade.layout import prompt_regions

    decoder = _awake(seeded_stage("decoder", **IMAGEN, steps=3)).eval()
    regions = prompt_regions(LAYOUT, 64)
    base = decoder.denoiser({"txt": [LAYOUT]})
    x, t = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)), torch.full((1,), 500)
    plain, _ = guided_denoise(base, x, t, 2.0)
    regional = decoder._regional(base, [regions], 2.0, 3.0)(x, t)
    first, second = (mask.bool() for _, mask in regions)
    outside = ~(first | second)
    assert torch.equal(regional[..., outside], plain[..., outside])
    eps_u = base(x, t, cond_mask=torch.zeros(1, dtype=torch.bool))
    eps_1 = decoder.denoiser({"txt": [regions[0][0]]})(x, t)
    only_first = first & ~second
    torch.testing.assert_close(regional[..., only_first], (plain + 3.0 * (eps_1 - eps_u))[..., only_first])
    assert not torch.allclose(regional[..., first], plain[..., first])


def test_per_object_terms_run_only_at_the_noisiest_share_of_the_timesteps():
    """region_share F: the objects' terms at t >= (1 - F) T, plain guidance (and no extra forward pass) below;
    the config's 0.25 by default, 1 every step."""
    from cascade.diffusion.guidance import guided_denoise
    from cascade.layout import prompt_regions

    decoder = _awake(seeded_stage("decoder", **IMAGEN, steps=4)).eval()
    assert decoder.config.region_share == 0.25
    regions = [prompt_regions(LAYOUT, 64)]
    base = decoder.denoiser({"txt": [LAYOUT]})
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    calls = []
    counted = decoder._regional(lambda *a, **k: calls.append(1) or base(*a, **k), regions, 2.0, 3.0, 0.25)
    for t, regional in ((749, False), (750, True), (999, True)):
        plain, _ = guided_denoise(base, x, torch.full((1,), t), 2.0)
        got = counted(x, torch.full((1,), t))
        assert torch.equal(got, plain) != regional, t
    every = decoder._regional(base, regions, 2.0, 3.0, 1.0)(x, torch.full((1,), 0))
    assert not torch.equal(every, guided_denoise(base, x, torch.full((1,), 0), 2.0)[0])
    # sampling: the default share (the config's) is 0.25, neither plain guidance nor the terms at every step
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    plain = decoder.sample({"txt": [LAYOUT]}, guidance=2.0, noise=noise)
    early = decoder.sample({"txt": [LAYOUT]}, guidance=2.0, noise=noise, regions=regions)
    torch.testing.assert_close(early, decoder.sample({"txt": [LAYOUT]}, guidance=2.0, noise=noise, regions=regions,
                                                     region_share=0.25))
    always = decoder.sample({"txt": [LAYOUT]}, guidance=2.0, noise=noise, regions=regions, region_share=1.0)
    assert not torch.allclose(early, plain) and not torch.allclose(early, always)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(UserError, match="region share"):
            decoder.sample({"txt": [LAYOUT]}, noise=noise, regions=regions, region_share=bad)


def test_regions_sample_per_row_and_their_mistakes_are_one_line():
    from cascade.layout import prompt_regions

    decoder = _awake(seeded_stage("decoder", **IMAGEN, steps=3)).eval()
    noise = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = [LAYOUT, PROMPTS[1]]
    plain = decoder.sample({"txt": prompts}, guidance=2.0, noise=noise)
    layout = [prompt_regions(LAYOUT, 64), None]
    torch.testing.assert_close(decoder.sample({"txt": prompts}, guidance=2.0, noise=noise, regions=layout,
                                              region_guidance=0.0), plain)
    regional = decoder.sample({"txt": prompts}, guidance=2.0, noise=noise, regions=layout, region_guidance=2.0)
    assert not torch.allclose(regional[0], plain[0])
    torch.testing.assert_close(regional[1], plain[1])  # a row without a layout samples as without regions
    with pytest.raises(UserError, match="one entry per image"):
        decoder.sample({"txt": prompts}, regions=layout[:1])
    with pytest.raises(UserError, match=r"must be \(64, 64\)"):
        decoder.sample({"txt": prompts}, regions=[[("a red star", torch.ones(32, 32))], None])
    with pytest.raises(UserError, match="do not combine"):
        decoder.sample({"txt": prompts}, regions=layout, init=plain)
    unclip = seeded_stage("decoder", **{**DECODER, "steps": 2}).eval()
    cond = {"clip_image": torch.randn(1, unclip.config.clip_dim)}
    with pytest.raises(UserError, match="Imagen-style decoder"):
        unclip.sample(cond, regions=[prompt_regions(LAYOUT, 64)])


def test_generate_with_regions_in_the_pipeline_and_the_cli(imagen_bundle, tmp_path, capsys):
    from cascade.cli import main
    from cascade.pipeline import Cascade, Settings

    cascade = Cascade.from_bundle(imagen_bundle, ("decoder",))
    settings = Settings(steps={"decoder": 2})
    relation = "a red star above a blue circle"
    prompts = [LAYOUT, relation, "a red star"]
    plain = cascade.generate(prompts, seed=1, until="decoder", settings=settings).images["decoder"]
    regional = cascade.generate(prompts, seed=1, until="decoder", settings=settings, regions=2.0).images["decoder"]
    assert not torch.allclose(regional[0], plain[0]) and not torch.allclose(regional[1], plain[1])
    torch.testing.assert_close(regional[2], plain[2])  # one object: sampled as without
    # a relation: the decoder reads the planned layout's caption, and each object is guided in its cell
    decoder, noise = cascade.stages["decoder"], torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    planned = "a red star at the top and a blue circle at the bottom"
    from cascade.layout import prompt_regions
    expected = decoder.sample({"txt": [planned]}, steps=2, noise=noise, regions=[prompt_regions(planned, 64)],
                              region_guidance=2.0)
    seen = []
    real_sample = decoder.sample

    def spy(cond, **kwargs):
        seen.append(list(cond["txt"]))
        return real_sample(cond, **{**kwargs, "noise": noise})
    decoder.sample = spy
    try:
        got = cascade.generate([relation], seed=1, until="decoder", settings=settings, regions=2.0).images["decoder"]
    finally:
        del decoder.sample
    assert seen == [[planned]]
    torch.testing.assert_close(got, expected)
    args = ["generate", "--model", str(imagen_bundle), "--until", "decoder", "--steps", "decoder=2", "--quiet"]
    assert main([*args, "--prompt", LAYOUT, "--regions", "2", "--out", str(tmp_path / "r")]) == 0
    from PIL import Image
    (grid,) = (tmp_path / "r").glob("*-grid.png")
    assert Image.open(grid).info.get("regions") == "2" and "layout_prompt" not in Image.open(grid).info
    assert Image.open(grid).info.get("regions_share") == "0.25"  # the config's, as it ran
    assert main([*args, "--prompt", LAYOUT, "--regions", "2", "--regions-share", "1", "--out", str(tmp_path / "r1")]) == 0
    (grid1,) = (tmp_path / "r1").glob("*-grid.png")
    assert Image.open(grid1).info.get("regions_share") == "1"
    every = cascade.generate([LAYOUT], seed=1, until="decoder", settings=settings, regions=2.0,
                             region_share=1.0).images["decoder"]
    assert not torch.allclose(every[0], regional[0])  # the share reaches the decoder
    assert main([*args, "--prompt", relation, "--regions", "2", "--out", str(tmp_path / "rel")]) == 0
    (grid,) = (tmp_path / "rel").glob("*-grid.png")
    assert Image.open(grid).info.get("layout_prompt") == planned and Image.open(grid).info["prompt"] == relation
    capsys.readouterr()
    for prompt, value, message in (("a red star above a circle at the top", "2", "places two by a relation"),
                                   (PROMPTS[0], "2", "two or more objects"), (LAYOUT, "-1", "--regions -1")):
        assert main([*args, "--prompt", prompt, "--regions", value, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    for extra, message in ((["--regions-share", "0.5"], "give --regions too"),
                           (["--regions", "2", "--regions-share", "0"], "--regions-share 0: must be above 0")):
        assert main([*args, "--prompt", LAYOUT, *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    unclip = small_bundle(tmp_path / "unclip")
    assert main(["generate", "--model", str(unclip), "--until", "decoder", "--steps", "decoder=2,prior=2", "--quiet",
                 "--prompt", LAYOUT, "--regions", "2", "--out", str(tmp_path / "u")]) == 2
    assert "Imagen-style bundle" in capsys.readouterr().err


def test_eval_scores_binding_with_and_without_per_object_guidance(imagen_bundle, tmp_path, capsys, monkeypatch):
    """`cascade eval --binding --regions W`: the benchmark twice on one load, the second at W (the same noise),
    its figure a column each; --regions without --binding, out of range or on an unCLIP bundle: one line."""
    import cascade.binding
    from bundle_helpers import write_embedded_shards
    from cascade.bundle import write_manifest
    from cascade.cli import main

    bare = tmp_path / "bare"
    shutil.copytree(imagen_bundle, bare, ignore=shutil.ignore_patterns("clip", "sr256", "sr1024"))
    write_manifest(bare)
    data = write_embedded_shards(tmp_path / "data", train=2, val=4, d=32, dt=384, length=16)
    asked, real = [], cascade.binding.generate_cases

    def spy(cascade_, cases, **kwargs):
        asked.append((kwargs.get("regions"), kwargs["seed"], len(cases)))
        return real(cascade_, cases, **kwargs)

    monkeypatch.setattr(cascade.binding, "generate_cases", spy)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(bare), "--data", str(data), "--out", str(out), "--stages", "decoder",
                 "--limit", "2", "--one-object", "0", "--binding", "--regions", "2",
                 "--holdout-pairs", "red:star,blue:circle"]) == 0
    results = json.loads((out / "eval.json").read_text())
    from cascade.binding import binding_cases
    from cascade.data.shapes import parse_pairs
    n = len(binding_cases(parse_pairs("red:star,blue:circle")))
    assert asked == [(None, 0, n), (2.0, 0, n)]
    assert results["binding_regions"]["regions"] == 2.0 and results["binding"]["images"] == n
    assert results["binding_regions"]["region_share"] == 0.25  # the decoder config's, as it ran
    assert {"binding_acc", "relation_acc", "count_acc"} <= set(results["binding_regions"])
    from PIL import Image
    assert Image.open(out / "binding.png").width >= 3 * 3 * 64  # asked, plain, --regions: three 3x tiles
    capsys.readouterr()
    unclip = small_bundle(tmp_path / "unclip")
    for model, args, message in ((bare, ["--regions", "2"], "needs --binding"),
                                 (bare, ["--binding", "--regions", "-1"], "--regions -1"),
                                 (unclip, ["--binding", "--regions", "2"], "an unCLIP decoder")):
        assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_the_studio_generates_with_per_object_guidance_like_the_cli(imagen_bundle, tmp_path):
    """The web studio's generate job takes `regions` for an Imagen-style bundle: the pipeline's images, the
    CLI's text chunks (layout_prompt for a relation); a prompt without a layout or a bad scale: one line."""
    from serve_helpers import call_json, open_png, running, wait_for_job

    from cascade.images import to_pil
    from cascade.pipeline import Cascade, Settings
    from cascade.serve.studio import Studio

    cascade = Cascade.from_bundle(imagen_bundle, ("decoder",))
    relation = "a red star to the left of a blue circle"
    with running(Studio(cascade, str(imagen_bundle))) as base:
        info = call_json(f"{base}/api/info")[1]
        assert info["text_only"] is True and info["region_share"] == 0.25
        body = {"kind": "generate", "prompt": relation, "until": "decoder", "num_images": 1, "seed": 4,
                "steps": {"decoder": 2}, "regions": 2.5}
        status, job = call_json(f"{base}/api/jobs", body=body)
        assert status == 202 and job["stages"] == ["decoder"]  # text -> decoder: no prior
        job = wait_for_job(base, job["id"])
        assert job["state"] == "done"
        from serve_helpers import call
        data = call(f"{base}/api/images/{job['images'][0]}.png")[2]
        want = cascade.generate([relation], seed=4, until="decoder", settings=Settings(steps={"decoder": 2}),
                                regions=2.5).final[0]
        assert np.array_equal(np.asarray(open_png(data).convert("RGB")), np.asarray(to_pil(want)))
        text = open_png(data).text
        assert text["regions"] == "2.5" and text["regions_share"] == "0.25" and text["prompt"] == relation
        assert text["layout_prompt"] == "a red star on the left and a blue circle on the right"
        # the share the terms run at: the form's, else the config's
        status, job = call_json(f"{base}/api/jobs", body={**body, "regions_share": 1})
        data = call(f"{base}/api/images/{wait_for_job(base, job['id'])['images'][0]}.png")[2]
        every = cascade.generate([relation], seed=4, until="decoder", settings=Settings(steps={"decoder": 2}),
                                 regions=2.5, region_share=1.0).final[0]
        assert np.array_equal(np.asarray(open_png(data).convert("RGB")), np.asarray(to_pil(every)))
        assert open_png(data).text["regions_share"] == "1" and not torch.equal(every, want)
        # the page's other text jobs run on such a bundle too (no prior to wait for)
        from PIL import Image
        from serve_helpers import png
        _, item = call_json(f"{base}/api/uploads?name=in.png&kind=image", body=png(Image.new("RGB", (64, 64), "white")),
                            content_type="image/png")
        status, job = call_json(f"{base}/api/jobs", body={"kind": "img2img", "image": item["id"], "prompt": relation,
                                                          "until": "decoder", "steps": {"decoder": 2}, "seed": 1})
        assert status == 202 and job["stages"] == ["decoder"] and wait_for_job(base, job["id"])["state"] == "done"
        for change, message in (({"prompt": "a red star"}, "regions needs a prompt of two or more objects"),
                                ({"regions": "x"}, "regions must be a number"), ({"regions": 99}, "regions 99"),
                                ({"regions_share": 0}, "regions_share 0: must be above 0"),
                                ({"regions": "", "regions_share": 0.5}, "give regions too")):
            status, answer = call_json(f"{base}/api/jobs", body={**body, **change})
            assert status == 400 and message in answer["error"], answer
