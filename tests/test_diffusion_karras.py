"""Karras et al. 2022's samplers (Euler, Euler ancestral, Heun) and DPM-Solver++(2M) on their sigma grid,
against the exact Gaussian oracle of test_diffusion_sampling; and DDIM's eta reaching every stage."""
import typing

import pytest
import torch

from cascade.diffusion import NoiseSchedule, sample
from cascade.diffusion.sampling import SAMPLERS
from test_diffusion_sampling import MU, SD, exact_ode_solution, gaussian_oracle

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return NoiseSchedule.from_name(request.param, 1000)


def test_the_karras_grid_is_distinct_steps_from_the_first_to_the_last_denser_at_low_noise(schedule):
    for steps in (2, 10, 50, 200):
        _, kept = schedule.respace(steps, "karras")
        assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == steps
        assert kept[0] == 0 and kept[-1] == schedule.timesteps - 1
    _, karras = schedule.respace(20, "karras")
    _, uniform = schedule.respace(20, "uniform")
    assert (karras < 250).sum() > (uniform < 250).sum()  # more of the steps where the noise is low


def _error(schedule, sampler, steps, x_T):
    x = sample(gaussian_oracle(schedule), x_T.shape, schedule=schedule, sampler=sampler, steps=steps, x_T=x_T)
    return (x - exact_ode_solution(schedule, x_T)).abs().max().item()


def test_euler_is_first_order_and_heun_and_dpmpp_karras_second_order(schedule):
    x_T = torch.randn(2000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    euler = [_error(schedule, "euler", k, x_T) for k in (20, 80)]
    assert euler[0] > euler[1] and 2.5 < euler[0] / euler[1] < 6  # error ~ 1/steps
    for sampler in ("heun", "dpmpp_karras"):
        err = [_error(schedule, sampler, k, x_T) for k in (20, 80)]
        assert err[1] < 0.01 and err[0] / err[1] > 8, (sampler, err)  # error ~ 1/steps^2
    assert _error(schedule, "heun", 20, x_T) < _error(schedule, "euler", 20, x_T) / 2


def test_heun_samples_the_data_distribution():
    s = NoiseSchedule.from_name("cosine", 1000)
    x = sample(gaussian_oracle(s), (20000,), schedule=s, sampler="heun", steps=25,
               generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(MU, abs=0.015) and x.std().item() == pytest.approx(SD, abs=0.02)


def test_euler_ancestral_samples_the_data_distribution_and_follows_its_generator():
    s = NoiseSchedule.from_name("linear", 1000)
    def draw(seed, n=20000, steps=400):
        return sample(gaussian_oracle(s), (n,), schedule=s, sampler="euler_a", steps=steps,
                      generator=torch.Generator().manual_seed(seed))
    x = draw(0)
    assert x.mean().item() == pytest.approx(MU, abs=0.015) and x.std().item() == pytest.approx(SD, abs=0.02)
    x_T = torch.randn(64, generator=torch.Generator().manual_seed(5))
    a = sample(gaussian_oracle(s), (64,), schedule=s, sampler="euler_a", steps=10, x_T=x_T,
               generator=torch.Generator().manual_seed(1))
    b = sample(gaussian_oracle(s), (64,), schedule=s, sampler="euler_a", steps=10, x_T=x_T,
               generator=torch.Generator().manual_seed(1))
    c = sample(gaussian_oracle(s), (64,), schedule=s, sampler="euler_a", steps=10, x_T=x_T,
               generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)  # its noise comes from the generator


def test_every_place_that_names_the_samplers_names_the_same_ones():
    from cascade.cli import SAMPLER_CHOICES
    from cascade.stage import DiffusionConfig

    assert SAMPLER_CHOICES == SAMPLERS
    assert typing.get_args(DiffusionConfig.model_fields["sampler"].annotation) == SAMPLERS


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpmpp_karras"])
def test_a_stage_samples_with_each_new_sampler(sampler):
    from bundle_helpers import DECODER, seeded_stage

    stage = seeded_stage("decoder", **DECODER, steps=3)
    g = torch.Generator().manual_seed(0)
    cond = {"clip_image": torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=-1)}
    out = stage.sample(cond, sampler=sampler, steps=3, guidance=2.0, generator=g)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_eta_reaches_every_stage_and_changes_only_ddim_draws(tmp_path):
    from bundle_helpers import small_bundle
    from cascade.pipeline import Cascade, Settings

    cascade = Cascade.from_bundle(small_bundle(tmp_path / "b"))
    kwargs = Settings(eta=1.0).for_stage("prior", cascade.stages["prior"])
    assert kwargs["eta"] == 1.0 and "eta" not in Settings().for_stage("prior", cascade.stages["prior"])
    plain = cascade.generate(["a red circle"], seed=0, until="sr256", settings=Settings(sampler="ddim"))
    noisy = cascade.generate(["a red circle"], seed=0, until="sr256", settings=Settings(sampler="ddim", eta=1.0))
    for name in ("decoder", "sr256"):
        assert not torch.equal(plain.images[name], noisy.images[name])
    assert not torch.equal(plain.image_embeddings, noisy.image_embeddings)


@pytest.mark.parametrize("args,needle", [
    (["--eta", "1.5"], "--eta 1.5: must be between 0 and 1"),
    (["--eta", "0.5", "--sampler", "heun"], "--sampler heun does not use it"),
])
def test_eta_mistakes_are_one_line_errors(args, needle, tmp_path, capsys):
    from bundle_helpers import small_bundle
    from cascade.cli import main

    bundle = small_bundle(tmp_path / "b")
    assert main(["generate", "--prompt", "a red circle", "--model", str(bundle), "--out", str(tmp_path / "o"),
                 "--until", "decoder", *args]) == 2
    assert needle in capsys.readouterr().err
