"""Decoder evaluation: the Fréchet distance's closed form, and evaluate() end to end on a small model."""
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
                                  sample_steps=2, eval_samples=6, eval_guidance=[1.0, 3.0])).eval()
    batches = [{"image_32": torch.rand(4, 3, 32, 32) * 2 - 1, "clip_image": F.normalize(torch.randn(4, 8), dim=-1),
                "json": [{}] * 4} for _ in range(3)]
    metrics = stage.evaluate(batches, torch.Generator().manual_seed(0))
    assert set(metrics) == {"fd_effnet@g1", "fd_effnet@g3"}
    assert all(np.isfinite(v) and v > 0 for v in metrics.values())


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
