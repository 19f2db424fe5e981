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
    """Nearest 2x, then a 3x3 convolution: (B, in_ch, H, W) -> (B, out_ch, 2H, 2W), computed as the
    four 2x2 convolutions it amounts to at the input's resolution (`NearestUpConv`)."""

    def __init__(self, in_ch: int, out_ch: int | None = None):
        super().__init__()
        self.conv = NearestUpConv(in_ch, out_ch or in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class NearestUpConv(nn.Conv2d):
    """A 3x3 convolution of its input upsampled 2x by nearest neighbour, computed at the input's resolution.

    Output pixel (2i + dy, 2j + dx) sees two distinct rows and two distinct columns of the input: the
    taps of the 3x3 filter that land on one input pixel add up to one weight. So the output is four 2x2
    convolutions of the input, one per phase (dy, dx), run as one convolution with 4 out_ch channels and
    interleaved: a sub-pixel convolution (Shi et al. 2016) whose weights are folded from the 3x3 ones.
    16 multiply-adds per input pixel and channel pair against the 36 of the convolution over the
    upsampled map, which is never written (on this CPU 1.5x faster at the SR net's shapes, 1.1-1.3x at
    the tiny decoder's: benchmarks/upsample_phases.py). The parameters are the 3x3 convolution's, so
    checkpoints do not change; the outputs agree up to float rounding, for every `padding_mode` too (it pads
    the upsampled map, as nn.Conv2d's would).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_ch, H, W) -> (B, out_ch, 2H, 2W)
        weight, bias = phase_filters(self.weight, self.bias)
        if self.padding_mode == "zeros":
            phases = F.conv2d(x, weight, bias, padding=1)  # (B, 4 out_ch, H + 1, W + 1)
        else:  # the upsampled map's 1-px edge is the input's: "reflect" of the one is "replicate" of the other
            mode = "replicate" if self.padding_mode == "reflect" else self.padding_mode
            phases = F.conv2d(same_layout(F.pad(x, (1, 1, 1, 1), mode=mode), x), weight, bias)
        return interleave_phases(phases, x.shape[-1], (0, 2 * x.shape[-2]))


def same_layout(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`y` channels-last where `x` is (F.pad's circular mode returns a contiguous tensor)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _fold(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The 3 taps of `w` along `dim` as the 2 input rows (or columns) each phase reads: (2, ...) with 2 at `dim`.
    Phase 0 (even rows) reads rows i - 1 and i, with taps 0 and 1 + 2; phase 1 (odd rows) rows i and i + 1,
    with taps 0 + 1 and 2."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack([torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)])


def phase_filters(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 3x3 filter (O, I, 3, 3) and its bias (O,) as the 2x2 filters of its four phases, (4 O, I, 2, 2), and
    their bias (4 O,): phase (dy, dx) in block 2 dy + dx of the output channels."""
    folded = _fold(_fold(weight.float(), -2), -1)  # (dx, dy, O, I, 2, 2); in fp32, where bf16 sums would round
    folded = folded.transpose(0, 1).reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)
    return folded, None if bias is None else bias.repeat(4)


def interleave_phases(phases: torch.Tensor, width: int, rows: tuple[int, int],
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [a, b) of the upsampled output from its phase convolution, (B, 4 O, U, width + 1) -> (B, O, b - a, 2 width).

    Row r = 2i + dy, column 2j + dx is phase (dy, dx) at (i + dy, j + dx); `phases` holds the phase rows
    from (a + 1) // 2, the first one rows [a, b) read. Written into `out` when given (a view of a buffer).
    """
    a, b = rows
    channels = phases.shape[1] // 4
    if out is None:
        keep_last = phases.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if keep_last else torch.contiguous_format
        out = torch.empty((phases.shape[0], channels, b - a, 2 * width), dtype=phases.dtype, device=phases.device,
                          memory_format=layout)
    first = (a + 1) // 2
    for dy in (0, 1):
        r = a + (dy - a) % 2  # the first row from a of this parity
        if r >= b:
            continue
        n, u = (b - r + 1) // 2, (r + 1) // 2 - first
        for dx in (0, 1):
            block = (2 * dy + dx) * channels
            out[:, :, r - a::2, dx::2] = phases[:, block:block + channels, u:u + n, dx:dx + width]
    return out
