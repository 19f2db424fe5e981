"""Image tensors <-> 8-bit RGB PNG files, with settings in PNG text chunks, and captioned grids."""
from __future__ import annotations

import io
import math
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from cascade.errors import UserError


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [-1, 1] -> 8-bit RGB PIL image (rounded, clipped)."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")


def from_pil(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [-1, 1]; alpha is composited onto white; optional square resize
    (short side to `size`, centre crop)."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB")
    if size is not None:
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1


def read_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as (3, H, W) in [-1, 1]; a UserError for a missing or non-image file."""
    image = open_image(path)
    try:
        return from_pil(image, size)
    except (OSError, ValueError) as err:  # a mode Pillow cannot convert to RGB (e.g. some 16-bit files)
        raise UserError(f"not a readable image: {path} ({err.__class__.__name__})") from None


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """The decoded image file at `path`; a one-line UserError, calling it `what`, for a directory, a missing
    file, a non-image, a truncated one or a decompression bomb."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an {what} file")
    if not path.is_file():
        raise UserError(f"{what} not found: {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"not a readable {what}: {path} ({err.__class__.__name__})") from None


# zlib level of every PNG the commands write: at 1024^2, 3 encodes in 0.12 s against 0.41 s at PIL's default
# 6, for files 12% larger (docs/results.md, 2026-12-07); a one-image `generate --until sr1024` writes two
PNG_COMPRESS_LEVEL = 3


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """An 8-bit PNG with `text` as tEXt chunks (prompt, seed, settings): what `save_png` writes and the
    studio serves."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def save_png(image: torch.Tensor | Image.Image, path: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write an 8-bit RGB PNG atomically, with `text` as tEXt chunks (prompt, seed, settings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png_bytes(pil, text))
    os.replace(tmp, path)
    return path


CAPTION_LINES = 3  # a caption wraps onto at most this many lines under its tile ("…" ends a longer one)
_LINE_H = 11  # PIL's default bitmap font: ~6 px per character, 11 px per line


def wrap_caption(text: str, chars: int, lines: int = CAPTION_LINES) -> list[str]:
    """`text` wrapped to `chars` per line, at most `lines` lines; a cut last line ends with "…"."""
    wrapped = textwrap.wrap(text, max(4, chars)) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(1, chars - 1)].rstrip() + "…"
    return wrapped


def make_grid(images: torch.Tensor | list[torch.Tensor], captions: list[str] | None = None,
              ncols: int | None = None, pad: int = 2, *, column_labels: list[str] | None = None) -> Image.Image:
    """Tile (N, 3, H, W) images in [-1, 1] into one RGB image, `ncols` per row; an optional caption
    under each tile, wrapped to the tile's width (up to CAPTION_LINES lines; "" for none), and optional
    `column_labels` above the columns (e.g. "bicubic", "SR", "real")."""
    tiles = [to_pil(im) for im in images]
    n = len(tiles)
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    tile_w, h = tiles[0].size
    w = max(tile_w, 96) if captions or column_labels else tile_w  # a 64 px tile gets a 96 px column of text
    ncols = ncols or min(n, max(1, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / ncols)
    chars = max(4, w // 6)
    lines = [wrap_caption(c, chars) if c else [] for c in captions] if captions else []
    ch = max((len(x) for x in lines), default=0) * _LINE_H + (2 if lines else 0)
    top = _LINE_H + 3 if column_labels else 0
    grid = Image.new("RGB", (ncols * (w + pad) + pad, top + nrows * (h + ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels or []):
        if c < ncols:
            text = wrap_caption(label, chars, lines=1)[0]
            draw.text((pad + c * (w + pad) + max(0, (w - 6 * len(text)) // 2), 1), text, fill=(0, 0, 0))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        x, y = pad + c * (w + pad), top + pad + r * (h + ch + pad)
        grid.paste(tile, (x + (w - tile_w) // 2, y))
        for j, line in enumerate(lines[i] if i < len(lines) else []):
            draw.text((x + 1, y + h + 1 + j * _LINE_H), line, fill=(0, 0, 0))
    return grid
