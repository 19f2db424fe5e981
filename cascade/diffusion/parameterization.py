"""What a network predicts, and conversions between the three choices.

With alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t) and x_t = alpha x0 + sigma eps:
  * eps (Ho et al. 2020, eq. 11): the noise;
  * x0: the clean sample;
  * v (Salimans & Ho 2022, "Progressive distillation", Sec. 4 and App. D): v = alpha eps - sigma x0,
    so that x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v.
The samplers consume eps; `model_output_to_eps` lets a stage whose network predicts x0 or v feed them.
"""
from __future__ import annotations

import enum

import torch

from cascade.diffusion.noise_schedule import NoiseSchedule, broadcast_at


class Prediction(str, enum.Enum):
    """The quantity a network is trained to output."""

    EPS = "eps"
    X0 = "x0"
    V = "v"


def _rates(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return broadcast_at(schedule.signal_rates, t, like), broadcast_at(schedule.noise_rates, t, like)


def eps_to_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Ho et al. eq. 15 inverted: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
    alpha, sigma = _rates(schedule, t, x_t)
    return (x_t - sigma * eps) / alpha


def x0_to_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t)."""
    alpha, sigma = _rates(schedule, t, x_t)
    return (x_t - alpha * x0) / sigma


def x0_eps_to_v(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho 2022, Sec. 4: v = alpha_t eps - sigma_t x0."""
    alpha, sigma = _rates(schedule, t, x0)
    return alpha * eps - sigma * x0


def v_to_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho 2022, App. D: x0 = alpha_t x_t - sigma_t v."""
    alpha, sigma = _rates(schedule, t, x_t)
    return alpha * x_t - sigma * v


def v_to_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho 2022, App. D: eps = sigma_t x_t + alpha_t v."""
    alpha, sigma = _rates(schedule, t, x_t)
    return sigma * x_t + alpha * v


def model_output_to_eps(schedule: NoiseSchedule, prediction: Prediction | str, out: torch.Tensor,
                        x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The eps implied by a network output of type `prediction` at (x_t, t)."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return out
    if prediction is Prediction.X0:
        return x0_to_eps(schedule, x_t, t, out)
    return v_to_eps(schedule, x_t, t, out)


def model_output_to_x0(schedule: NoiseSchedule, prediction: Prediction | str, out: torch.Tensor,
                       x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The x0 implied by a network output of type `prediction` at (x_t, t)."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return eps_to_x0(schedule, x_t, t, out)
    if prediction is Prediction.X0:
        return out
    return v_to_x0(schedule, x_t, t, out)


def prediction_target(schedule: NoiseSchedule, prediction: Prediction | str, x0: torch.Tensor,
                      noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target for a network of type `prediction`: eps, x0, or v."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return noise
    if prediction is Prediction.X0:
        return x0
    return x0_eps_to_v(schedule, x0, noise, t)
