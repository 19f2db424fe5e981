"""Training losses for a denoising network.

* L_simple (Ho et al. 2020, eq. 14): mean squared error between the network output and its target,
  which is eps, x0 or v (Salimans & Ho 2022) depending on `prediction`.
* With `learned_variance` (Nichol & Dhariwal 2021, Sec. 3.1) the network returns twice the channels
  along dim 1: the prediction, then the raw variance output v (see `learned_variance`). The loss is
  L_hybrid = L_simple + lambda L_vlb (their eq. 16, lambda = 0.001), where L_vlb = T E_t[L_t] is
  estimated from the sampled t and the mean is detached inside L_vlb so that only the variance
  learns from it. Off by default: it is known to misbehave when switched on carelessly.
"""
from __future__ import annotations

from typing import Callable

import torch

from cascade.diffusion.forward_process import q_posterior_mean_variance, q_sample
from cascade.diffusion.learned_variance import interpolated_log_variance
from cascade.diffusion.likelihood import mean_flat, vlb_term_bpd
from cascade.diffusion.noise_schedule import NoiseSchedule
from cascade.diffusion.parameterization import Prediction, model_output_to_x0, prediction_target

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_terms(schedule: NoiseSchedule, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor, prediction: Prediction | str = Prediction.EPS, *,
               learned_variance: bool = False, vlb_weight: float = 1e-3) -> dict[str, torch.Tensor]:
    """Per-sample loss terms, each (B,): "mse", "loss", and with learned variance "vlb" (bits/dim).

    model_fn(x_t, t) -> (B, C, ...) prediction, or (B, 2C, ...) with learned variance; t: (B,)
    long in [0, T); x0 and noise: (B, C, ...).
    """
    x_t = q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, t)
    if learned_variance:
        if out.shape[1] != 2 * x0.shape[1]:
            raise ValueError(f"learned variance needs 2x{x0.shape[1]} output channels, got {out.shape[1]}")
        out, v = out.chunk(2, dim=1)
    elif out.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match x0 {tuple(x0.shape)}")
    target = prediction_target(schedule, prediction, x0, noise, t)
    terms = {"mse": mean_flat((out - target) ** 2)}
    terms["loss"] = terms["mse"]
    if learned_variance:
        # Stop-gradient on the mean: L_vlb only trains the variance (Nichol & Dhariwal Sec. 3.1).
        x0_pred = model_output_to_x0(schedule, prediction, out.detach(), x_t, t)
        model_mean, _, _ = q_posterior_mean_variance(schedule, x0_pred, x_t, t)
        terms["vlb"] = vlb_term_bpd(schedule, x0, x_t, t, model_mean, interpolated_log_variance(schedule, v, t))
        terms["loss"] = terms["mse"] + vlb_weight * schedule.timesteps * terms["vlb"]
    return terms


def diffusion_loss(schedule: NoiseSchedule, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, prediction: Prediction | str = Prediction.EPS, *,
                   learned_variance: bool = False, vlb_weight: float = 1e-3) -> torch.Tensor:
    """Scalar training loss: the batch mean of `loss_terms(...)["loss"]`."""
    return loss_terms(schedule, model_fn, x0, t, noise, prediction,
                      learned_variance=learned_variance, vlb_weight=vlb_weight)["loss"].mean()


def sample_timesteps(schedule: NoiseSchedule, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform t in [0, T) for training (Ho et al. Algorithm 1), (B,) long."""
    return torch.randint(0, schedule.timesteps, (batch_size,), generator=generator, device=device)
