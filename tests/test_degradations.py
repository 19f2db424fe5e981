"""Degradations for super-resolution training: identities at strength 0, range kept, determinism."""
import math

import pytest
import torch

from superres.degradations import (gaussian_blur, gaussian_kernel1d, jpeg, mixed_degradation, random_blur,
                                       resize_down_up)


def _images(b=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, s, s, generator=g) * 2 - 1


def test_level_zero_is_identity():
    x = _images()
    g = torch.Generator().manual_seed(1)
    assert gaussian_blur(x, 0.0) is x
    assert resize_down_up(x, 1.0) is x
    assert jpeg(x, None) is x
    assert random_blur(x, 0.0, g) is x
    assert mixed_degradation(x, 0.0, g) is x


def test_kernel_is_normalised_gaussian():
    k = gaussian_kernel1d(1.0, radius=3)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    # ratio of neighbouring taps is exp(-(2i+1) / 2 sigma^2)
    assert (k[4] / k[3]).item() == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert torch.equal(k, k.flip(0))


def test_blur_keeps_constant_and_mean_and_range():
    c = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(c, 1.5), c, atol=1e-6)
    x = _images()
    y = gaussian_blur(x, 1.2)
    assert y.shape == x.shape
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6
    assert y.std() < x.std()  # low-pass: white noise loses variance


def test_blur_of_single_image_matches_batch():
    x = _images()
    assert torch.allclose(gaussian_blur(x[0], 0.8), gaussian_blur(x, 0.8)[0], atol=1e-6)


@pytest.mark.parametrize("fn", [
    lambda x, g: resize_down_up(x, 2.7, "bicubic"),
    lambda x, g: jpeg(x, 20),
    lambda x, g: random_blur(x, 1.0, g),
    lambda x, g: mixed_degradation(x, 1.0, g),
])
def test_output_range_and_shape_kept(fn):
    x = _images(s=24).sign()  # +-1 edges: worst case for bicubic overshoot
    y = fn(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert y.min() >= -1.0 and y.max() <= 1.0


def test_mixed_degradation_is_deterministic_given_generator():
    x = _images(s=32)
    a = mixed_degradation(x, 0.8, torch.Generator().manual_seed(5))
    b = mixed_degradation(x, 0.8, torch.Generator().manual_seed(5))
    c = mixed_degradation(x, 0.8, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_jpeg_high_quality_is_close_and_low_quality_is_worse():
    # a smooth image: JPEG's error grows as quality falls
    u = torch.linspace(-1, 1, 32)
    x = torch.stack([u[None, :].expand(32, 32), u[:, None].expand(32, 32), (u[None] * u[:, None])])
    err_hi = (jpeg(x, 95) - x).abs().mean()
    err_lo = (jpeg(x, 5) - x).abs().mean()
    assert err_hi < 0.03
    assert err_lo > err_hi


def test_stronger_degradation_loses_more_detail():
    x = _images(b=4, s=32)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    errs = [(mixed_degradation(x, lv, g()) - x).pow(2).mean().item() for lv in (0.1, 1.0)]
    assert errs[0] < errs[1]
