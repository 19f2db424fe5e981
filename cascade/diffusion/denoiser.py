"""The sampler's view of a network: respaced index in, (eps, x0, variance output) out.

`Denoiser` wraps a user `denoise(x_t, t)` for one respaced schedule: it maps the sampler's index
i to the original timestep, applies classifier-free guidance, thresholds x0 and recomputes eps
from the thresholded x0 (Imagen Sec. 2.3), so every sampler sees a consistent (eps, x0) pair.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from cascade.diffusion.guidance import guided_denoise
from cascade.diffusion.noise_schedule import NoiseSchedule, on_device
from cascade.diffusion.parameterization import eps_to_x0, x0_to_eps
from cascade.diffusion.thresholding import apply_threshold


class DenoiserOutput(NamedTuple):
    eps: torch.Tensor  # (B, ...)
    x0: torch.Tensor  # (B, ...), thresholded when asked
    variance_out: torch.Tensor | None  # raw learned-variance output (see learned_variance), or None


class Denoiser:
    """Callable (x, i) -> DenoiserOutput for a respaced `schedule` whose index i is original step
    `kept_steps[i]` (as `NoiseSchedule.respace` returns them); `denoise(x_t, t)` receives the original t."""

    def __init__(self, denoise: Callable, schedule: NoiseSchedule, kept_steps: torch.Tensor, *,
                 guidance: float | None = None, threshold: str | float | None = None):
        self.denoise, self.schedule, self.kept_steps = denoise, schedule, kept_steps.long()
        self.guidance, self.threshold = guidance, threshold

    def __call__(self, x: torch.Tensor, i: torch.Tensor) -> DenoiserOutput:
        t = on_device(self.kept_steps, x.device, torch.long)[i]
        eps, variance_out = guided_denoise(self.denoise, x, t, self.guidance)
        x0 = eps_to_x0(self.schedule, x, i, eps)
        if self.threshold is not None:
            x0 = apply_threshold(x0, self.threshold)
            eps = x0_to_eps(self.schedule, x, i, x0)
        return DenoiserOutput(eps, x0, variance_out)
