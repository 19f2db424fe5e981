"""A PNG grid of preview images, each with its caption underneath, written atomically."""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

CAPTION_LINES = 3


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: torch.Tensor, captions: list[str] | None = None, *,
               columns: int | None = None) -> Image.Image:
    """Tiles of (N, 3, H, W) images in [-1, 1], in rows of `columns`, captions below each tile."""
    tiles = to_uint8(images)
    n, h, w, _ = tiles.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    tile_w = max(w, 96)
    font = ImageFont.load_default()
    chars = max(8, tile_w // 6)
    line_h = 11
    caption_h = CAPTION_LINES * line_h + 4 if captions else 0
    pad = 4
    sheet = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (h + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, columns)
        x0 = pad + c * (tile_w + pad)
        y0 = pad + r * (h + caption_h + pad)
        sheet.paste(Image.fromarray(tiles[i]), (x0 + (tile_w - w) // 2, y0))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:CAPTION_LINES]
            for j, line in enumerate(lines):
                draw.text((x0, y0 + h + 2 + j * line_h), line, fill="black", font=font)
    return sheet


def save_grid(path: Path, images: torch.Tensor, captions: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    grid_image(images, captions).save(tmp, format="PNG")
    os.replace(tmp, path)
