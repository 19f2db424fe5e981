"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): a multistep second-order solver
of the probability-flow ODE in its data-prediction form.

With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t)
and h_i = lambda_{t_i} - lambda_{t_{i-1}}:
  x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
  D_i = (1 + 1/(2 r_i)) x0_hat(t_{i-1}) - 1/(2 r_i) x0_hat(t_{i-2}),   r_i = h_{i-1} / h_i,
with D_1 = x0_hat(t_0) (first order on the first step). The grid is the respaced steps followed
by the clean end point alpha_bar = 1, where lambda is infinite, so the last step is first order
too and returns x0_hat (as DDIM's last step does).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from cascade.diffusion.denoiser import DenoiserOutput
from cascade.diffusion.noise_schedule import NoiseSchedule
from cascade.diffusion.step_loop import descending_steps


def sample_dpmpp_2m(model: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput], x: torch.Tensor,
                    schedule: NoiseSchedule, *, callback: Callable[[dict], None] | None = None,
                    progress: bool = False,
                    replace: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Run Algorithm 2 from x = x_T (B, ...) down to x_0; model(x, i) at respaced index i. `replace(x, i)`,
    when given, may change x before each step (inpainting puts the known region there)."""
    ab = schedule.alphas_cumprod.tolist()
    x0_prev, h_prev = None, None
    for i in descending_steps(schedule.timesteps, progress, "dpm-solver++(2m)"):
        if replace is not None:
            x = replace(x, i)
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = model(x, t)
        if i == 0:
            x = out.x0  # step to alpha_bar = 1: h is infinite and e^{-h} = 0
        else:
            alpha_s, sigma_s = math.sqrt(ab[i]), math.sqrt(1 - ab[i])
            alpha_t, sigma_t = math.sqrt(ab[i - 1]), math.sqrt(1 - ab[i - 1])
            h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
            if x0_prev is None:
                d = out.x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * out.x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
            x0_prev, h_prev = out.x0, h
        if callback is not None:
            callback({"x": x, "i": i, "x0": out.x0})
    return x
