"""The embedding maths of DALL-E 2's image manipulations (Ramesh et al. 2022, section 3):

- interpolations: slerp between two image embeddings (section 3.2);
- text diffs: with z_d = normalize(z_t(to) - z_t(from)), slerp z_i towards z_d by an angle fraction
  theta (section 3.3; they use theta in [0.25, 0.50]).

The manipulations themselves (decoding these embeddings with the decoder noise held fixed, then the
super-resolution stages) are `cascade.pipeline.Cascade.vary / interpolate / textdiff`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between unit vectors a, b (..., D) at fraction t: sin((1-t)W)/sin W a + sin(tW)/sin W b.

    t may be a scalar or a tensor broadcasting against a[..., :1] (e.g. (N, 1) for N points).
    Returns unit vectors; t = 0 gives a and t = 1 gives b exactly. Nearly parallel inputs fall back to
    normalised linear interpolation, where the formula is 0/0.
    """
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.ndim == 0:
        if float(t) == 0.0:
            return a
        if float(t) == 1.0:
            return b
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(parallel, t, torch.sin(t * omega) / safe)
    return F.normalize(wa * a + wb * b, dim=-1)


def text_diff_direction(text_from: torch.Tensor, text_to: torch.Tensor) -> torch.Tensor:
    """z_d = normalize(z_t(to) - z_t(from)), (..., D): the CLIP text-diff vector."""
    return F.normalize(text_to - text_from, dim=-1)


def text_diff(image_emb: torch.Tensor, text_from: torch.Tensor, text_to: torch.Tensor,
              theta: float | torch.Tensor) -> torch.Tensor:
    """The image embedding moved towards the text diff: slerp(z_i, z_d, theta), (..., D)."""
    return slerp(image_emb, text_diff_direction(text_from, text_to), theta)
