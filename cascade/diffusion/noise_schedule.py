"""Discrete variance-preserving noise schedules and their respacing.

A `NoiseSchedule` holds the betas of a T-step forward process and everything derived from them.
Index t of every array describes diffusion step t+1 (Ho et al. 2020 count steps from 1), so
``alphas_cumprod[0]`` is the first, nearly noiseless step and ``alphas_cumprod[T-1]`` the last.

Schedules:
  * "linear": Ho et al. 2020, Sec. 4, beta from 1e-4 to 0.02 over 1000 steps, both ends scaled by
    1000/T for other T (as improved-diffusion does, so the total noise stays comparable);
  * "cosine": Nichol & Dhariwal 2021, eq. 17, alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2),
    s = 0.008, betas clipped at 0.999;
  * `AngleSchedule`: the continuous cosine schedule written as an angle, signal rate cos(theta(t)),
    noise rate sin(theta(t)), theta linear in t in [0, 1] from arccos(s_max) to arccos(s_min).
"""
from __future__ import annotations

import math

import torch

from cascade.errors import UserError


# Below this log-SNR (alpha_bar < 3.4e-4) x_t is noise for data of unit scale. The clipped cosine
# schedule reaches -19.8 in its last few steps; a log-SNR grid down to there spent ~40% of its steps
# on them, and DPM-Solver++ with 20 steps was 2-2.5x less accurate on Gaussian data than with this floor.
LOG_SNR_FLOOR = -8.0
# The largest sigma of the Karras grid (their sigma_max for images); a schedule's noisier last step stays
# the first step taken, as with LOG_SNR_FLOOR.
KARRAS_SIGMA_MAX = 80.0
SPACINGS = ("uniform", "logsnr", "karras")


def on_device(values: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A schedule table on `device` in `dtype`, copied once per (table, device, dtype) and reused: the
    samplers and losses index the tables at every step, and a fresh host-to-device copy each time is
    a synchronising transfer on a GPU."""
    if values.device == device and values.dtype == dtype:
        return values
    copies = values.__dict__.setdefault("_copies", {})  # kept on the table itself, gone with it
    key = (device, dtype)
    if key not in copies:
        copies[key] = values.to(device, dtype)
    return copies[key]


def broadcast_at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, ..., 1) to broadcast against `like` (B, ...), in like's dtype."""
    out = on_device(values, like.device, like.dtype)[t.to(like.device).long()]
    return out.reshape(out.shape + (1,) * (like.ndim - 1))


def linear_betas(timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02, scaled by 1000/T (improved-diffusion).

    Below T = 50 the scaled betas pass 1, so they are clipped at `max_beta` as the cosine ones are.
    """
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=max_beta)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: betas from alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class NoiseSchedule:
    """A T-step Gaussian forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).

    Every attribute is a float64 1-D tensor of length T; index t holds the value for step t+1.
      betas, alphas = 1 - betas, alphas_cumprod (alpha_bar_t), alphas_cumprod_prev (alpha_bar_{t-1},
      1 at t=0), signal_rates (sqrt(alpha_bar_t)), noise_rates (sqrt(1 - alpha_bar_t)),
      posterior_variance (beta~_t, Ho et al. eq. 7), posterior_log_variance_clipped (log beta~ with
      the t=0 value, which is 0, replaced by t=1's, as improved-diffusion does),
      posterior_mean_coef1 / posterior_mean_coef2 (the x0 and x_t weights of mu~_t, eq. 7).
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1]")
        self.timesteps = int(betas.numel())
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.signal_rates = self.alphas_cumprod.sqrt()  # alpha_t = sqrt(alpha_bar_t)
        self.noise_rates = (1.0 - self.alphas_cumprod).sqrt()  # sigma_t = sqrt(1 - alpha_bar_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~ is 0 at the first step; its log is needed by the vlb and by learned variances there.
        first = self.posterior_variance[1:2] if self.timesteps > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_name(cls, name: str, timesteps: int = 1000) -> "NoiseSchedule":
        """"linear" (Ho et al.), "cosine" (Nichol & Dhariwal) or "angle" (`AngleSchedule()` defaults)."""
        if int(timesteps) < 1:
            raise UserError(f"timesteps must be >= 1, got {timesteps}")
        if name == "linear":
            return cls(linear_betas(int(timesteps)))
        if name == "cosine":
            return cls(cosine_betas(int(timesteps)))
        if name == "angle":
            return AngleSchedule().discretize(int(timesteps))
        raise UserError(f"unknown noise schedule '{name}' (choose linear, cosine or angle)")

    def shifted(self, shift: float) -> "NoiseSchedule":
        """The schedule with every step's log-SNR moved by `shift` (Hoogeboom et al. 2023, "simple
        diffusion", sec. 3.1: log-SNR + 2 log(64 / d) for d x d images; negative = noisier at every step, so
        more of the steps decide the coarse layout). alpha_bar' = sigmoid(log-SNR + shift); 0 returns self."""
        if shift == 0:
            return self
        log_snr = torch.log(self.alphas_cumprod / (1.0 - self.alphas_cumprod))
        return NoiseSchedule.from_alphas_cumprod(torch.sigmoid(log_snr + float(shift)))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "NoiseSchedule":
        """The schedule whose betas reproduce a given decreasing alpha_bar sequence exactly."""
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return cls(1.0 - ab / prev)

    def respace(self, steps: int, spacing: str = "uniform", t_min: int = 0) -> tuple["NoiseSchedule", torch.Tensor]:
        """Keep `steps` of the T timesteps (improved-diffusion's respacing, Nichol & Dhariwal Sec. 4).

        spacing "uniform": evenly spaced in t, as improved-diffusion and DDIM (Song et al. Sec. 4.2)
        do; "logsnr": as close to evenly spaced in log-SNR as distinct integer steps allow, the step
        schedule Lu et al. 2022 (DPM-Solver, Sec. 3.4) recommend for their solvers, with the grid
        stopping at LOG_SNR_FLOOR and the first step jumping there from the last step; "karras": the
        nearest distinct steps to Karras et al. 2022's grid, sigma_i^(1/7) evenly spaced from
        min(sigma_T, KARRAS_SIGMA_MAX) down to sigma_1 (sigma = sqrt((1 - alpha_bar) / alpha_bar)),
        which spends more of the steps at low noise; the first step again jumps from the last step.
        Returns the new schedule, whose betas are 1 - alpha_bar_{kept t} / alpha_bar_{previous kept t}
        so that its alphas_cumprod equal the original ones at the kept steps, and `kept_steps`, the
        LongTensor of the original timesteps it uses (index i of the new schedule is original step
        kept_steps[i]). Kept steps always include the last step and, for steps > 1, the first.

        `t_min` > 0 puts the grid on steps t_min .. T - 1 instead (0-based, as `kept_steps`): the lowest
        kept step is t_min, so a sampler's last step returns the network's x0 estimate from there rather
        than from the nearly noiseless step 0. A network that learned little at the lowest noise levels
        (min-SNR weighting in a short run) then does not add its pixel noise to the image.
        """
        steps, t_min = int(steps), int(t_min)
        if not 0 <= t_min < self.timesteps:
            raise UserError(f"t_min must be in [0, {self.timesteps - 1}], got {t_min}")
        if not 1 <= steps <= self.timesteps - t_min:
            raise UserError(f"steps must be in [1, {self.timesteps - t_min}]"
                            f"{f' with t_min {t_min}' if t_min else ''}, got {steps}")
        if spacing not in SPACINGS:
            raise UserError(f"unknown step spacing '{spacing}' (choose {', '.join(SPACINGS)})")
        if steps == 1:
            kept_steps = torch.tensor([self.timesteps - 1])
        elif spacing == "uniform":
            kept_steps = torch.linspace(t_min, self.timesteps - 1, steps, dtype=torch.float64).round().long()
        elif spacing == "karras":
            kept_steps = self._karras_steps(steps, t_min)
        else:
            kept_steps = self._logsnr_uniform_steps(steps, t_min)
        return NoiseSchedule.from_alphas_cumprod(self.alphas_cumprod[kept_steps]), kept_steps

    def _logsnr_uniform_steps(self, steps: int, t_min: int = 0) -> torch.Tensor:
        """Integer steps nearest to a log-SNR grid uniform from step t_min + 1 down to step T (or to
        LOG_SNR_FLOOR, whichever is higher; the last step is always T), made distinct."""
        T = self.timesteps
        log_snr = torch.log(self.alphas_cumprod / (1.0 - self.alphas_cumprod))  # decreasing in t
        low = max(float(log_snr[-1]), LOG_SNR_FLOOR)
        grid = torch.linspace(float(log_snr[t_min]), low, steps, dtype=torch.float64)
        # t(log-SNR) by linear interpolation on the increasing (reversed) table
        rising = log_snr.flip(0)
        hi = torch.searchsorted(rising, grid).clamp(1, T - 1)
        frac = ((grid - rising[hi - 1]) / (rising[hi] - rising[hi - 1])).clamp(0.0, 1.0)
        t = ((T - 1) - (hi - 1 + frac)).round().long().tolist()
        t[0] = t_min
        return _distinct_steps(t, T)

    def _karras_steps(self, steps: int, t_min: int = 0, rho: float = 7.0) -> torch.Tensor:
        """Integer steps nearest (in log sigma) to the Karras grid from step t_min + 1's sigma, made distinct,
        always with steps t_min + 1 and T."""
        T = self.timesteps
        log_sigma = 0.5 * torch.log((1.0 - self.alphas_cumprod) / self.alphas_cumprod)  # increasing in t
        lo, hi = math.exp(float(log_sigma[t_min])), min(math.exp(float(log_sigma[-1])), KARRAS_SIGMA_MAX)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        grid = (lo ** (1 / rho) + ramp * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho  # increasing
        t = (log_sigma[None, :] - grid.log()[:, None]).abs().argmin(dim=1).tolist()
        t[0] = t_min
        return _distinct_steps(t, T)

    def __repr__(self) -> str:
        return (f"NoiseSchedule(timesteps={self.timesteps}, alpha_bar[0]={self.alphas_cumprod[0]:.6g}, "
                f"alpha_bar[-1]={self.alphas_cumprod[-1]:.3g})")


def _distinct_steps(t: list[int], timesteps: int) -> torch.Tensor:
    """Increasing steps nearest a grid, made distinct: where the grid is finer than one step, neighbours
    are pushed apart upwards, then the last step is set to T - 1 and pushed apart downwards from there."""
    steps = len(t)
    for j in range(1, steps):
        t[j] = max(t[j], t[j - 1] + 1)
    t[-1] = timesteps - 1
    for j in range(steps - 2, -1, -1):
        t[j] = min(t[j], t[j + 1] - 1)
    return torch.tensor(t, dtype=torch.long)


class AngleSchedule:
    """Continuous VP schedule by angle: x_t = cos(theta(t)) x0 + sin(theta(t)) eps, t in [0, 1].

    theta(t) = theta_min + t (theta_max - theta_min), theta_min = arccos(s_max), theta_max =
    arccos(s_min). This is Nichol & Dhariwal's cosine schedule read as an angle (without the
    offset s), with the end points chosen by their signal rates, as in the continuous-time cosine
    log-SNR schedules of Kingma et al. 2021 and Hoogeboom et al. 2023.
    """

    def __init__(self, s_min: float = 0.0064, s_max: float = 0.9999):
        if not 0.0 < s_min < s_max < 1.0:
            raise UserError(f"need 0 < s_min < s_max < 1, got s_min={s_min}, s_max={s_max}")
        self.s_min, self.s_max = float(s_min), float(s_max)
        self.theta_min, self.theta_max = math.acos(s_max), math.acos(s_min)

    def theta(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.theta_min + t * (self.theta_max - self.theta_min)

    def signal_rate(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(self.theta(t))

    def noise_rate(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.theta(t))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha^2 / sigma^2) = -2 log tan(theta(t))."""
        return -2.0 * torch.log(torch.tan(self.theta(t)))

    def discretize(self, timesteps: int) -> NoiseSchedule:
        """The N-step schedule with alpha_bar at index i equal to cos^2(theta((i + 1) / N))."""
        t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
        return NoiseSchedule.from_alphas_cumprod(self.signal_rate(t) ** 2)

    def __repr__(self) -> str:
        return f"AngleSchedule(s_min={self.s_min}, s_max={self.s_max})"
