"""Terms of the variational bound (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eqs. 4-6).

L_vlb = L_0 + sum_{t>1} L_{t-1} + L_T with L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
and L_0 = -log p(x_0 | x_1) under the discretized Gaussian decoder of Ho et al. eq. 13 (data in
[-1, 1] on 256 levels). Everything here is per sample, averaged over the non-batch dimensions, in
bits per dimension.
"""
from __future__ import annotations

import math

import torch

from cascade.diffusion.forward_process import q_posterior_mean_variance
from cascade.diffusion.noise_schedule import NoiseSchedule


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Ho et al. eq. 13: log of the Gaussian mass of x's bin of width 2/255 (edge bins open-ended).

    x: data in [-1, 1] on the 256-level grid; mean, log_scale (log std) broadcast with x; nats.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(x < -0.999, log_cdf_upper,
                       torch.where(x > 0.999, log_one_minus_cdf_lower, torch.log(mass)))


def vlb_term_bpd(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 model_mean: torch.Tensor, model_log_variance: torch.Tensor) -> torch.Tensor:
    """The bound's term at step t for p(x_{t-1} | x_t) = N(model_mean, exp(model_log_variance)).

    KL to the true posterior (Ho et al. eq. 5) where t > 0, and the decoder NLL -log p(x0 | x_1)
    (eq. 13) where t == 0 (index 0 is step 1); (B,) bits per dimension.
    """
    true_mean, _, true_log_variance = q_posterior_mean_variance(schedule, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)) / math.log(2.0)
    return torch.where(t.to(x0.device) == 0, nll, kl)
