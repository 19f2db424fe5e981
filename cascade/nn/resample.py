"""2x down- and upsampling layers between U-Net levels (ADM's `Downsample` / `Upsample` with a
convolution, as the decoder and the super-resolution U-Nets both use them).

Both may change the channel count on the way (Imagen's Efficient U-Net does; ADM keeps it), so
`out_ch` defaults to `in_ch`. Each holds one convolution named `conv`, the name checkpoints store.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Downsample(nn.Module):
    """Strided 3x3 convolution: (B, in_ch, H, W) -> (B, out_ch, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch or in_ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 convolution: (B, in_ch, H, W) -> (B, out_ch, 2H, 2W)."""

    def __init__(self, in_ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch or in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
