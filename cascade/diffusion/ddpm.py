"""Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), over any respaced schedule.

Each step draws x_{t-1} ~ N(mu~_t(x0_hat, x_t), sigma_t^2 I): the posterior mean (eq. 7) at the
predicted x0, which equals Algorithm 2's eps form when x0_hat comes from eps. The variance is
beta~_t ("small", the posterior's), beta_t ("large"; Ho et al. Sec. 3.2 found both work), or the
network's learned interpolation (Nichol & Dhariwal eq. 15) when it returns one.
"""
from __future__ import annotations

from typing import Callable

import torch

from cascade.diffusion.denoiser import DenoiserOutput
from cascade.diffusion.forward_process import q_posterior_mean_variance
from cascade.diffusion.learned_variance import fixed_large_log_variance, interpolated_log_variance
from cascade.diffusion.noise import randn
from cascade.diffusion.noise_schedule import NoiseSchedule
from cascade.diffusion.step_loop import descending_steps


def ddpm_step(model: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput], x: torch.Tensor, i: int,
              schedule: NoiseSchedule, *, large: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, DenoiserOutput]:
    """One step of Algorithm 2 from x at respaced index i to i - 1 (to x_0 at i = 0): (x_prev, model output).
    `large`: `fixed_large_log_variance(schedule)` for the beta_t variance, None for beta~_t."""
    t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
    out = model(x, t)
    mean, _, log_variance = q_posterior_mean_variance(schedule, out.x0, x, t)
    if out.variance_out is not None:
        log_variance = interpolated_log_variance(schedule, out.variance_out, t)
    elif large is not None:
        log_variance = torch.full_like(x, float(large[i]))
    if i == 0:
        return mean, out  # the last step returns the mean (Algorithm 2, z = 0 at t = 1)
    return mean + torch.exp(0.5 * log_variance) * randn(x.shape, generator, x.device, x.dtype), out


def sample_ddpm(model: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput], x: torch.Tensor,
                schedule: NoiseSchedule, *, variance: str = "small", generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None, progress: bool = False,
                replace: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Run Algorithm 2 from x = x_T (B, ...) down to x_0; model(x, i) at respaced index i. `replace(x, i)`,
    when given, may change x before each step (inpainting puts the known region there)."""
    if variance not in ("small", "large"):
        raise ValueError(f"ddpm variance must be 'small' or 'large', got {variance!r}")
    large = fixed_large_log_variance(schedule) if variance == "large" else None
    for i in descending_steps(schedule.timesteps, progress, "ddpm"):
        if replace is not None:
            x = replace(x, i)
        x, out = ddpm_step(model, x, i, schedule, large=large, generator=generator)
        if callback is not None:
            callback({"x": x, "i": i, "x0": out.x0})
    return x
