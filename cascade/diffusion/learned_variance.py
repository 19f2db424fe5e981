"""Learned-range reverse variance (Nichol & Dhariwal 2021, "Improved DDPM", Sec. 3.1, eq. 15).

Sigma_theta(x_t, t) = exp(f log beta_t + (1 - f) log beta~_t), with the interpolation fraction
f = (variance_out + 1) / 2 taken from the network's raw extra output `variance_out` (the paper's v,
named apart from the velocity v of `parameterization`), as in improved-diffusion's code: a
zero-initialised output starts halfway between the two fixed choices (in log space), and f is not
clamped, so the network may leave the [beta~_t, beta_t] range if it needs to.
"""
from __future__ import annotations

import torch

from cascade.diffusion.noise_schedule import NoiseSchedule, broadcast_at


def interpolated_log_variance(schedule: NoiseSchedule, variance_out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log Sigma = f log beta_t + (1 - f) log beta~_t with f = (variance_out + 1) / 2 (eq. 15);
    variance_out: (B, ...)."""
    frac = (variance_out + 1.0) / 2.0
    log_beta = broadcast_at(torch.log(schedule.betas), t, variance_out)
    log_beta_tilde = broadcast_at(schedule.posterior_log_variance_clipped, t, variance_out)
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def fixed_large_log_variance(schedule: NoiseSchedule) -> torch.Tensor:
    """log beta_t per step, with the first value replaced by beta~ at step 2 (improved-diffusion):
    the reverse variance sigma_t^2 = beta_t of Ho et al. Sec. 3.2, (T,) float64."""
    first = schedule.posterior_variance[1:2] if schedule.timesteps > 1 else schedule.betas[:1]
    return torch.log(torch.cat([first, schedule.betas[1:]]))
