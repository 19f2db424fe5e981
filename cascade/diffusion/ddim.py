"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with eq. 16).

x_{t-1} = sqrt(alpha_bar_{t-1}) x0_hat + sqrt(1 - alpha_bar_{t-1} - sigma_t^2) eps_hat + sigma_t z,
sigma_t = eta sqrt((1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_{t-1}).
eta = 0 is the deterministic sampler (a first-order solver of the probability-flow ODE); eta = 1
has DDPM's posterior variance. On a respaced schedule t-1 means the previous kept step.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from cascade.diffusion.denoiser import DenoiserOutput
from cascade.diffusion.noise import randn
from cascade.diffusion.noise_schedule import NoiseSchedule
from cascade.diffusion.step_loop import descending_steps


def ddim_step(model: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput], x: torch.Tensor, i: int,
              schedule: NoiseSchedule, *, eta: float = 0.0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, DenoiserOutput]:
    """One step of eq. 12 from x at respaced index i to i - 1 (to x_0 at i = 0): (x_prev, model output)."""
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    out = model(x, t)
    ab, ab_prev = float(schedule.alphas_cumprod[i]), float(schedule.alphas_cumprod_prev[i])
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))  # eq. 16
    x = math.sqrt(ab_prev) * out.x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * out.eps
    if sigma > 0:
        x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x, out


def sample_ddim(model: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput], x: torch.Tensor,
                schedule: NoiseSchedule, *, eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None, progress: bool = False,
                replace: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Run eq. 12 from x = x_T (B, ...) down to x_0; model(x, i) at respaced index i. `replace(x, i)`,
    when given, may change x before each step (inpainting puts the known region there)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i in descending_steps(schedule.timesteps, progress, "ddim"):
        if replace is not None:
            x = replace(x, i)
        x, out = ddim_step(model, x, i, schedule, eta=eta, generator=generator)
        if callback is not None:
            callback({"x": x, "i": i, "x0": out.x0})
    return x
