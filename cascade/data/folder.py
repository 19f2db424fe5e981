"""`--source folder:PATH`: the user's own captioned images.

Two layouts, found recursively and mixable: an image (png, jpg, jpeg, webp, bmp) beside a .txt of the
same stem, and img2dataset-style .tar shards whose members `<key>.jpg|png|...` and `<key>.txt` pair up
by key (the basename before its first dot, as webdataset groups them). Every image is resized so its
short side fits each requested size and centre-cropped to a square; transparency goes onto white.
"""
from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from cascade.data.sample import Sample
from cascade.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class Pair:
    """One image and its caption; `origin` is the image's path relative to the source (for a shard
    member, `shard.tar:member`), shown in errors and kept in the sample's json."""
    origin: str
    txt: str
    file: Path
    offset: int | None = None  # for a member of an uncompressed tar: where its bytes start
    size: int | None = None

    @property
    def where(self) -> str:
        """The image as the user would look for it: a full path, or `shard.tar:member`."""
        return str(self.file) if self.offset is None else f"{self.file}:{self.origin.rpartition(':')[2]}"

    def read(self) -> bytes:
        with open(self.file, "rb") as f:
            if self.offset is None:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def open_source(path: Path, sizes: tuple[int, ...], count: int | None) -> tuple[Iterator[Sample], int, None]:
    """(samples, their number, no LICENSES text): the pairs under `path` in sorted order, the first
    `count` of them when capped."""
    if not path.exists():
        raise UserError(f"folder not found: {path}")
    pairs = find_pairs(path)
    if not pairs:
        raise UserError(f"no captioned images in {path}: expected images ({', '.join(IMAGE_SUFFIXES)}) each "
                        "beside a .txt of the same name, or .tar shards holding <key>.jpg + <key>.txt")
    if count is not None:
        pairs = pairs[:count]
    keys = unique_keys([p.origin for p in pairs])
    return (to_sample(key, pair, sizes) for key, pair in zip(keys, pairs)), len(pairs), None


def find_pairs(path: Path) -> list[Pair]:
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise UserError(f"not a folder or a .tar shard: {path}")
        return tar_pairs(path, path.name)
    pairs: list[Pair] = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):  # hidden files and half-written builds
            continue
        suffix = file.suffix.lower()
        if suffix == ".tar":
            pairs += tar_pairs(file, rel.as_posix())
        elif suffix in IMAGE_SUFFIXES:
            caption = file.with_suffix(".txt")
            if caption.is_file():
                pairs.append(Pair(rel.as_posix(), read_caption(caption.read_bytes(), str(caption)), file))
    return pairs


def read_caption(data: bytes, name: str) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    if not text:
        raise UserError(f"empty caption: {name}")
    return text


def tar_pairs(shard: Path, rel: str) -> list[Pair]:
    """Image/caption pairs of one uncompressed shard, read in place by offset (no extraction)."""
    try:
        with tarfile.open(shard, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            for m in members:
                member = PurePosixPath(m.name)
                stem, _, ext = member.name.partition(".")
                groups.setdefault(str(member.parent / stem), {})[ext.lower()] = m
            pairs = []
            for key in sorted(groups):
                group = groups[key]
                image = next((group[s[1:]] for s in IMAGE_SUFFIXES if s[1:] in group), None)
                if image is None or "txt" not in group:
                    continue
                origin = f"{rel}:{image.name}"
                txt = read_caption(tar.extractfile(group["txt"]).read(), f"{shard}:{group['txt'].name}")
                pairs.append(Pair(origin, txt, shard, image.offset_data, image.size))
            return pairs
    except tarfile.TarError as exc:
        raise UserError(f"unreadable shard {shard}: {exc}") from None


def unique_keys(origins: list[str]) -> list[str]:
    """Sample keys made of [A-Za-z0-9_-] from the origins; two that sanitise alike both get a short
    hash of their origin so no sample overwrites another."""
    def stem(origin: str) -> str:  # "dir/a b.jpg" -> "dir_a_b", "shards/00.tar:0001.jpg" -> "shards_00_0001"
        joined = "/".join(PurePosixPath(part).with_suffix("").as_posix() for part in origin.split(":"))
        return UNSAFE.sub("_", joined).strip("_") or "sample"

    keys = [stem(o) for o in origins]
    seen: dict[str, int] = {}
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
    return [k if seen[k] == 1 else f"{k}-{hashlib.sha1(o.encode()).hexdigest()[:8]}"
            for k, o in zip(keys, origins)]


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is `size` and crop the centre square, in one resampling step (the
    box selects the central square of the source, Lanczos filters it down or up to size x size)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.LANCZOS, box=(left, top, left + side, top + side))


def load_image(pair: Pair) -> Image.Image:
    """RGB image, upright per its EXIF orientation, transparency composited onto white."""
    try:
        with Image.open(io.BytesIO(pair.read())) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(white, rgba).convert("RGB")
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"unreadable image {pair.where}: not an image format Pillow can decode") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"unreadable image {pair.where}: {exc}") from None


def to_sample(key: str, pair: Pair, sizes: tuple[int, ...]) -> Sample:
    image = load_image(pair)
    return Sample(key, {s: square_resize(image, s) for s in sizes}, pair.txt,
                  {"source": "folder", "path": pair.origin, "native_size": min(image.size)})
