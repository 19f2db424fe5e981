"""Running a fully convolutional network over a large image in overlapping tiles, blended.

The image is cut into a grid of core regions; each tile is its core plus `margin` pixels of context
on every side that has a neighbour. Neighbouring outputs are cross-faded with linear ramps of width
`blend` centred on the seam, and the ramps of two neighbours sum to one, so the blend is a partition
of unity. A network with receptive-field radius R gives exactly its untiled output when
margin - blend / 2 >= R (every pixel a tile contributes to then sees no tile edge); with less margin
the error is confined to the seams and shrinks as the margin grows.

Why tile at all: on a CPU, per-pixel cost grows with image size once feature maps outgrow the cache
(a plain conv net here: 34x the time for 16x the pixels). Tiles keep the working set the size of one
training patch.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def core_bounds(size: int, tile: int, align: int) -> list[int]:
    """Boundaries 0 = c_0 < ... < c_n = size of n = ceil(size / tile) near-equal cores, multiples of `align`."""
    n = max(1, math.ceil(size / tile))
    return [min(size, round(k * size / n / align) * align) for k in range(n)] + [size]


def _ramp(positions: torch.Tensor, seam: float, blend: int) -> torch.Tensor:
    """0 before the seam, 1 after it, linear over `blend` pixels centred on it (pixel centres at p + 0.5)."""
    if blend == 0:
        return (positions >= seam).float()
    return ((positions + 0.5 - (seam - blend / 2)) / blend).clamp(0.0, 1.0)


def _axis_tiles(size: int, tile: int, margin: int, blend: int, align: int
                ) -> list[tuple[int, int, torch.Tensor]]:
    """(start, stop, weights) per tile along one axis; the weights of all tiles sum to one."""
    bounds = core_bounds(size, tile, align)
    out = []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        a, b = max(0, c0 - margin), min(size, c1 + margin)
        p = torch.arange(a, b, dtype=torch.float32)
        w = torch.ones(b - a)
        if c0 > 0:
            w = w * _ramp(p, c0, blend)
        if c1 < size:
            w = w * (1 - _ramp(p, c1, blend))
        out.append((a, b, w))
    return out


def tiled_apply(fn: Callable[..., torch.Tensor], images: Sequence[torch.Tensor], *, tile: int, margin: int,
                blend: int | None = None, align: int = 1, **kwargs) -> torch.Tensor:
    """fn(*crops, **kwargs) over overlapping tiles of `images` (each (B, C_i, H, W)), blended -> (B, C_out, H, W).

    `tile` is the core size, `margin` the context added on each inner side, `blend` the ramp width
    (default: margin). Tile corners and sizes are multiples of `align` (the network's total
    downsampling) so strided layers see the same pixel grid as on the whole image.
    """
    blend = margin if blend is None else blend
    if margin % align or tile % align:
        raise ValueError(f"tile ({tile}) and margin ({margin}) must be multiples of align ({align})")
    if blend > 2 * margin or blend > tile:
        raise ValueError(f"blend ({blend}) must be <= 2 * margin ({2 * margin}) and <= tile ({tile})")
    h, w = images[0].shape[-2:]
    rows, cols = _axis_tiles(h, tile, margin, blend, align), _axis_tiles(w, tile, margin, blend, align)
    if len(rows) == 1 and len(cols) == 1:
        return fn(*images, **kwargs)
    out = None
    for y0, y1, wy in rows:
        for x0, x1, wx in cols:
            y = fn(*(im[..., y0:y1, x0:x1] for im in images), **kwargs)  # (B, C_out, y1 - y0, x1 - x0)
            if out is None:
                out = y.new_zeros(y.shape[:2] + (h, w))
            weight = (wy[:, None] * wx[None, :]).to(y)
            out[..., y0:y1, x0:x1] += y * weight
    return out
