"""The super-resolution stages' evaluation: PSNR and SSIM against the real high-res image, beside
bicubic upsampling, swept over augmentation level and step count, per data source."""
from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F

from cascade.batches import balanced_batch
from cascade.errors import UserError
from cascade.progress_bars import ImageBar
from superres.metrics import bicubic_upsample, psnr, ssim


def eval_pairs(stage, batches, limit: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], list[str]]:
    """Up to `limit` clean (low, high) pairs, split evenly over the sources present (the batches'
    `source` column), each cut to its most detailed eval_crop; plus the conditioning for `stage.sample`
    and the source of every pair."""
    picked = balanced_batch(batches, limit, max_batches=None)
    if picked is None:
        raise UserError("no validation images to evaluate on")
    low, high = picked[f"image_{stage.low_size}"], picked[f"image_{stage.high_size}"]
    sources = list(picked.get("source") or [""] * len(low))
    crop = stage.config.eval_crop
    if crop is not None and crop < stage.high_size:
        low, high = detailed_crops(low, high, crop // stage.scale, stage.scale)
    cond = {"low_res": low}
    if stage.config.text:
        cond.update(clip_tokens=picked["clip_tokens"].float(), clip_mask=picked["clip_mask"].bool())
    return low, high, cond, sources


@torch.no_grad()
def evaluate_superres(stage, batches, generator: torch.Generator) -> dict[str, float]:
    """PSNR (dB, capped at 100) and SSIM against the real high-res image for bicubic and for every
    (aug level, steps), on up to eval_images pairs split evenly over the val sources.

    Keys: psnr_bicubic, ssim_bicubic, psnr_aug{s}_steps{n}, ssim_aug{s}_steps{n}, psnr_best /
    ssim_best over the sweep; with more than one source, also psnr_bicubic_{source},
    psnr_best_{source} (and ssim_) for each source named in the batches (e.g. "shapes", "emoji").
    """
    c = stage.config
    low, high, cond, sources = eval_pairs(stage, batches, c.eval_images)
    bicubic = bicubic_upsample(low, high.shape[-1])
    scores = {"bicubic": (psnr(bicubic, high), ssim(bicubic, high))}
    seed = int(torch.randint(2 ** 31, (), generator=generator))
    # a one-pass regressor (objective l1 / l2) reads no noise and takes no steps: one setting
    sweep = [(0.0, 1)] if c.objective != "diffusion" else list(itertools.product(c.eval_aug_levels, c.eval_steps))
    with ImageBar(len(sweep) * len(low), f"{stage.name}: upsampling the val crops") as bar:
        for level, steps in sweep:
            g = torch.Generator().manual_seed(seed)  # the same noise for every setting of the sweep
            out = stage.sample(cond, steps=steps, generator=g, aug_level=level,
                               callback=bar.steps(len(low), steps)).cpu()
            bar.done()
            scores[f"aug{level:g}_steps{steps}"] = (psnr(out, high), ssim(out, high))
    groups = {"": torch.ones(len(low), dtype=torch.bool)}
    if len(set(sources)) > 1:
        groups.update({f"_{name}": torch.tensor([s == name for s in sources]) for name in sorted(set(sources))})
    sweep = [k for k in scores if k != "bicubic"]
    metrics = {}
    for suffix, rows in groups.items():
        # every setting overall; per source only bicubic and the best of the sweep
        for key in scores if not suffix else ["bicubic"]:
            metrics[f"psnr_{key}{suffix}"] = scores[key][0][rows].mean().item()
            metrics[f"ssim_{key}{suffix}"] = scores[key][1][rows].mean().item()
        metrics[f"psnr_best{suffix}"] = max(scores[k][0][rows].mean().item() for k in sweep)
        metrics[f"ssim_best{suffix}"] = max(scores[k][1][rows].mean().item() for k in sweep)
        metrics[f"eval_images{suffix}"] = float(rows.sum())
    return metrics


def detailed_crops(low: torch.Tensor, high: torch.Tensor, crop: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the aligned (low crop x crop, high crop*scale square) pair whose low-res crop has the
    most edge energy (`detailed_positions`). A centre crop of a shapes scene is often flat background,
    where every upsampler is exact (PSNR inf) and the eval would say nothing."""
    at = detailed_positions(low, crop)
    return crop_at(low, at, crop, 1), crop_at(high, at, crop, scale)


def detailed_positions(low: torch.Tensor, crop: int) -> list[tuple[int, int]]:
    """Per image of `low` (B, C, H, W), the top left (y, x) of its crop x crop window with the most edge
    energy (sum of absolute neighbour differences), searched on a grid of stride crop / 4."""
    stride = max(1, crop // 4)
    edges = torch.zeros(low.shape[0], 1, *low.shape[-2:])
    edges[..., :, 1:] += (low[..., :, 1:] - low[..., :, :-1]).abs().sum(1, keepdim=True)
    edges[..., 1:, :] += (low[..., 1:, :] - low[..., :-1, :]).abs().sum(1, keepdim=True)
    energy = F.avg_pool2d(edges, crop, stride=stride)  # (B, 1, ny, nx): windows at multiples of stride
    nx = energy.shape[-1]
    return [((b // nx) * stride, (b % nx) * stride) for b in energy.flatten(1).argmax(1).tolist()]


def crop_at(images: torch.Tensor, positions: list[tuple[int, int]], crop: int, scale: int) -> torch.Tensor:
    """The crop*scale squares of `images` at `positions` (found at 1/scale of their size), one per image."""
    side = crop * scale
    return torch.stack([image[:, y * scale:y * scale + side, x * scale:x * scale + side]
                        for image, (y, x) in zip(images, positions)])


@torch.no_grad()
def evaluate_chain(sr256, sr1024, batches, generator: torch.Generator, limit: int = 8) -> dict[str, float]:
    """The cascade's own super-resolution score: on up to `limit` val images (even over sources) with real
    detail at 1024 (`sr1024.keeps`), each cut to its most detailed aligned crop (sr1024's eval_crop at
    1024), PSNR / SSIM against the real 1024 image of
      sr1024 on the real 256 image (what `evaluate_superres` scores),
      sr1024 on sr256's output from the real 64 image (what the cascade feeds it),
      and bicubic from 256 and from 64 beside them; and at 256, sr256 on the real 64 against bicubic.
    Every stage samples with its config's defaults (sampler, steps, aug_level), as the pipeline does.
    Keys: psnr_chain, psnr_sr1024_real_input, psnr_bicubic_from256, psnr_bicubic_from64, psnr_sr256
    (at 256), psnr_bicubic_64_to_256, the same with ssim_, and chain_images."""
    picked = balanced_batch(batches, limit, max_batches=None)
    if picked is None:
        raise UserError("no validation images with 64, 256 and 1024 versions to evaluate the SR chain on")
    x64, x256, x1024 = picked["image_64"], picked["image_256"], picked["image_1024"]
    crop = sr1024.config.eval_crop or 1024
    if crop < 1024:  # the most detailed crop, found at 64 and cut alike at every size
        at = detailed_positions(x64, crop // 16)
        x64, x256, x1024 = (crop_at(x, at, crop // 16, scale) for x, scale in ((x64, 1), (x256, 4), (x1024, 16)))
    seed = int(torch.randint(2 ** 31, (), generator=generator))
    with ImageBar(2 * len(x64), "the SR chain: 64 -> sr256 -> sr1024") as bar:
        mid = sr256.sample({"low_res": x64}, generator=torch.Generator().manual_seed(seed),
                           callback=bar.steps(len(x64), sr256.config.steps)).cpu()
        bar.done()
        chain = sr1024.sample({"low_res": mid}, generator=torch.Generator().manual_seed(seed),
                              callback=bar.steps(len(x64), sr1024.config.steps)).cpu()
        bar.done()
    real = sr1024.sample({"low_res": x256}, generator=torch.Generator().manual_seed(seed)).cpu()
    pairs = {"chain": (chain, x1024), "sr1024_real_input": (real, x1024),
             "bicubic_from256": (bicubic_upsample(x256, x1024.shape[-1]), x1024),
             "bicubic_from64": (bicubic_upsample(x64, x1024.shape[-1]), x1024),
             "sr256": (mid, x256), "bicubic_64_to_256": (bicubic_upsample(x64, x256.shape[-1]), x256)}
    metrics = {"chain_images": float(len(x64))}
    for key, (out, target) in pairs.items():
        metrics[f"psnr_{key}"] = psnr(out, target).mean().item()
        metrics[f"ssim_{key}"] = ssim(out, target).mean().item()
    return metrics
