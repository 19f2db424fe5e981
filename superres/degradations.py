"""Image degradations for training the super-resolution stages (torch and PIL only).

The low-resolution input of a cascade stage at sampling time is the previous stage's output, not a
clean downsampled image, so the upsampler is trained on corrupted inputs:
- 64 -> 256: Gaussian blur (DALL-E 2, Ramesh et al. 2022, appendix C);
- 256 -> 1024: a mixed "BSR" degradation, blur, resize and JPEG in random order (Zhang et al. 2021,
  "Designing a Practical Degradation Model for Deep Blind Image Super-Resolution"), as DALL-E 2 did.
Gaussian noise, the third corruption, is applied as a forward-diffusion step in `superres.augmentation`.

Every function takes images (B, 3, H, W) or (3, H, W) in [-1, 1], returns the same shape, is the
identity at strength 0, keeps the output in [-1, 1], and draws randomness only from `generator`.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _batched(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x.dim() == 3:
        return x[None], True
    if x.dim() != 4:
        raise ValueError(f"expected an image (3, H, W) or a batch (B, 3, H, W), got shape {tuple(x.shape)}")
    return x, False


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def gaussian_kernel1d(sigma: float, radius: int | None = None) -> torch.Tensor:
    """Normalised samples of exp(-x^2 / 2 sigma^2) at x = -radius..radius (radius = ceil(3 sigma))."""
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders; sigma = 0 is the identity.

    The kernel is non-negative and sums to one, so every output pixel is a convex combination of
    input pixels and stays in the input's range.
    """
    if sigma <= 0:
        return x
    xb, squeeze = _batched(x)
    # reflect padding needs radius < size, so the kernel is clipped for tiny images
    r = min(max(1, math.ceil(3 * sigma)), xb.shape[-1] - 1, xb.shape[-2] - 1)
    k = gaussian_kernel1d(sigma, r).to(xb)
    c = xb.shape[1]
    h = F.pad(xb, (r, r, 0, 0), mode="reflect")
    h = F.conv2d(h, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    h = F.pad(h, (0, 0, r, r), mode="reflect")
    h = F.conv2d(h, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return h[0] if squeeze else h


def resize_down_up(x: torch.Tensor, factor: float, mode: str = "bilinear") -> torch.Tensor:
    """Downscale by `factor` (>= 1) with area averaging, then back to the input size with `mode`.

    factor = 1 is the identity; the result is clamped to [-1, 1] (bicubic overshoots).
    """
    if factor <= 1.0:
        return x
    xb, squeeze = _batched(x)
    h, w = xb.shape[-2:]
    small = (max(1, round(h / factor)), max(1, round(w / factor)))
    y = F.interpolate(xb, size=small, mode="area")
    kwargs = {} if mode in ("nearest", "area") else {"align_corners": False}
    y = F.interpolate(y, size=(h, w), mode=mode, **kwargs).clamp(-1.0, 1.0)
    return y[0] if squeeze else y


def jpeg(x: torch.Tensor, quality: int | None) -> torch.Tensor:
    """JPEG-compress and decode each image with PIL at `quality` (1..95); None is the identity.

    The round trip goes through 8-bit RGB, as a saved image would.
    """
    if quality is None:
        return x
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in 1..95 (or None for no compression), got {quality}")
    xb, squeeze = _batched(x)
    out = []
    for img in xb:
        arr = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        out.append(torch.from_numpy(dec.copy()).permute(2, 0, 1).to(xb) / 127.5 - 1.0)
    y = torch.stack(out)
    return y[0] if squeeze else y


def random_blur(x: torch.Tensor, level: float, generator: torch.Generator | None = None,
                max_sigma: float = 1.0) -> torch.Tensor:
    """Blur with sigma ~ U[0, level * max_sigma]; level 0 is the identity."""
    if level <= 0:
        return x
    return gaussian_blur(x, _uniform(0.0, level * max_sigma, generator))


def mixed_degradation(x: torch.Tensor, level: float, generator: torch.Generator | None = None, *,
                      max_sigma: float = 1.5, max_factor: float = 2.0, min_quality: int = 30) -> torch.Tensor:
    """BSR-style degradation (Zhang et al. 2021, section 3): blur, down-up resize and JPEG in a random order.

    `level` in [0, 1] scales every strength: blur sigma ~ U[0, level * max_sigma], resize factor
    ~ U[1, 1 + level * (max_factor - 1)] with a random interpolation, JPEG quality
    ~ U[95 - level * (95 - min_quality), 95]. Level 0 is the identity (no step runs at all).
    """
    if level <= 0:
        return x
    if level > 1:
        raise ValueError(f"degradation level must be in [0, 1], got {level}")
    steps = ["blur", "resize", "jpeg"]
    order = torch.randperm(len(steps), generator=generator).tolist()
    for i in order:
        step = steps[i]
        if step == "blur":
            x = gaussian_blur(x, _uniform(0.0, level * max_sigma, generator))
        elif step == "resize":
            factor = _uniform(1.0, 1.0 + level * (max_factor - 1.0), generator)
            modes = ("bilinear", "bicubic", "area")
            mode = modes[int(torch.randint(len(modes), (), generator=generator))]
            x = resize_down_up(x, factor, mode)
        else:
            quality = round(_uniform(95 - level * (95 - min_quality), 95.0, generator))
            x = jpeg(x, quality)
    return x
