"""Noise schedules, the forward process and the posterior: closed forms that catch a wrong index."""
import math

import pytest
import torch

from cascade.diffusion import AngleSchedule, NoiseSchedule, q_mean_variance, q_posterior_mean_variance, q_sample
from cascade.diffusion.noise_schedule import LOG_SNR_FLOOR
from cascade.errors import UserError


@pytest.fixture(params=["linear", "cosine", "angle"])
def schedule(request):
    return NoiseSchedule.from_name(request.param, 200)


def test_linear_schedule_matches_ho_et_al():
    s = NoiseSchedule.from_name("linear")
    assert s.timesteps == 1000 and s.betas.dtype == torch.float64 and s.alphas_cumprod.shape == (1000,)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # alphas_cumprod[t] is the product over steps 1..t+1 (index t is step t+1)
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert s.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - s.betas[1].item()))
    scaled = NoiseSchedule.from_name("linear", 250)  # improved-diffusion scales both ends by 1000/T
    assert scaled.betas[0].item() == pytest.approx(4e-4) and scaled.betas[-1].item() == pytest.approx(0.08)


def test_cosine_schedule_matches_nichol_dhariwal_eq17():
    T, s_off = 1000, 0.008
    s = NoiseSchedule.from_name("cosine", T)
    f = lambda t: math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999 + 1e-12


def test_angle_schedule_is_cosine_by_angle():
    a = AngleSchedule(s_min=0.02, s_max=0.999)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(a.signal_rate(t) ** 2 + a.noise_rate(t) ** 2, torch.ones_like(t))
    assert a.signal_rate(torch.tensor(0.0)).item() == pytest.approx(0.999)
    assert a.signal_rate(torch.tensor(1.0)).item() == pytest.approx(0.02)
    assert torch.allclose(a.log_snr(t), torch.log(a.signal_rate(t) ** 2 / a.noise_rate(t) ** 2))
    d = a.discretize(50)
    assert torch.allclose(d.alphas_cumprod, a.signal_rate(torch.arange(1, 51) / 50) ** 2)
    assert d.alphas_cumprod[-1].item() == pytest.approx(0.02**2)


def test_iterating_one_step_kernel_matches_marginal(schedule):
    """q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) iterated from x_0 gives Ho et al. eq. 4."""
    x0 = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64)
    mean, var = x0.clone(), torch.zeros_like(x0)
    for t in range(schedule.timesteps):  # index t is step t+1
        beta = schedule.betas[t]
        mean, var = (1 - beta).sqrt() * mean, (1 - beta) * var + beta
        m, v = q_mean_variance(schedule, x0, torch.full((3,), t))
        assert torch.allclose(m, mean, atol=1e-12) and torch.allclose(v, var, atol=1e-12)


def test_q_sample_is_reparameterised_marginal(schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randint(0, schedule.timesteps, (8,), generator=g)
    mean, var = q_mean_variance(schedule, x0, t)
    assert torch.allclose(q_sample(schedule, x0, t, noise), mean + var.sqrt() * noise, atol=1e-6)


def test_posterior_is_bayes_rule_on_a_gaussian(schedule):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): a product of Gaussians by hand."""
    g = torch.Generator().manual_seed(1)
    t = torch.arange(1, schedule.timesteps, dtype=torch.long)
    x0 = torch.randn(t.shape, generator=g, dtype=torch.float64)
    x_t = torch.randn(t.shape, generator=g, dtype=torch.float64)
    ab_prev = schedule.alphas_cumprod[t - 1]  # alpha_bar of step t, the previous one
    alpha, beta = schedule.alphas[t], schedule.betas[t]
    # prior N(sqrt(ab_prev) x0, 1 - ab_prev) over x_{t-1}; likelihood x_t ~ N(sqrt(alpha) x_{t-1}, beta)
    precision = 1 / (1 - ab_prev) + alpha / beta
    var = 1 / precision
    mean = var * (ab_prev.sqrt() * x0 / (1 - ab_prev) + alpha.sqrt() * x_t / beta)
    m, v, logv = q_posterior_mean_variance(schedule, x0, x_t, t)
    assert torch.allclose(m, mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(v, var, rtol=1e-9)
    assert torch.allclose(logv, var.log(), rtol=1e-9)


def test_posterior_at_first_step_is_x0(schedule):
    x0, x_t = torch.tensor([0.7]), torch.tensor([-3.0])
    m, v, logv = q_posterior_mean_variance(schedule, x0, x_t, torch.tensor([0]))
    assert m.item() == pytest.approx(0.7) and v.item() == 0.0
    assert math.isfinite(logv.item())  # clipped to step 2's value


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 199, 200])
def test_respace_keeps_alphas_cumprod_at_kept_steps(schedule, spacing, steps):
    sub, kept_steps = schedule.respace(steps, spacing)
    assert sub.timesteps == steps and kept_steps.dtype == torch.long and len(kept_steps) == steps
    assert kept_steps[-1].item() == schedule.timesteps - 1
    if steps > 1:
        assert kept_steps[0].item() == 0 and bool((kept_steps.diff() > 0).all())
    assert torch.allclose(sub.alphas_cumprod, schedule.alphas_cumprod[kept_steps], rtol=1e-12)
    assert bool(((sub.betas > 0) & (sub.betas <= 1)).all())


def test_uniform_respace_is_evenly_spaced():
    _, kept_steps = NoiseSchedule.from_name("linear").respace(10)
    assert kept_steps.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    same, all_steps = NoiseSchedule.from_name("linear", 100).respace(100)
    assert all_steps.tolist() == list(range(100))
    assert torch.allclose(same.betas, NoiseSchedule.from_name("linear", 100).betas, rtol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_logsnr_respace_is_close_to_uniform_in_log_snr(name):
    s = NoiseSchedule.from_name(name)
    _, kept_steps = s.respace(12, "logsnr")
    log_snr = torch.log(s.alphas_cumprod / (1 - s.alphas_cumprod))[kept_steps]
    gaps = -log_snr[:-1].diff()  # the last step jumps from step T to the grid
    ideal = (log_snr[0] - LOG_SNR_FLOOR) / 11
    assert bool((gaps > 0).all()) and float((gaps - ideal).abs().max()) < 0.25 * float(ideal)
    assert log_snr[-1] < LOG_SNR_FLOOR < log_snr[-2]


def test_bad_schedule_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown noise schedule"):
        NoiseSchedule.from_name("quadratic")
    s = NoiseSchedule.from_name("linear", 10)
    for steps in (0, 11):
        with pytest.raises(UserError, match="steps"):
            s.respace(steps)
    with pytest.raises(UserError, match="spacing"):
        s.respace(5, "quadratic")


def test_schedule_tables_are_copied_once_per_device_and_dtype():
    from cascade.diffusion.noise_schedule import broadcast_at, on_device

    schedule = NoiseSchedule.from_name("cosine", 50)
    table = schedule.alphas_cumprod  # float64 on the CPU
    assert on_device(table, table.device, table.dtype) is table
    half = on_device(table, torch.device("cpu"), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and on_device(table, torch.device("cpu"), torch.bfloat16) is half
    like = torch.zeros(3, 2, 4, 4, dtype=torch.bfloat16)
    t = torch.tensor([0, 10, 49])
    out = broadcast_at(table, t, like)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.bfloat16
    assert torch.equal(out.flatten(), table[t].to(torch.bfloat16))  # the same values as index-then-cast


@pytest.mark.parametrize("shift", [-2 * math.log(2), 1.0])
def test_a_shifted_schedule_moves_every_log_snr_by_the_shift(shift):
    """simple diffusion's shift: log-SNR' = log-SNR + shift at every step, still a valid decreasing schedule;
    the stages build it from `schedule_shift` (0: the schedule itself)."""
    from cascade.config import parse_config
    from cascade.registry import get_stage

    base = NoiseSchedule.from_name("cosine", 100)
    moved = base.shifted(shift)
    log_snr = lambda s: torch.log(s.alphas_cumprod / (1 - s.alphas_cumprod))  # noqa: E731
    torch.testing.assert_close(log_snr(moved) - log_snr(base), torch.full((100,), shift, dtype=torch.float64))
    assert bool((moved.alphas_cumprod[1:] < moved.alphas_cumprod[:-1]).all()) and bool((moved.betas > 0).all())
    assert base.shifted(0) is base
    for name, extra in (("decoder", {}), ("prior", {}), ("sr256", {})):
        cls = get_stage(name)
        config = parse_config(cls.Config, {"timesteps": 100, "schedule_shift": shift, **extra})
        stage_schedule = cls(config).schedule
        torch.testing.assert_close(stage_schedule.alphas_cumprod, moved.alphas_cumprod)


@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "karras"])
@pytest.mark.parametrize("steps,t_min", [(2, 1), (12, 30), (50, 120), (70, 130)])
def test_respace_from_t_min_keeps_its_steps_between_t_min_and_the_last(schedule, spacing, steps, t_min):
    sub, kept_steps = schedule.respace(steps, spacing, t_min)
    assert len(kept_steps) == steps and kept_steps[0].item() == t_min
    assert kept_steps[-1].item() == schedule.timesteps - 1 and bool((kept_steps.diff() > 0).all())
    assert torch.allclose(sub.alphas_cumprod, schedule.alphas_cumprod[kept_steps], rtol=1e-12)
    assert sub.alphas_cumprod_prev[0].item() == 1.0  # the last sampling step goes to x_0 from there
    assert bool(((sub.betas > 0) & (sub.betas <= 1)).all())


def test_uniform_respace_from_t_min_is_evenly_spaced_and_all_steps_fit():
    s = NoiseSchedule.from_name("linear")
    assert s.respace(10, t_min=99)[1].tolist() == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert s.respace(900, t_min=100)[1].tolist() == list(range(100, 1000))


def test_bad_t_min_is_a_user_error():
    s = NoiseSchedule.from_name("linear", 10)
    for t_min in (-1, 10):
        with pytest.raises(UserError, match="t_min must be in"):
            s.respace(2, t_min=t_min)
    with pytest.raises(UserError, match=r"steps must be in \[1, 4\] with t_min 6"):
        s.respace(5, t_min=6)
