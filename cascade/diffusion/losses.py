"""Training losses for a denoising network.

* L_simple (Ho et al. 2020, eq. 14): mean squared error between the network output and its target,
  which is eps, x0 or v (Salimans & Ho 2022) depending on `prediction`.
* With `learned_variance` (Nichol & Dhariwal 2021, Sec. 3.1) the network returns twice the channels
  along dim 1: the prediction, then the raw variance output (see `learned_variance`). The loss is
  L_hybrid = L_simple + lambda L_vlb (their eq. 16, lambda = 0.001), where L_vlb = T E_t[L_t] is
  estimated from the sampled t and the mean is detached inside L_vlb so that only the variance
  learns from it. Off by default: it is known to misbehave when switched on carelessly.
* With `snr_gamma` the per-sample MSE is weighted by min-SNR-gamma (Hang et al. 2023): the weight an
  x0 loss would get is min(SNR_t, gamma), expressed for the prediction trained, i.e. divided by SNR_t
  for eps and by SNR_t + 1 for v. It stops the many nearly noise-free steps from dominating the
  gradient and speeds up convergence; gamma = 5 is the paper's choice. With `snr_plus_one` the x0
  weight is min(SNR_t + 1, gamma) instead: for v prediction that is the plain v loss wherever
  SNR_t + 1 <= gamma (so the noisiest steps, where min(SNR_t, gamma) / (SNR_t + 1) falls to 0 and the
  first sampling step goes untrained, keep their weight) and the min-SNR cut above.
"""
from __future__ import annotations

from typing import Callable

import torch

from cascade.diffusion.forward_process import q_posterior_mean_variance, q_sample
from cascade.diffusion.learned_variance import interpolated_log_variance
from cascade.diffusion.likelihood import mean_flat, vlb_term_bpd
from cascade.diffusion.noise_schedule import NoiseSchedule, on_device
from cascade.diffusion.parameterization import Prediction, model_output_to_x0, prediction_target

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_terms(schedule: NoiseSchedule, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor, prediction: Prediction | str = Prediction.EPS, *,
               learned_variance: bool = False, vlb_weight: float = 1e-3,
               snr_gamma: float | None = None, snr_plus_one: bool = False) -> dict[str, torch.Tensor]:
    """Per-sample loss terms, each (B,): "mse", "loss", and with learned variance "vlb" (bits/dim).

    model_fn(x_t, t) -> (B, C, ...) prediction, or (B, 2C, ...) with learned variance; t: (B,)
    long in [0, T); x0 and noise: (B, C, ...).
    """
    x_t = q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, t)
    if learned_variance:
        if out.shape[1] != 2 * x0.shape[1]:
            raise ValueError(f"learned variance needs 2x{x0.shape[1]} output channels, got {out.shape[1]}")
        out, variance_out = out.chunk(2, dim=1)
    elif out.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match x0 {tuple(x0.shape)}")
    target = prediction_target(schedule, prediction, x0, noise, t)
    terms = {"mse": mean_flat((out - target) ** 2)}
    terms["loss"] = terms["mse"]
    if snr_gamma is not None:
        weight = min_snr_weight(schedule, prediction, t, snr_gamma, plus_one=snr_plus_one)
        terms["loss"] = weight.to(out.dtype) * terms["mse"]
    if learned_variance:
        # Stop-gradient on the mean: L_vlb only trains the variance (Nichol & Dhariwal Sec. 3.1).
        x0_pred = model_output_to_x0(schedule, prediction, out.detach(), x_t, t)
        model_mean, _, _ = q_posterior_mean_variance(schedule, x0_pred, x_t, t)
        log_variance = interpolated_log_variance(schedule, variance_out, t)
        terms["vlb"] = vlb_term_bpd(schedule, x0, x_t, t, model_mean, log_variance)
        terms["loss"] = terms["loss"] + vlb_weight * schedule.timesteps * terms["vlb"]
    return terms


def diffusion_loss(schedule: NoiseSchedule, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, prediction: Prediction | str = Prediction.EPS, *,
                   learned_variance: bool = False, vlb_weight: float = 1e-3,
                   snr_gamma: float | None = None, snr_plus_one: bool = False) -> torch.Tensor:
    """Scalar training loss: the batch mean of `loss_terms(...)["loss"]`."""
    return loss_terms(schedule, model_fn, x0, t, noise, prediction, learned_variance=learned_variance,
                      vlb_weight=vlb_weight, snr_gamma=snr_gamma, snr_plus_one=snr_plus_one)["loss"].mean()


def min_snr_weight(schedule: NoiseSchedule, prediction: Prediction | str, t: torch.Tensor,
                   gamma: float, *, plus_one: bool = False) -> torch.Tensor:
    """(B,) min-SNR-gamma loss weights for the MSE of `prediction` at steps t (Hang et al. 2023): the
    x0-space weight min(SNR_t, gamma), or min(SNR_t + 1, gamma) with `plus_one`, in `prediction`'s units."""
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {gamma}")
    alpha_bar = on_device(schedule.alphas_cumprod, t.device, torch.float64)[t]
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = (snr + 1.0 if plus_one else snr).clamp(max=gamma)
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return (clipped / snr).float()
    if prediction is Prediction.V:
        return (clipped / (snr + 1.0)).float()
    return clipped.float()


def sample_timesteps(schedule: NoiseSchedule, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", logit_normal: float = 0.0,
                     logit_mean: float = 0.0) -> torch.Tensor:
    """t in [0, T) for training, (B,) long: uniform (Ho et al. Algorithm 1), or with probability
    `logit_normal` per sample t = floor(T sigmoid(z)), z ~ N(logit_mean, 1) (the logit-normal of Esser et
    al. 2024, section 3.1): mean 0 puts more of the samples at mid noise and fewer at the two ends, a
    positive mean moves them towards the noisy end (median t/T = sigmoid(logit_mean))."""
    if not 0.0 <= logit_normal <= 1.0:
        raise ValueError(f"logit_normal is a probability, got {logit_normal}")
    t = torch.randint(0, schedule.timesteps, (batch_size,), generator=generator)
    if logit_normal > 0:
        z = torch.randn(batch_size, generator=generator) + logit_mean
        drawn = (torch.sigmoid(z) * schedule.timesteps).long().clamp(max=schedule.timesteps - 1)
        t = torch.where(torch.rand(batch_size, generator=generator) < logit_normal, drawn, t)
    return t.to(device)
