"""DALL-E 2's image manipulations as primitives (Ramesh et al. 2022, section 3):

- variations: decode the same z_i with different noise;
- interpolations: slerp between two image embeddings, decoding each with the SAME noise x_T so that
  only the embedding changes (section 3.2);
- text diffs: with z_d = normalize(z_t(to) - z_t(from)), slerp z_i towards z_d by an angle fraction
  theta (section 3.3; they use theta in [0.25, 0.50]).

Deterministic samplers (DDIM with eta 0, DPM-Solver++) make decode() a function of (z_i, text, x_T).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def fixed_noise(stage, batch_size: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_T (B, 3, S, S) for `decode`, to be reused across calls."""
    s = stage.config.image_size
    return torch.randn(batch_size, 3, s, s, generator=generator)


def decode(stage, image_emb: torch.Tensor, text: dict[str, torch.Tensor] | None = None, *,
           noise: torch.Tensor, sampler: str = "ddim", steps: int = 50, guidance: float = 1.0,
           threshold: str | float | None = None) -> torch.Tensor:
    """Images (B, 3, S, S) from image embeddings (B, D) and optional text {"clip_tokens", "clip_mask"}.

    `noise` is x_T, (B, 3, S, S) or (1, 3, S, S) shared by every row; the sampler must be
    deterministic for the result to be a function of its inputs.
    """
    conditioning: dict[str, Any] = {"clip_image": image_emb}
    if text is not None:
        b = image_emb.shape[0]
        conditioning.update({k: v.expand(b, *v.shape[1:]) for k, v in text.items()
                             if k in ("clip_tokens", "clip_mask")})
    return stage.sample(conditioning, sampler=sampler, steps=steps, guidance=guidance, threshold=threshold,
                        noise=noise, eta=0.0)


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


def interpolate(stage, a: torch.Tensor, b: torch.Tensor, n: int, *, noise: torch.Tensor, **decode_kwargs
                ) -> torch.Tensor:
    """n images (n, 3, S, S) decoded from slerp(a, b, t) for t evenly spaced in [0, 1], all from one x_T.

    a, b: (D,) or (1, D) image embeddings; noise: (1, 3, S, S).
    """
    t = torch.linspace(0.0, 1.0, n)[:, None]
    return decode(stage, slerp(a.reshape(1, -1), b.reshape(1, -1), t), noise=noise, **decode_kwargs)
