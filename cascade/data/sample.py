"""`Sample`: what every data source yields and `cascade data build` writes as one shard entry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    key: str
    images: dict[int, Image.Image]  # size -> RGB image of that size
    txt: str
    json: dict[str, Any] = field(default_factory=dict)


# Sources whose images come in one size, for sets built before samples recorded `native_size`.
_NATIVE_SIZES = {"fluent-emoji-3d": 256}


def native_size(meta: dict[str, Any]) -> int | None:
    """The side of the image a sample was made from, when it had one (a raster source: sizes above it are
    upscales with no detail of their own); None for a drawn source (shapes, SVGs), real at every size."""
    size = meta.get("native_size")
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    return _NATIVE_SIZES.get(meta.get("source"))
