"""Clipping the predicted x0 during sampling (Saharia et al. 2022, "Imagen", Sec. 2.3).

Static thresholding clips x0 to [-1, 1]. Dynamic thresholding takes s as the p-th percentile of
|x0| per sample, s = max(s, 1), and maps x0 to clip(x0, -s, s) / s, which pulls saturated pixels
inwards at high guidance weights instead of flattening them against the boundary.
"""
from __future__ import annotations

import torch


def static_threshold(x0: torch.Tensor) -> torch.Tensor:
    """Ho et al. 2020 / Imagen Sec. 2.3: clip x0 to [-1, 1]."""
    return x0.clamp(-1.0, 1.0)


def _per_sample_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated q-quantile of each row of (B, N) values, like torch.quantile, but by
    kthvalue so that it has no size limit (torch.quantile refuses inputs over 2^24 elements)."""
    n = values.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    v_lo = values.kthvalue(lo + 1, dim=1).values
    v_hi = values.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    return v_lo + (pos - lo) * (v_hi - v_lo)


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen Sec. 2.3: s = max(percentile_p(|x0|), 1) per sample; x0 -> clip(x0, -s, s) / s."""
    if not 0.0 < percentile < 1.0:
        raise ValueError(f"dynamic thresholding percentile must be in (0, 1), got {percentile}")
    s = _per_sample_quantile(x0.detach().abs().reshape(x0.shape[0], -1), percentile).clamp(min=1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))  # (B, 1, ..., 1)
    return torch.maximum(torch.minimum(x0, s), -s) / s


def apply_threshold(x0: torch.Tensor, threshold: str | float | None) -> torch.Tensor:
    """None: unchanged; "static": clip to [-1, 1]; a float p in (0, 1): dynamic at percentile p."""
    if threshold is None:
        return x0
    if threshold == "static":
        return static_threshold(x0)
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return dynamic_threshold(x0, float(threshold))
    raise ValueError(f"threshold must be None, 'static' or a percentile in (0, 1), got {threshold!r}")
