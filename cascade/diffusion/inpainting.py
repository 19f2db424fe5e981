"""Inpainting with any trained denoiser, at sampling time.

Replacement (Song et al. 2021, "Score-Based Generative Modeling through SDEs", appendix I; Lugmayr et al.
2022, "RePaint", eq. 8): before every step at respaced index i, the known region of x is set to the
original noised to that step, sqrt(alpha_bar_i) x_known + sqrt(1 - alpha_bar_i) z with fresh z, so the
sampler only ever invents the masked region, and it sees the known region at the noise level it expects.
The result keeps the known region exactly: mask * x_0 + (1 - mask) * x_known.

Replacement alone lets the known region steer the unknown one only through the network's view of a
noisy x: on a correlated Gaussian it lands well short of the true conditional mean. RePaint's resampling
fixes that: after stepping down to level L, x is noised back up `jump` levels with the forward process,
x_{L+j} = sqrt(alpha_bar_{L+j} / alpha_bar_L) x_L + sqrt(1 - alpha_bar_{L+j} / alpha_bar_L) z, and the
same levels are walked down again, `resample` times in all at every jump point. That costs about
`resample` times the steps. Resampling needs a sampler whose step depends on x alone (DDPM, DDIM);
the multistep and Karras samplers keep state between steps and take replacement only.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import torch

from cascade.diffusion.ddim import ddim_step
from cascade.diffusion.ddpm import ddpm_step
from cascade.diffusion.learned_variance import fixed_large_log_variance
from cascade.diffusion.noise import randn
from cascade.diffusion.noise_schedule import NoiseSchedule
from cascade.diffusion.step_loop import descending_steps
from cascade.errors import UserError

RESAMPLING_SAMPLERS = ("ddpm", "ddim")


def repaint_walk(levels: int, jump: int = 1, resample: int = 1) -> list[tuple[str, int]]:
    """The moves of a RePaint walk over `levels` respaced levels, starting at level levels - 1:
    ("down", L) is a sampler step from level L to L - 1 (to x_0 from level 0), ("up", L) re-noises
    from level L to L + jump. Every level L with (levels - 1 - L) a multiple of `jump` (and L + jump a
    level) is passed `resample` times; resample 1 is the plain walk down."""
    moves: list[tuple[str, int]] = []
    jumped: Counter[int] = Counter()
    level = levels - 1
    while level >= 0:
        moves.append(("down", level))
        level -= 1
        if (level >= 0 and level + jump <= levels - 1 and (levels - 1 - level) % jump == 0
                and jumped[level] < resample - 1):
            jumped[level] += 1
            moves.append(("up", level))
            level += jump
    return moves


def inpaint_steps(steps: int, jump: int = 1, resample: int = 1) -> int:
    """How many sampler steps (and callbacks) `sample_inpaint` takes."""
    return sum(kind == "down" for kind, _ in repaint_walk(steps, jump, resample))


def check_inpaint_options(sampler: str, resample: int, jump: int) -> None:
    if not isinstance(resample, int) or not 1 <= resample <= 50:
        raise UserError(f"resample must be a whole number from 1 to 50, got {resample!r}")
    if not isinstance(jump, int) or jump < 1:
        raise UserError(f"jump must be a whole number >= 1, got {jump!r}")
    if resample > 1 and sampler not in RESAMPLING_SAMPLERS:
        raise UserError(f"RePaint resampling needs a one-step sampler ({' or '.join(RESAMPLING_SAMPLERS)}); "
                        f"the {sampler} sampler takes resample 1 only")


def known_region_replacer(known: torch.Tensor, mask: torch.Tensor, schedule: NoiseSchedule,
                          generator: torch.Generator | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """replace(x, i): x with its known region (mask 0) set to `known` noised to respaced index i."""
    alphas = schedule.alphas_cumprod.tolist()

    def replace(x: torch.Tensor, i: int) -> torch.Tensor:
        z = randn(x.shape, generator, x.device, x.dtype)
        known_t = math.sqrt(alphas[i]) * known + math.sqrt(1.0 - alphas[i]) * z
        return mask * x + (1 - mask) * known_t

    return replace


@torch.no_grad()
def sample_inpaint(denoise: Callable, known: torch.Tensor, mask: torch.Tensor, *, schedule: NoiseSchedule,
                   sampler: str, steps: int, resample: int = 1, jump: int = 1, eta: float = 0.0,
                   guidance: float | None = None, threshold: str | float | None = None,
                   generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                   callback: Callable[[dict], None] | None = None, progress: bool = False,
                   variance: str = "small", spacing: str | None = None, t_min: int = 0) -> torch.Tensor:
    """x_0 of `known`'s shape whose region where `mask` is 1 is sampled and whose region where it is 0 is
    `known` (mask broadcasts against known; values between 0 and 1 blend). With resample > 1, RePaint's
    resampling (see the module docstring). The other options are `sample`'s; x_T is drawn on known's device
    from `generator` when not given, then each step's known-region noise."""
    from cascade.diffusion.sampling import _prepare, run_sampler

    check_inpaint_options(sampler, resample, jump)
    if mask.min() < 0 or mask.max() > 1:
        raise UserError("the mask's values must lie between 0 (keep) and 1 (repaint)")
    known, mask = known.float(), mask.to(known.device, torch.float32)
    model, respaced, x = _prepare(denoise, known.shape, schedule=schedule, sampler=sampler, steps=steps, eta=eta,
                                  guidance=guidance, threshold=threshold, generator=generator, x_T=x_T,
                                  variance=variance, spacing=spacing, device=known.device, t_min=t_min)
    replace = known_region_replacer(known, mask, respaced, generator)
    if resample == 1:
        x = run_sampler(model, x, respaced, sampler=sampler, eta=eta, variance=variance, generator=generator,
                        callback=callback, progress=progress, replace=replace)
    else:
        x = _repaint(model, x, respaced, replace, sampler=sampler, eta=eta, variance=variance, jump=jump,
                     resample=resample, generator=generator, callback=callback, progress=progress)
    return mask * x + (1 - mask) * known


def _repaint(model, x: torch.Tensor, schedule: NoiseSchedule, replace, *, sampler: str, eta: float,
             variance: str, jump: int, resample: int, generator: torch.Generator | None,
             callback: Callable[[dict], None] | None, progress: bool) -> torch.Tensor:
    alphas = schedule.alphas_cumprod.tolist()
    large = fixed_large_log_variance(schedule) if variance == "large" else None
    moves = repaint_walk(schedule.timesteps, jump, resample)
    bar = descending_steps(sum(kind == "down" for kind, _ in moves), progress, f"{sampler} + repaint")
    for kind, level in moves:
        if kind == "up":
            ratio = alphas[level + jump] / alphas[level]
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * randn(x.shape, generator, x.device, x.dtype)
            continue
        next(bar, None)
        x = replace(x, level)
        if sampler == "ddpm":
            x, out = ddpm_step(model, x, level, schedule, large=large, generator=generator)
        else:
            x, out = ddim_step(model, x, level, schedule, eta=eta, generator=generator)
        if callback is not None:
            callback({"x": x, "i": level, "x0": out.x0})
    next(bar, None)  # closes the bar
    return x
