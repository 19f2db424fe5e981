"""The forward process q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020)."""
from __future__ import annotations

import torch

from cascade.diffusion.noise_schedule import NoiseSchedule, broadcast_at


def q_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ho et al. eq. 4: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I); (mean, variance)."""
    ab = broadcast_at(schedule.alphas_cumprod, t, x0)
    return ab.sqrt() * x0, (1.0 - ab).expand_as(x0)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Ho et al. eq. 4 by reparameterisation: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    x0, noise: (B, ...); t: (B,) long in [0, T).
    """
    return broadcast_at(schedule.signal_rates, t, x0) * x0 + broadcast_at(schedule.noise_rates, t, x0) * noise


def q_posterior_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ho et al. eqs. 6-7: q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I).

    mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0 + sqrt(alpha_t) (1 - alpha_bar_{t-1})
    / (1 - alpha_bar_t) x_t; beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t.
    Returns (mean, variance, log_variance), the log clipped at t=0 where beta~ is 0.
    """
    mean = (broadcast_at(schedule.posterior_mean_coef1, t, x_t) * x0
            + broadcast_at(schedule.posterior_mean_coef2, t, x_t) * x_t)
    variance = broadcast_at(schedule.posterior_variance, t, x_t).expand_as(x_t)
    log_variance = broadcast_at(schedule.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
    return mean, variance, log_variance
