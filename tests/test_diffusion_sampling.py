"""Samplers against a closed-form oracle: for Gaussian data N(mu, sd^2) the exact eps is known.

x_t ~ N(alpha mu, alpha^2 sd^2 + sigma^2), so eps*(x_t, t) = E[eps | x_t] = sigma (x_t - alpha mu) /
(alpha^2 sd^2 + sigma^2). Along the probability-flow ODE d(x/alpha) = eps d(sigma/alpha) the quantity
(x/alpha - mu) / sqrt(sd^2 + (sigma/alpha)^2) is constant, so the exact ODE solution from x_T is
x_0 = mu + sd (x_T - alpha_T mu) / sqrt(alpha_T^2 sd^2 + sigma_T^2), an affine map of x_T.
"""
import pytest
import torch

from cascade.diffusion import NoiseSchedule, Prediction, eps_to_x0, model_output_to_eps, sample

MU, SD, N = 0.5, 0.5, 20000


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_oracle(schedule, mu=MU, sd=SD):
    def denoise(x, t):
        assert t.dtype == torch.long and t.shape == x.shape[:1]
        assert 0 <= int(t.min()) and int(t.max()) < schedule.timesteps
        ab = schedule.alphas_cumprod.to(x.dtype)[t]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sd**2 + 1 - ab)
    return denoise


def exact_ode_solution(schedule, x_T, mu=MU, sd=SD):
    ab = schedule.alphas_cumprod[-1].item()
    return mu + sd * (x_T - ab**0.5 * mu) / (ab * sd**2 + 1 - ab) ** 0.5


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule.from_name(request.param, 1000)


@pytest.mark.parametrize("sampler,steps,kwargs,std_tol", [
    ("ddpm", 1000, {}, 0.015),
    ("ddpm", 1000, {"variance": "large"}, 0.015),
    # first order: at 50 evenly spaced steps the std comes out 3-6% low for this data
    ("ddim", 50, {}, 0.035),
    ("dpmpp", 20, {}, 0.02),
])
def test_samples_match_the_data_distribution(schedule, sampler, steps, kwargs, std_tol):
    g = torch.Generator().manual_seed(0)
    x = sample(gaussian_oracle(schedule), (N,), schedule=schedule, sampler=sampler, steps=steps,
               generator=g, **kwargs)
    assert x.shape == (N,) and x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(MU, abs=0.015)  # 4 standard errors
    assert x.std().item() == pytest.approx(SD, abs=std_tol)


def test_ddim_with_eta_one_samples_the_data_distribution():
    s = NoiseSchedule.from_name("cosine", 1000)
    x = sample(gaussian_oracle(s), (N,), schedule=s, sampler="ddim", steps=250, eta=1.0,
               generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(SD, abs=0.02)


def test_dpm_solver_is_closer_to_the_exact_ode_solution_than_ddim_at_10_steps(schedule):
    x_T = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = exact_ode_solution(schedule, x_T)
    denoise = gaussian_oracle(schedule)
    err = {}
    for sampler in ("ddim", "dpmpp"):
        for spacing in (None, "logsnr"):  # each sampler's own step grid, then the same grid for both
            x = sample(denoise, (N,), schedule=schedule, sampler=sampler, steps=10, x_T=x_T, spacing=spacing)
            err[sampler, spacing] = (x - exact).abs().max().item()
    assert err["dpmpp", None] < 0.5 * err["ddim", None]
    assert err["dpmpp", "logsnr"] < 0.2 * err["ddim", "logsnr"]


def test_ode_samplers_converge_to_the_exact_solution(schedule):
    """DDIM is first order and DPM-Solver++(2M) second order in the step size."""
    x_T = torch.randn(2000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = exact_ode_solution(schedule, x_T)
    denoise = gaussian_oracle(schedule)
    def error(sampler, steps, spacing=None):
        x = sample(denoise, x_T.shape, schedule=schedule, sampler=sampler, steps=steps, x_T=x_T, spacing=spacing)
        return (x - exact).abs().max().item()
    ddim = [error("ddim", k) for k in (25, 100, 400)]
    assert ddim[0] > ddim[1] > ddim[2] and ddim[2] < 0.02
    assert 2.5 < ddim[1] / ddim[2] < 6  # error ~ 1/steps
    dpm = [error("dpmpp", k) for k in (25, 100)]
    assert dpm[1] < 0.005 and dpm[0] / dpm[1] > 6
    # error ~ 1/steps^2 also where consecutive log-SNR steps differ a lot, which needs the right
    # step ratio r_i = h_{i-1} / h_i (an inverted ratio still converges, but only ~5-7x per 4x steps)
    dpm = [error("dpmpp", k, "uniform") for k in (100, 400)]
    assert dpm[1] < 2e-3 and dpm[0] / dpm[1] > 12


def test_x0_predicting_network_wrapped_to_eps_samples_identically():
    s = NoiseSchedule.from_name("linear", 1000)
    eps_net = gaussian_oracle(s)
    x0_net = lambda x, t: eps_to_x0(s, x, t, eps_net(x, t))  # noqa: E731  a network that predicts x0
    wrapped = lambda x, t: model_output_to_eps(s, Prediction.X0, x0_net(x, t), x, t)  # noqa: E731
    x_T = torch.randn(1000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for sampler in ("ddim", "dpmpp"):
        a = sample(eps_net, x_T.shape, schedule=s, sampler=sampler, steps=20, x_T=x_T)
        b = sample(wrapped, x_T.shape, schedule=s, sampler=sampler, steps=20, x_T=x_T)
        assert torch.allclose(a, b, atol=1e-8)


def exact_x0_estimate_at(schedule, x_T, t_min, mu=MU, sd=SD):
    """E[x_0 | x_{t_min}] at the exact ODE solution x_{t_min} from x_T (the invariant in the docstring)."""
    ab_T, ab = schedule.alphas_cumprod[-1].item(), schedule.alphas_cumprod[t_min].item()
    c = (x_T - ab_T**0.5 * mu) / (ab_T * sd**2 + 1 - ab_T) ** 0.5
    x_t = ab**0.5 * mu + c * (ab * sd**2 + 1 - ab) ** 0.5
    return mu + ab**0.5 * sd**2 * (x_t - ab**0.5 * mu) / (ab * sd**2 + 1 - ab)


@pytest.mark.parametrize("t_min", [0, 120, 400])
def test_t_min_returns_the_x0_estimate_at_t_min_of_the_exact_ode(schedule, t_min):
    """Sampling down to t_min only: the result is the denoiser's x0 estimate there, E[x_0 | x_{t_min}], whose
    spread is the data's shrunk by the noise left (std sd^2 alpha / sqrt(alpha^2 sd^2 + sigma^2) < sd)."""
    x_T = torch.randn(2000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = exact_x0_estimate_at(schedule, x_T, t_min)
    x = sample(gaussian_oracle(schedule), x_T.shape, schedule=schedule, sampler="dpmpp", steps=100, x_T=x_T,
               t_min=t_min)
    assert (x - expected).abs().max().item() < 0.005
    ab = schedule.alphas_cumprod[t_min].item()
    shrunk = ab**0.5 * SD**2 / (ab * SD**2 + 1 - ab) ** 0.5
    assert x.std().item() == pytest.approx(shrunk, rel=0.05)
    if t_min == 400:
        assert shrunk < 0.8 * SD  # far from the data's own spread: the test tells t_min apart from 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "dpmpp_karras", "euler", "euler_a", "heun"])
def test_every_sampler_stops_at_t_min_and_returns_its_last_x0_estimate(sampler):
    s = NoiseSchedule.from_name("cosine", 1000)
    oracle, seen, estimates = gaussian_oracle(s), [], []

    def denoise(x, t):
        seen.append(int(t[0]))
        return oracle(x, t)

    x = sample(denoise, (64,), schedule=s, sampler=sampler, steps=12, t_min=150,
               generator=torch.Generator().manual_seed(6), callback=lambda d: estimates.append(d["x0"]))
    assert min(seen) == 150 and seen[-1] == 150 and max(seen) == 999
    assert len(estimates) == 12 and torch.allclose(x, estimates[-1].to(x.dtype), atol=1e-6)
