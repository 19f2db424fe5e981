"""Inpainting masks: read from a PNG or a box, resized between the cascade's resolutions, feathered for
pasting, and drawn at random for training a GLIDE-style inpainting decoder.

A mask is a float tensor (1, H, W) (or (B, 1, H, W)) in [0, 1], 1 where the image is repainted (white in
a mask PNG) and 0 where it is kept.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cascade.errors import UserError


def read_mask(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """The mask PNG at `path` as (1, H, W) in [0, 1] (its luminance; a transparent pixel is black, kept);
    `size` = (W, H) of the image it belongs to, which it must match."""
    from cascade.images import open_image

    im = open_image(path, "mask image")
    if im.mode in ("RGBA", "LA", "P"):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    gray = im.convert("L")
    if gray.size != tuple(size):
        raise UserError(f"the mask is {gray.size[0]}x{gray.size[1]} but the image is {size[0]}x{size[1]}; "
                        "they must be the same size")
    return check_mask(torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None])


def box_mask(box: str, size: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) with 1 inside the box 'x0,y0,x1,y1' (pixels of the image, x1 and y1 excluded) and 0 outside;
    `size` = (W, H) of the image."""
    w, h = size
    try:
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise UserError(f"--box takes four whole numbers x0,y0,x1,y1 in pixels, got '{box}'") from None
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise UserError(f"--box {box} is not a box inside the {w}x{h} image (need 0 <= x0 < x1 <= {w} and "
                        f"0 <= y0 < y1 <= {h})")
    mask = torch.zeros(1, h, w)
    mask[:, y0:y1, x0:x1] = 1.0
    return mask


def check_mask(mask: torch.Tensor) -> torch.Tensor:
    """`mask`, or a UserError when it marks nothing to repaint."""
    if not bool((mask >= 0.5).any()):
        raise UserError("the mask is empty: nothing to repaint (white or a --box marks what to repaint)")
    return mask


def check_region(known: torch.Tensor | None, mask: torch.Tensor, rows: int, height: int,
                 width: int) -> None:
    """A stage's inpainting inputs: `known` (rows, 3, height, width) and `mask` (1 or rows, 1, height, width);
    a UserError naming the shape expected otherwise."""
    if known is None or tuple(known.shape) != (rows, 3, height, width):
        raise UserError(f"inpainting needs the known image as ({rows}, 3, {height}, {width}), got "
                        f"{None if known is None else tuple(known.shape)}")
    if mask.dim() != 4 or mask.shape[0] not in (1, rows) or tuple(mask.shape[1:]) != (1, height, width):
        raise UserError(f"the inpainting mask must be (1 or {rows}, 1, {height}, {width}), got {tuple(mask.shape)}")


def center_square(image: torch.Tensor) -> torch.Tensor:
    """The centred square crop of (..., H, W) (as `cascade.images.read_image` crops)."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[..., top:top + side, left:left + side]


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, 3, size, size): antialiased bicubic, clipped; the same tensor when
    it already has that size."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    out = F.interpolate(image.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(-1.0, 1.0)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S) -> (B, 1, size, size), binary: a pixel is repainted when any part of the area it covers
    is (so a small mask never vanishes at a low resolution, and the known region never holds repainted
    pixels)."""
    if mask.shape[-1] == size:
        return (mask > 0).float()
    if mask.shape[-1] > size:
        return (F.adaptive_max_pool2d(mask.float(), size) > 0).float()
    return (F.interpolate(mask.float(), size=(size, size), mode="nearest") > 0).float()


def feather(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A binary mask (B, 1, H, W) ramped inwards over `width` pixels: 0 outside the mask (the known region
    stays exactly the original when pasted), k / width on the k-th ring inside its border, 1 deeper in."""
    if width <= 1:
        return mask.float()
    ring = mask.float()
    total = ring.clone()
    for _ in range(width - 1):
        ring = 1.0 - F.max_pool2d(1.0 - ring, 3, stride=1, padding=1)  # erode by one pixel
        total = total + ring
    return total / width


def paste(generated: torch.Tensor, known: torch.Tensor, mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """`generated` inside the mask, `known` outside, blended over `width` pixels inside the border."""
    weight = feather(mask, width).to(generated.dtype)
    return weight * generated + (1 - weight) * known.to(generated.dtype)


def random_masks(batch: int, size: int, *, p_whole: float = 0.25, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, 1, size, size) training masks for an inpainting decoder (GLIDE, Nichol et al. 2022, section
    3.5): the whole image with probability p_whole (so the model still generates), else a box (half the
    time) or 1-3 brush strokes, each covering roughly 5-60% of the image."""
    draws = torch.rand(batch, 8, generator=generator).tolist()
    masks = []
    for u in draws:
        if u[0] < p_whole:
            masks.append(np.ones((size, size), np.float32))
            continue
        canvas = Image.new("L", (size, size), 0)
        pen = ImageDraw.Draw(canvas)
        if u[1] < 0.5:
            bw, bh = (0.2 + 0.6 * u[2]) * size, (0.2 + 0.6 * u[3]) * size
            x0, y0 = u[4] * (size - bw), u[5] * (size - bh)
            pen.rectangle([round(x0), round(y0), round(x0 + bw) - 1, round(y0 + bh) - 1], fill=255)
        else:
            strokes = 1 + int(u[2] * 3)
            g = torch.Generator().manual_seed(int(u[3] * 2**31))
            for _ in range(strokes):
                width = max(2, round((0.06 + 0.12 * torch.rand((), generator=g).item()) * size))
                x, y = (torch.rand(2, generator=g) * size).tolist()
                points = [(x, y)]
                for _ in range(2 + int(torch.rand((), generator=g).item() * 4)):
                    angle = torch.rand((), generator=g).item() * 2 * math.pi
                    length = (0.1 + 0.3 * torch.rand((), generator=g).item()) * size
                    x = min(max(x + length * math.cos(angle), 0), size - 1)
                    y = min(max(y + length * math.sin(angle), 0), size - 1)
                    points.append((x, y))
                pen.line(points, fill=255, width=width, joint="curve")
                for px, py in points:
                    r = width / 2
                    pen.ellipse([px - r, py - r, px + r, py + r], fill=255)
        masks.append(np.asarray(canvas, np.float32) / 255.0)
    return torch.from_numpy(np.stack(masks))[:, None].to(device)
