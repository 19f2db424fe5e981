"""Image-quality metrics for super-resolution: PSNR and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004).

Both take images in [-1, 1] (the cascade's convention), map them to [0, 1] and return one value per
image, (B,). SSIM follows the paper's reference settings: an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, dynamic range L = 1, local statistics by the window (eqs. 14-15), the index
(eq. 13) averaged over the positions where the window fits inside the image and over channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from superres.degradations import gaussian_kernel1d


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.double().clamp(-1, 1) + 1) / 2


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / MSE) in dB per image for (B, C, H, W) pairs in [-1, 1], capped at 100 dB (MSE floored
    at 1e-10) so that one identical pair does not turn a mean into inf."""
    mse = (_unit(x) - _unit(y)).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, *, sigma: float = 1.5, radius: int = 5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity per image of (B, C, H, W) pairs in [-1, 1] (Wang et al. 2004, eq. 13)."""
    x, y = _unit(x), _unit(y)
    c = x.shape[1]
    k = gaussian_kernel1d(sigma, radius).double()
    kx = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def window_mean(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(z, kx, groups=c), ky, groups=c)

    mu_x, mu_y = window_mean(x), window_mean(y)
    var_x = window_mean(x * x) - mu_x ** 2
    var_y = window_mean(y * y) - mu_y ** 2
    cov = window_mean(x * y) - mu_x * mu_y
    c1, c2 = k1 ** 2, k2 ** 2  # (K L)^2 with L = 1
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def bicubic_upsample(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The baseline: bicubic interpolation (a = -0.75, PyTorch's) to `size`, clamped to [-1, 1]."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
