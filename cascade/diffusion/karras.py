"""Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") samplers on
our discrete variance-preserving schedules: Euler (their Algorithm 1 with first-order steps), Heun
(Algorithm 1), and Euler ancestral, all in the sigma parameterisation.

A VP state x_t = alpha_t x0 + sigma'_t eps is the VE state x = x_t / alpha_t at noise level
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t); the probability-flow ODE there is
dx / dsigma = (x - D(x; sigma)) / sigma with D the denoised estimate (our x0_hat). The samplers walk
the kept steps of a respaced schedule (usually on the Karras grid, `NoiseSchedule.respace(k,
"karras")`) and then to sigma = 0, where x is the last D. The network is called on the VP state
x / sqrt(1 + sigma^2) at the kept step's index, so a sigma always matches a timestep it was trained on.

Euler ancestral adds noise after each step: sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) /
sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2) (k-diffusion's split at eta = 1): an Euler step
to sigma_down, then N(0, sigma_up^2) noise.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from cascade.diffusion.denoiser import DenoiserOutput
from cascade.diffusion.noise import randn
from cascade.diffusion.noise_schedule import NoiseSchedule
from cascade.diffusion.step_loop import descending_steps


def sigmas_of(schedule: NoiseSchedule) -> list[float]:
    """sigma_i = sqrt((1 - alpha_bar_i) / alpha_bar_i) at each index of `schedule` (increasing in i)."""
    return [math.sqrt((1.0 - a) / a) for a in schedule.alphas_cumprod.tolist()]


def sample_karras(model: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput], x: torch.Tensor,
                  schedule: NoiseSchedule, *, method: str = "euler", generator: torch.Generator | None = None,
                  callback: Callable[[dict], None] | None = None, progress: bool = False,
                  replace: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Run `method` ("euler", "heun" or "euler_a") from x = x_T (B, ...) (VP, unit variance) down to
    x_0; model(x_vp, i) at respaced index i. Heun evaluates the model twice per step except the last.
    `replace(x_vp, i)`, when given, may change the VP state before each step (inpainting)."""
    if method not in ("euler", "heun", "euler_a"):
        raise ValueError(f"unknown Karras sampler '{method}'")
    sigmas = sigmas_of(schedule)
    n = schedule.timesteps
    x = x * math.sqrt(1.0 + sigmas[-1] ** 2)  # the VE state at the first (largest) sigma

    def denoised(x_ve: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((x_ve.shape[0],), i, dtype=torch.long, device=x_ve.device)
        return model(x_ve / math.sqrt(1.0 + sigmas[i] ** 2), t).x0

    for i in descending_steps(n, progress, method):
        sigma, sigma_next = sigmas[i], (sigmas[i - 1] if i > 0 else 0.0)
        if replace is not None:
            scale = math.sqrt(1.0 + sigma**2)
            x = replace(x / scale, i) * scale
        x0 = denoised(x, i)
        d = (x - x0) / sigma
        if method == "euler_a" and sigma_next > 0:
            up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
            down = math.sqrt(sigma_next**2 - up**2)
            x = x + (down - sigma) * d + up * randn(x.shape, generator, x.device, x.dtype)
        else:
            x_next = x + (sigma_next - sigma) * d
            if method == "heun" and sigma_next > 0:
                d_next = (x_next - denoised(x_next, i - 1)) / sigma_next
                x_next = x + (sigma_next - sigma) * (d + d_next) / 2
            x = x_next
        if callback is not None:
            callback({"x": x / math.sqrt(1.0 + sigma_next**2), "i": i, "x0": x0})
    return x
