"""Parameterisations, training losses and the variational bound terms."""
import math

import pytest
import torch

from cascade.diffusion import (
    NoiseSchedule,
    Prediction,
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    eps_to_x0,
    interpolated_log_variance,
    loss_terms,
    min_snr_weight,
    model_output_to_eps,
    model_output_to_x0,
    normal_kl,
    prediction_target,
    q_sample,
    sample_timesteps,
    v_to_eps,
    v_to_x0,
    x0_eps_to_v,
    x0_to_eps,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    s = NoiseSchedule.from_name("cosine", 100)
    # float64: at the last cosine step sqrt(alpha_bar) = 5e-4, which turns float32 rounding into 1e-3
    x0 = torch.rand(16, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.cat([torch.tensor([0, 99]), torch.randint(0, 100, (14,), generator=g)])
    return s, x0, noise, t


def test_eps_x0_v_round_trips(batch):
    s, x0, eps, t = batch
    x_t = q_sample(s, x0, t, eps)
    assert torch.allclose(eps_to_x0(s, x_t, t, eps), x0, atol=1e-9)
    assert torch.allclose(x0_to_eps(s, x_t, t, x0), eps, atol=1e-9)
    v = x0_eps_to_v(s, x0, eps, t)
    assert torch.allclose(v_to_x0(s, x_t, t, v), x0, atol=1e-9)
    assert torch.allclose(v_to_eps(s, x_t, t, v), eps, atol=1e-9)


def test_v_is_alpha_eps_minus_sigma_x0():
    """Salimans & Ho: v = alpha eps - sigma x0; on the angle picture v = d x_t / d phi."""
    s = NoiseSchedule.from_name("linear", 10)
    t = torch.tensor([4])
    ab = s.alphas_cumprod[4].item()
    v = x0_eps_to_v(s, torch.tensor([2.0]), torch.tensor([-1.0]), t)
    assert v.item() == pytest.approx(math.sqrt(ab) * -1.0 - math.sqrt(1 - ab) * 2.0, rel=1e-6)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_model_output_conversions_recover_eps_and_x0(batch, prediction):
    s, x0, eps, t = batch
    x_t = q_sample(s, x0, t, eps)
    perfect = prediction_target(s, prediction, x0, eps, t)
    assert torch.allclose(model_output_to_eps(s, prediction, perfect, x_t, t), eps, atol=1e-9)
    assert torch.allclose(model_output_to_x0(s, prediction, perfect, x_t, t), x0, atol=1e-9)
    assert Prediction(prediction.value) is prediction


@pytest.mark.parametrize("prediction", list(Prediction))
def test_simple_loss_is_zero_for_the_perfect_network(batch, prediction):
    s, x0, eps, t = batch
    perfect = lambda x_t, tt: prediction_target(s, prediction, x0, eps, tt)  # noqa: E731
    assert diffusion_loss(s, perfect, x0, t, eps, prediction).item() == pytest.approx(0.0, abs=1e-12)
    off = lambda x_t, tt: prediction_target(s, prediction, x0, eps, tt) + 0.5  # noqa: E731
    assert diffusion_loss(s, off, x0, t, eps, prediction).item() == pytest.approx(0.25, rel=1e-5)


def test_simple_loss_minimiser_is_the_posterior_mean_of_eps():
    """For x0 ~ N(mu, sd^2), E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 sd^2 + sigma^2), affine in
    x_t, so a per-step affine network trained on L_simple must find those coefficients."""
    torch.manual_seed(0)
    s, mu, sd, n = NoiseSchedule.from_name("cosine", 8), 0.5, 0.3, 4096
    slope = torch.zeros(8, requires_grad=True)
    bias = torch.zeros(8, requires_grad=True)
    model = lambda x_t, t: slope[t] * x_t + bias[t]  # noqa: E731
    opt = torch.optim.Adam([slope, bias], lr=0.05)
    losses = []
    for _ in range(200):
        x0 = mu + sd * torch.randn(n)
        t = sample_timesteps(s, n)
        loss = diffusion_loss(s, model, x0, t, torch.randn(n))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:5]) / 5
    alpha, sigma = s.signal_rates.float(), s.noise_rates.float()
    var = alpha**2 * sd**2 + sigma**2
    assert torch.allclose(slope.detach(), sigma / var, atol=0.05)
    assert torch.allclose(bias.detach(), -sigma * alpha * mu / var, atol=0.05)


def test_interpolated_variance_spans_beta_tilde_to_beta():
    s = NoiseSchedule.from_name("linear", 50)
    t = torch.arange(1, 50)
    lo = interpolated_log_variance(s, -torch.ones(49), t)
    hi = interpolated_log_variance(s, torch.ones(49), t)
    mid = interpolated_log_variance(s, torch.zeros(49), t)
    assert torch.allclose(lo, s.posterior_variance[1:].log().float())
    assert torch.allclose(hi, s.betas[1:].log().float())
    assert torch.allclose(mid, 0.5 * (lo + hi))


def _bayes_posterior(s, x0, x_t, t):
    ab_prev, alpha, beta = s.alphas_cumprod[t - 1].item(), s.alphas[t].item(), s.betas[t].item()
    var = 1 / (1 / (1 - ab_prev) + alpha / beta)
    return var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(alpha) * x_t / beta), var


def test_learned_variance_vlb_equals_closed_form_kl():
    """A scalar case by hand: KL(N(m1, s1) || N(m2, s2)) = (log(s2/s1) + (s1 + (m1 - m2)^2)/s2 - 1)/2,
    true posterior by Bayes' rule, model mean from the predicted eps, variance from the variance output (eq. 15)."""
    s = NoiseSchedule.from_name("linear", 10)
    x0, eps_true, eps_pred, variance_out, t = 0.4, -0.8, -0.5, 0.3, 5
    ab, ab_prev = s.alphas_cumprod[t].item(), s.alphas_cumprod[t - 1].item()
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps_true
    m1, s1 = _bayes_posterior(s, x0, x_t, t)
    x0_hat = (x_t - math.sqrt(1 - ab) * eps_pred) / math.sqrt(ab)
    m2, _ = _bayes_posterior(s, x0_hat, x_t, t)
    frac = (variance_out + 1) / 2
    s2 = math.exp(frac * math.log(s.betas[t].item()) + (1 - frac) * math.log(s1))
    kl_bits = 0.5 * (math.log(s2 / s1) + (s1 + (m1 - m2) ** 2) / s2 - 1) / math.log(2)

    model = lambda x, tt: torch.tensor([[eps_pred, variance_out]], dtype=torch.float64)  # noqa: E731
    terms = loss_terms(s, model, torch.tensor([[x0]], dtype=torch.float64), torch.tensor([t]),
                       torch.tensor([[eps_true]], dtype=torch.float64), learned_variance=True)
    assert kl_bits > 0 and terms["vlb"].item() == pytest.approx(kl_bits, rel=1e-6)
    assert terms["mse"].item() == pytest.approx((eps_pred - eps_true) ** 2)
    assert terms["loss"].item() == pytest.approx((eps_pred - eps_true) ** 2 + 1e-3 * 10 * kl_bits)


def test_normal_kl_is_zero_for_equal_gaussians_and_positive_otherwise():
    m, lv = torch.tensor([0.3, -1.0]), torch.tensor([-2.0, 0.5])
    assert torch.allclose(normal_kl(m, lv, m, lv), torch.zeros(2))
    assert bool((normal_kl(m, lv, m + 0.1, lv - 0.2) > 0).all())


def test_discretized_decoder_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, -3.0), (0.93, -4.0), (-1.2, -1.0)]:
        logp = discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                                   torch.tensor(log_scale, dtype=torch.float64))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # an interior bin by hand: Phi((x + 1/255 - m) / s) - Phi((x - 1/255 - m) / s)
    x, m, sd = levels[100].item(), -0.2, math.exp(-3.0)
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    mass = phi((x + 1 / 255 - m) / sd) - phi((x - 1 / 255 - m) / sd)
    got = discretized_gaussian_log_likelihood(*(torch.tensor(a, dtype=torch.float64) for a in (x, m, -3.0)))
    assert got.item() == pytest.approx(math.log(mass), rel=1e-9)


def test_vlb_at_first_step_is_decoder_nll_in_bits():
    s = NoiseSchedule.from_name("linear", 10)
    x0 = torch.tensor([[100 / 255 * 2 - 1]], dtype=torch.float64)
    model = lambda x, tt: torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # noqa: E731
    terms = loss_terms(s, model, x0, torch.tensor([0]), torch.zeros(1, 1, dtype=torch.float64),
                       learned_variance=True)
    # eps_hat = 0 and zero noise: x0_hat = x_t / sqrt(ab) = x0 exactly; variance beta_1
    expected = -discretized_gaussian_log_likelihood(x0, x0, 0.5 * s.betas[0].log()) / math.log(2)
    assert terms["vlb"].item() == pytest.approx(expected.item(), rel=1e-9)


def test_vlb_gradient_reaches_only_the_variance_channels(batch):
    s, x0, eps, t = batch
    out = torch.randn(16, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    terms = loss_terms(s, lambda x_t, tt: out, x0, t, eps, learned_variance=True)
    assert bool(torch.isfinite(terms["vlb"]).all()) and bool(torch.isfinite(terms["loss"]).all())
    (grad,) = torch.autograd.grad(terms["vlb"].sum(), out)
    assert grad[:, :3].abs().max().item() == 0.0
    assert grad[:, 3:].abs().max().item() > 0.0


def test_loss_rejects_mismatched_output_shapes(batch):
    s, x0, eps, t = batch
    with pytest.raises(ValueError, match="output"):
        diffusion_loss(s, lambda x_t, tt: x_t[:, :2], x0, t, eps)
    with pytest.raises(ValueError, match="learned variance"):
        diffusion_loss(s, lambda x_t, tt: x_t, x0, t, eps, learned_variance=True)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_vlb_vanishes_for_the_perfect_mean_and_posterior_variance(batch, prediction):
    """p = q exactly (mean from the true target, variance output -1 so Sigma = beta~): every KL term is 0."""
    s, x0, eps, t = batch
    t = t.clamp(min=1)  # step 1 is the decoder NLL, not a KL
    target = prediction_target(s, prediction, x0, eps, t)
    model = lambda x_t, tt: torch.cat([target, -torch.ones_like(target)], dim=1)  # noqa: E731
    terms = loss_terms(s, model, x0, t, eps, prediction, learned_variance=True)
    assert terms["vlb"].abs().max().item() < 1e-9


@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_loss_is_clipped_snr_times_the_x0_error(batch, prediction, plus_one):
    # Hang et al. 2023: whatever is predicted, the weighted loss is min(SNR_t, gamma) * |x0_hat - x0|^2
    # (min(SNR_t + 1, gamma) with plus_one).
    s, x0, noise, t = batch
    g = torch.Generator().manual_seed(1)
    out = torch.randn(x0.shape, generator=g, dtype=torch.float64)  # a wrong network, so the errors are not 0
    x_t = q_sample(s, x0, t, noise)
    terms = loss_terms(s, lambda *_: out, x0, t, noise, prediction, snr_gamma=5.0, snr_plus_one=plus_one)
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t]) + (1.0 if plus_one else 0.0)
    x0_error = ((model_output_to_x0(s, prediction, out, x_t, t) - x0) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["loss"].double(), snr.clamp(max=5.0) * x0_error, rtol=1e-4)
    assert torch.equal(terms["mse"], loss_terms(s, lambda *_: out, x0, t, noise, prediction)["mse"])
    weights = min_snr_weight(s, prediction, t, 5.0, plus_one=plus_one)
    assert weights.shape == t.shape and bool((weights > 0).all())
    if prediction == "v" and plus_one:  # the plain v loss wherever SNR + 1 <= gamma
        assert torch.allclose(weights[snr <= 5.0], torch.ones(()), atol=1e-6) and bool((snr <= 5.0).any())


def test_min_snr_weight_rejects_a_non_positive_gamma(batch):
    s, _, _, t = batch
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weight(s, "v", t, 0.0)


def test_logit_normal_timesteps_follow_their_closed_form():
    """P(t/T in [1/3, 2/3)) is 1/3 for uniform t and 2 Phi(ln 2) - 1 for t/T = sigmoid(N(0, 1)); a mix
    with probability p lies between, linearly in p."""
    s, n = NoiseSchedule.from_name("cosine", 1000), 200_000
    normal = torch.distributions.Normal(0.0, 1.0)
    mid_ln = float(2 * normal.cdf(torch.tensor(math.log(2.0))) - 1)  # 0.512
    for p in (0.0, 0.5, 1.0):
        t = sample_timesteps(s, n, torch.Generator().manual_seed(0), logit_normal=p)
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
        middle = float(((t >= 333) & (t < 667)).float().mean())
        assert middle == pytest.approx((1 - p) / 3 + p * mid_ln, abs=0.005)
    assert torch.equal(sample_timesteps(s, 64, torch.Generator().manual_seed(1)),
                       torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1)))  # uniform as before
    # shifted by m, the logit-normal's median is T sigmoid(m) and P(t/T >= 1/2) = Phi(m)
    m = 1.0
    t = sample_timesteps(s, n, torch.Generator().manual_seed(0), logit_normal=1.0, logit_mean=m)
    assert float(t.float().median()) == pytest.approx(1000 * 1 / (1 + math.exp(-m)), abs=3)
    assert float((t >= 500).float().mean()) == pytest.approx(float(normal.cdf(torch.tensor(m))), abs=0.005)
    with pytest.raises(ValueError, match="probability"):
        sample_timesteps(s, 4, logit_normal=1.5)
