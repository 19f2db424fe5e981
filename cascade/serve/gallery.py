"""The images a studio holds in memory: results, uploads, drawn masks and animations, each as the PNG bytes
a download gets (with the same text chunks the CLI writes) and those chunks as the settings shown."""
from __future__ import annotations

import io
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from PIL import Image

from cascade.errors import UserError
from cascade.images import png_bytes, to_pil

MAX_ITEMS = 300  # the oldest go first (a 1024x1024 result is a few MB)
KINDS = ("result", "upload", "mask", "animation")  # masks are inputs only and are not listed


@dataclass
class Item:
    id: str
    kind: str
    name: str  # the download's file name, as the CLI would have named it
    png: bytes
    width: int
    height: int
    text: dict[str, str] = field(default_factory=dict)
    job: str | None = None

    def image(self) -> Image.Image:
        """The first frame as an RGB PIL image (an animation's too)."""
        with Image.open(io.BytesIO(self.png)) as im:
            return im.convert("RGB")

    def describe(self) -> dict:
        return {"id": self.id, "kind": self.kind, "name": self.name, "width": self.width,
                "height": self.height, "text": dict(self.text), "job": self.job,
                "url": f"/api/images/{self.id}.png"}


def animated_png(frames: list[Image.Image], *, size: int = 256, ms_per_frame: int = 250) -> bytes:
    """The frames as a looping APNG (lossless, so each frame is exactly the image), at most `size` px,
    forwards then back so the strip does not jump from the last frame to the first."""
    frames = [f if f.width <= size else f.resize((size, size), Image.LANCZOS) for f in frames]
    loop = frames + frames[-2:0:-1]
    buf = io.BytesIO()
    loop[0].save(buf, format="PNG", save_all=True, append_images=loop[1:], duration=ms_per_frame, loop=0)
    return buf.getvalue()


class Gallery:
    def __init__(self, max_items: int = MAX_ITEMS):
        self.max_items = max_items
        self._items: OrderedDict[str, Item] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, kind: str, name: str, image: Image.Image | torch.Tensor, text: dict[str, str] | None = None, *,
            job: str | None = None, png: bytes | None = None) -> Item:
        """Keep an image (a PIL image or a (3, H, W) tensor in [-1, 1]); `png` gives its bytes ready made."""
        pil = to_pil(image) if isinstance(image, torch.Tensor) else image
        data = png if png is not None else png_bytes(pil, text)
        with self._lock:
            item = Item(f"img{next(self._ids)}", kind, name, data, pil.width, pil.height, dict(text or {}), job)
            self._items[item.id] = item
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            return item

    def get(self, item_id: str, *, kinds: tuple[str, ...] = KINDS) -> Item:
        with self._lock:
            item = self._items.get(item_id)
        if item is None:
            raise UserError(f"no image '{item_id}' in the gallery (it may have been dropped: the gallery keeps "
                            f"the last {self.max_items})")
        if item.kind not in kinds:
            raise UserError(f"image '{item_id}' is a {item.kind}; this needs a {' or '.join(kinds)}")
        return item

    def listing(self) -> list[dict]:
        """Results, uploads and animations, newest first."""
        with self._lock:
            items = list(self._items.values())
        return [i.describe() for i in reversed(items) if i.kind != "mask"]
