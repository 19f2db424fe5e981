"""End to end: a few hundred steps of sr256 on shapes beat bicubic upsampling on held-out images."""
import random

import numpy as np
import pytest
import torch

from cascade.config import parse_config
from cascade.registry import get_stage

shapes = pytest.importorskip("cascade.data.shapes")


def _render(scene, size):
    return torch.from_numpy(np.asarray(shapes.render(scene, size)).copy()).permute(2, 0, 1).float() / 127.5 - 1


def _pairs(count, seed):
    rng = random.Random(seed)
    scenes = [shapes.make_scene(rng) for _ in range(count)]
    return [{"image_64": _render(s, 64), "image_256": _render(s, 256)} for s in scenes]


@pytest.mark.slow
def test_sr256_beats_bicubic_on_val_shapes():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cls = get_stage("sr256")
    config = parse_config(cls.Config, dict(
        base_channels=16, channel_mults=[1, 2, 4], num_res_blocks=[1, 1, 2], train_crop=64,
        prediction="x0", residual=True, train_aug_max=0.3, eval_images=8, eval_crop=128, eval_steps=[10],
        eval_aug_levels=[0.0, 0.2]))
    stage = cls(config)
    train, val = _pairs(64, seed=1), _pairs(8, seed=2)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(stage.parameters(), lr=1e-3)
    losses = []
    # 450 steps, not 300: on an AVX2-only CPU (AMD EPYC, 2026-12-07) oneDNN's other kernels round differently,
    # and at 300 steps the SSIM was 0.934 against bicubic's 0.942 (PSNR 29.20 against 28.45); at 450, 0.944
    for step in range(450):
        idx = torch.randint(len(train), (8,), generator=g).tolist()
        samples = [stage.preprocess(train[i], g) for i in idx]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("sr_low", "sr_high")}
        loss = stage.loss(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < np.mean(losses[:20])
    batches = [{k: torch.stack([s[k] for s in val]) for k in ("image_64", "image_256")}]
    stage.eval()
    m = stage.evaluate(batches, torch.Generator().manual_seed(0))
    print(m)
    assert m["psnr_aug0_steps10"] > m["psnr_bicubic"]
    assert m["ssim_aug0_steps10"] > m["ssim_bicubic"] - 0.005  # and no worse in structure
