"""Uploaded bytes -> a checked image, with the CLI's checks (`cascade.images.read_image`: not an image, a
decompression bomb) and a server's: a size limit on the bytes and on the pixels, read from the header
before anything is decoded, and only the formats a browser sends."""
from __future__ import annotations

import io
import warnings

from PIL import Image

from cascade.errors import UserError
from cascade.images import from_pil, to_pil

MAX_UPLOAD_BYTES = 16 * 2**20
MAX_PIXELS = 4096 * 4096
MAX_SIDE = 1024  # an upload is kept square, at most this size (the largest the cascade makes)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def open_upload(data: bytes, name: str, *, max_bytes: int = MAX_UPLOAD_BYTES) -> Image.Image:
    """The decoded image; a one-line UserError for an empty, too large, non-image or bomb upload."""
    if not data:
        raise UserError(f"{name}: the upload is empty")
    if len(data) > max_bytes:
        raise UserError(f"{name} is {len(data) / 2**20:.1f} MB; uploads are limited to {max_bytes / 2**20:g} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise UserError(f"{name} is a {image.format} image; send {', '.join(FORMATS)}")
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise UserError(f"{name} is {w}x{h} pixels; at most {MAX_PIXELS:,} (4096x4096) are accepted")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name}: too many pixels to decode safely (a decompression bomb?); at most "
                        f"{MAX_PIXELS:,} are accepted") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for truncated and non-image data
        raise UserError(f"not a readable image: {name} ({err.__class__.__name__})") from None
    return image


def square_image(image: Image.Image) -> Image.Image:
    """RGB (alpha onto white), centre-cropped square, at most MAX_SIDE: what every job takes as input."""
    side = min(MAX_SIDE, *image.size)
    return to_pil(from_pil(image, side))


def mask_image(image: Image.Image) -> Image.Image:
    """A mask as 8-bit grey: white repaints, black keeps; a transparent pixel is black (kept)."""
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return image.convert("L")
