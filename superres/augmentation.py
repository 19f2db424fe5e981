"""Noise-conditioning augmentation (Ho et al. 2022, "Cascaded Diffusion Models", section 4.2; Imagen,
Saharia et al. 2022, section 2.5).

The low-resolution input is corrupted by a forward-diffusion step at an augmentation level s in [0, 1]
of the cascade's own noise schedule, z_s = sqrt(alpha_bar(s)) x + sqrt(1 - alpha_bar(s)) eps, and the
network is told s. Training draws s at random, so the upsampler learns to ignore the artefacts of the
stage before it; at sampling s is a knob (Imagen uses 0.2 on this scale) swept in the eval.

alpha_bar(s) interpolates the schedule's T values with alpha_bar(0) = 1 prepended, at fractional
index s * T, so s = 0 is exactly the identity and s = 1 is the schedule's last, nearly pure-noise step.
"""
from __future__ import annotations

import torch

from cascade.diffusion import NoiseSchedule
from cascade.diffusion.noise import randn


def alpha_bar_at_level(schedule: NoiseSchedule, level: torch.Tensor) -> torch.Tensor:
    """alpha_bar(s) for levels s in [0, 1], linear between the schedule's steps; (B,) -> (B,) float64."""
    grid = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod])  # (T + 1,)
    pos = level.double().clamp(0.0, 1.0).cpu() * schedule.timesteps
    lo = pos.floor().long().clamp(max=schedule.timesteps - 1)
    frac = pos - lo
    return (grid[lo] * (1 - frac) + grid[lo + 1] * frac).to(level.device)


def noise_augment(x: torch.Tensor, level: torch.Tensor, schedule: NoiseSchedule,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """z_s = sqrt(alpha_bar(s)) x + sqrt(1 - alpha_bar(s)) eps for x (B, C, H, W), level (B,) in [0, 1];
    eps is `noise` (broadcasting against x) when given, else drawn from `generator`."""
    ab = alpha_bar_at_level(schedule, level).to(x.dtype).view(-1, 1, 1, 1)
    noise = randn(x.shape, generator, x.device, x.dtype) if noise is None else noise.to(x.device, x.dtype)
    return ab.sqrt() * x + (1 - ab).sqrt() * noise
