"""Writing webdataset shards reproducibly and atomically.

A shard is a plain tar whose members are `<key>.<field>` (webdataset groups members by the key, the
part before the first dot). Every member gets a fixed mtime, owner and mode, and PNGs are encoded
with fixed settings, so the same samples give byte-identical shards. A shard is written under a
hidden temporary name and renamed once complete; `staged_output` extends that to a whole build.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from cascade.errors import UserError

SPLITS = ("train", "val")
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")  # no dots: webdataset splits the member name at the first one


def split_member(name: str) -> tuple[str, str]:
    """'dir/key.64.png' -> ('dir/key', '64.png'): webdataset keys end at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    key, _, field = base.partition(".")
    return (f"{head}/{key}" if head else key), field


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a fixed fraction of keys, chosen by a hash so that it never depends on order."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def png_bytes(image: Image.Image) -> bytes:
    """8-bit RGB PNG with fixed encoder settings (no timestamps or text chunks)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_field(value: Any) -> bytes:
    """Bytes for one member: images as PNG, arrays as .npy, dicts as sorted JSON, text as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, Image.Image):
        return png_bytes(value)
    if isinstance(value, np.ndarray):
        return npy_bytes(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"cannot store a {type(value).__name__} in a shard")


def write_sample(tar: tarfile.TarFile, key: str, fields: dict[str, Any]) -> None:
    if not KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} must be letters, digits, '_' or '-'")
    for field in sorted(fields):
        data = encode_field(fields[field])
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into `directory/shard-000000.tar`, ... with at most `max_count` samples each."""

    def __init__(self, directory: str | Path, max_count: int = 1000):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_count = max_count
        self.shards: list[Path] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def write(self, key: str, fields: dict[str, Any]) -> None:
        if self._tar is None or self._in_shard >= self.max_count:
            self._close_shard()
            self._open_shard()
        write_sample(self._tar, key, fields)
        self._in_shard += 1
        self.count += 1

    def _open_shard(self) -> None:
        name = f"shard-{len(self.shards):06d}.tar"
        self._tmp = self.directory / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(self.directory / name)
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, self.shards[-1])
        self._tar = self._tmp = None

    def close(self) -> None:
        self._close_shard()

    def abort(self) -> None:
        """Drop the shard being written (used when the build fails)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self.shards.pop()
            self._tar = self._tmp = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextmanager
def staged_output(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden staging directory inside `out_dir` whose `train/` and `val/` replace the real ones
    only when the block finishes; on any error or interrupt the staging directory is removed, so a
    half-built set never appears where a reader would find it."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a directory: {out}")
    existing = [s for s in SPLITS if any((out / s).glob("*.tar"))]
    if existing and not overwrite:
        raise UserError(f"{out} already holds shards in {'/'.join(existing)}/; "
                        "pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".building-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        for split in SPLITS:
            (stage / split).mkdir(exist_ok=True)
            if (out / split).exists():
                shutil.rmtree(out / split)
            os.replace(stage / split, out / split)
        for extra in sorted(stage.iterdir()):
            os.replace(extra, out / extra.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
