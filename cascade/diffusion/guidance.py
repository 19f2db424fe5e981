"""Classifier-free guidance (Ho & Salimans 2022, eq. 6; GLIDE, Nichol et al. 2022, Sec. 2.3).

eps~ = eps_u + w (eps_c - eps_u). w = 1 is the plain conditional model and w = 0 the unconditional
one; texts that write (1 + omega) eps_c - omega eps_u have omega = w - 1. Both halves come from ONE
batched forward pass: the network sees cat([x, x]) with cond_mask True on the first half, and must
drop its conditioning where cond_mask is False.
"""
from __future__ import annotations

from typing import Callable

import torch

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def split_output(out: Output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eps, learned-variance output or None) from what a `denoise` function returned."""
    if isinstance(out, tuple):
        eps, variance_out = out
        return eps, variance_out
    return out, None


def repeat_to_batch(batch: int, *conditioning: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each conditioning tensor (B, ...) repeated along dim 0 to `batch` rows (None stays None).

    A guided sampler calls denoise(cat([x, x]), ...) on 2B rows (see `guided_denoise`): row r of that
    batch belongs to conditioning row r % B, which is what repeating gives."""
    out = []
    for c in conditioning:
        if c is not None:
            if batch % c.shape[0]:
                raise ValueError(f"a batch of {batch} rows is not a whole number of {c.shape[0]}-row conditionings")
            c = c.repeat(batch // c.shape[0], *([1] * (c.dim() - 1)))
        out.append(c)
    return out


def combine_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Ho & Salimans 2022, eq. 6 with w = 1 + their omega: eps_u + w (eps_c - eps_u)."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def guided_denoise(denoise: Callable[..., Output], x: torch.Tensor, t: torch.Tensor, w: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps (guided when w is not None and w != 1) and the conditional half's variance output, if any.

    x: (B, ...), t: (B,) long. Guided, this calls denoise(cat[x, x], cat[t, t], cond_mask=m) once,
    m (2B,) bool True for the first B rows; unguided it calls denoise(x, t) without cond_mask.
    """
    if w is None or w == 1:
        return split_output(denoise(x, t))
    eps_cond, eps_uncond, variance_out = guidance_halves(denoise, x, t)
    return combine_guidance(eps_cond, eps_uncond, float(w)), variance_out


def guidance_halves(denoise: Callable[..., Output], x: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(eps_cond, eps_uncond, the conditional half's variance output or None) from ONE call
    denoise(cat[x, x], cat[t, t], cond_mask=m), m (2B,) bool True for the first B rows."""
    b = x.shape[0]
    cond_mask = torch.cat([torch.ones(b, dtype=torch.bool, device=x.device),
                           torch.zeros(b, dtype=torch.bool, device=x.device)])
    eps, variance_out = split_output(denoise(torch.cat([x, x]), torch.cat([t, t]), cond_mask=cond_mask))
    # The variance is not a score, so it is not extrapolated; GLIDE keeps the conditional one.
    return eps[:b], eps[b:], None if variance_out is None else variance_out[:b]
