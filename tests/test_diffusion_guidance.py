"""The sampling contract: guidance, cond_mask, thresholding, seeding, learned variance, errors."""
import pytest
import torch

from cascade.diffusion import (
    Denoiser,
    NoiseSchedule,
    apply_threshold,
    combine_guidance,
    dynamic_threshold,
    sample,
    static_threshold,
)
from cascade.diffusion.thresholding import _per_sample_quantile
from cascade.errors import UserError

SHAPE = (4, 3, 8, 8)


@pytest.fixture
def schedule():
    return NoiseSchedule.from_name("linear", 100)


def conditional(x, t):
    return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)


def unconditional(x, t):
    return -0.2 * x + 0.1


class Recorder:
    """A denoise function that is conditional where cond_mask is True (or absent), and logs calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond_mask=None):
        self.calls.append((x.shape[0], t.clone(), None if cond_mask is None else cond_mask.clone()))
        if cond_mask is None:
            return conditional(x, t)
        m = cond_mask.reshape(-1, 1, 1, 1)
        return torch.where(m, conditional(x, t), unconditional(x, t))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_guidance_one_is_the_conditional_model_and_zero_the_unconditional(schedule, sampler):
    def run(fn, w):
        return sample(fn, SHAPE, schedule=schedule, sampler=sampler, steps=10, guidance=w,
                      generator=torch.Generator().manual_seed(0))
    rec = Recorder()
    # `conditional` takes no cond_mask: w = 1 and w = None must not pass one
    assert torch.equal(run(rec, 1.0), run(conditional, None))
    assert all(mask is None for _, _, mask in rec.calls)
    assert torch.allclose(run(Recorder(), 0.0), run(unconditional, None), atol=1e-5)


def test_guided_sampling_calls_the_network_once_per_step_on_a_doubled_batch(schedule):
    rec = Recorder()
    sample(rec, SHAPE, schedule=schedule, sampler="ddim", steps=7, guidance=4.0,
           generator=torch.Generator().manual_seed(0))
    assert len(rec.calls) == 7
    _, kept_steps = schedule.respace(7)
    for (batch, t, mask), step in zip(rec.calls, kept_steps.flip(0).tolist()):
        assert batch == 2 * SHAPE[0]
        assert mask.dtype == torch.bool and mask.tolist() == [True] * 4 + [False] * 4
        assert t.tolist() == [step] * 8  # original timesteps, also when respaced


def test_guided_eps_is_the_cfg_combination(schedule):
    sub, kept_steps = schedule.respace(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    i = torch.full((4,), 6)
    out = Denoiser(Recorder(), sub, kept_steps, guidance=3.0)(x, i)
    t = kept_steps[i]
    expected = unconditional(x, t) + 3.0 * (conditional(x, t) - unconditional(x, t))
    assert torch.allclose(out.eps, expected, atol=1e-6)
    assert torch.equal(combine_guidance(torch.ones(2), torch.zeros(2), 2.5), torch.full((2,), 2.5))


def test_guidance_keeps_the_conditional_learned_variance(schedule):
    def denoise(x, t, cond_mask=None):
        m = cond_mask.reshape(-1, 1, 1, 1).float().expand_as(x)
        return torch.zeros_like(x), m - 0.5  # variance output 0.5 conditional, -0.5 unconditional
    sub, kept_steps = schedule.respace(10)
    out = Denoiser(denoise, sub, kept_steps, guidance=5.0)(torch.zeros(SHAPE), torch.full((4,), 3))
    assert torch.equal(out.variance_out, torch.full(SHAPE, 0.5))


def test_dynamic_threshold_leaves_in_range_x0_unchanged():
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert torch.equal(dynamic_threshold(x0, 0.995), x0)
    assert torch.equal(static_threshold(x0), x0)


def test_dynamic_threshold_maps_the_rest_into_range_per_sample():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=g) * torch.tensor([0.2, 1.0, 3.0, 10.0]).reshape(4, 1, 1, 1)
    out = dynamic_threshold(x0, 0.9)
    assert out.abs().max().item() <= 1.0 + 1e-6
    s = torch.quantile(x0.abs().reshape(4, -1), 0.9, dim=1).clamp(min=1).reshape(4, 1, 1, 1)
    assert torch.allclose(out, x0.clamp(-s, s) / s)
    assert torch.equal(out[0], x0[0])  # a sample already in range is untouched
    assert out[3].abs().max().item() == pytest.approx(1.0)  # saturated values land on the boundary
    assert torch.equal(apply_threshold(x0, None), x0)
    assert torch.equal(apply_threshold(x0, "static"), x0.clamp(-1, 1))


def test_per_sample_quantile_matches_torch_quantile():
    v = torch.rand(3, 1001, generator=torch.Generator().manual_seed(4))
    for q in (0.0, 0.5, 0.9, 0.995, 1.0):
        assert torch.allclose(_per_sample_quantile(v, q), torch.quantile(v, q, dim=1))


def test_thresholded_x0_and_recomputed_eps_stay_consistent(schedule):
    """Imagen Sec. 2.3: eps is recomputed from the clipped x0, so x_t = alpha x0 + sigma eps holds."""
    sub, kept_steps = schedule.respace(10)
    x = 5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    i = torch.full((4,), 2)
    for threshold in ("static", 0.95):
        out = Denoiser(unconditional, sub, kept_steps, threshold=threshold)(x, i)
        assert out.x0.abs().max().item() <= 1.0 + 1e-6
        ab = sub.alphas_cumprod[2].item()
        assert torch.allclose(ab**0.5 * out.x0 + (1 - ab) ** 0.5 * out.eps, x, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
@pytest.mark.parametrize("threshold", ["static", 0.99])
def test_thresholded_samples_land_in_range(schedule, sampler, threshold):
    x = sample(lambda x, t: -x, SHAPE, schedule=schedule, sampler=sampler, steps=10, threshold=threshold,
               generator=torch.Generator().manual_seed(6))
    assert x.abs().max().item() <= 1.0 + 1e-5


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("dpmpp", 0.0)])
def test_same_generator_seed_gives_identical_samples(schedule, sampler, eta):
    def run(seed):
        return sample(conditional, SHAPE, schedule=schedule, sampler=sampler, steps=10, eta=eta,
                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_fixed_x_T_makes_deterministic_samplers_ignore_the_generator(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    for sampler in ("ddim", "dpmpp"):
        a, b = (sample(conditional, SHAPE, schedule=schedule, sampler=sampler, steps=10, x_T=x_T,
                       generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
        assert torch.equal(a, b)
    stochastic = [sample(conditional, SHAPE, schedule=schedule, sampler="ddpm", steps=10, x_T=x_T,
                         generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    assert not torch.equal(*stochastic)


def test_ddpm_learned_variance_endpoints_are_the_fixed_variances(schedule):
    """variance_out = -1 gives sigma^2 = beta~ ("small"), +1 gives beta ("large") (Nichol & Dhariwal eq. 15)."""
    def with_variance_out(value):
        return lambda x, t: (conditional(x, t), torch.full_like(x, value))
    def run(fn, **kw):
        return sample(fn, SHAPE, schedule=schedule, sampler="ddpm", steps=20,
                      generator=torch.Generator().manual_seed(0), **kw)
    assert torch.allclose(run(with_variance_out(-1.0)), run(conditional, variance="small"), atol=1e-5)
    assert torch.allclose(run(with_variance_out(1.0)), run(conditional, variance="large"), atol=1e-5)
    # the deterministic samplers ignore the variance output
    a = sample(with_variance_out(0.3), SHAPE, schedule=schedule, sampler="ddim", steps=5, x_T=torch.ones(SHAPE))
    b = sample(conditional, SHAPE, schedule=schedule, sampler="ddim", steps=5, x_T=torch.ones(SHAPE))
    assert torch.equal(a, b)


def test_callback_sees_every_step_in_descending_order(schedule):
    seen = []
    sample(conditional, SHAPE, schedule=schedule, sampler="dpmpp", steps=6, progress=True,
           callback=lambda info: seen.append((info["i"], info["x"].shape, info["x0"].shape)))
    assert [i for i, _, _ in seen] == [5, 4, 3, 2, 1, 0]
    assert all(a == SHAPE and b == SHAPE for _, a, b in seen)


def test_one_step_sampling_returns_the_x0_prediction(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10))
    ab = schedule.alphas_cumprod[-1].item()
    expected = (x_T - (1 - ab) ** 0.5 * conditional(x_T, torch.full((4,), 99))) / ab**0.5
    for sampler in ("ddpm", "ddim", "dpmpp"):
        out = sample(conditional, SHAPE, schedule=schedule, sampler=sampler, steps=1, x_T=x_T)
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"sampler": "lms"}, "unknown sampler"),
    ({"steps": 0}, "steps"),
    ({"steps": 101}, "steps"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": "dynamic"}, "threshold"),
    ({"eta": -1.0}, "eta"),
    ({"variance": "learned"}, "variance"),
    ({"spacing": "quadratic"}, "spacing"),
])
def test_bad_sampling_options_are_user_errors(schedule, kwargs, match):
    options = {"schedule": schedule, "sampler": "ddim", "steps": 10, **kwargs}
    with pytest.raises(UserError, match=match):
        sample(conditional, SHAPE, **options)


def test_generator_draws_x_T_first(schedule):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    for sampler in ("ddim", "dpmpp"):
        seeded = sample(conditional, SHAPE, schedule=schedule, sampler=sampler, steps=5,
                        generator=torch.Generator().manual_seed(11), device="cpu")
        assert torch.equal(seeded, sample(conditional, SHAPE, schedule=schedule, sampler=sampler, steps=5, x_T=x_T))
