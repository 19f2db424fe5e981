"""Where a command's image files go: `--out` checked before any model loads, and names that never
replace an earlier run's files."""
from __future__ import annotations

import os
from pathlib import Path

from cascade.errors import UserError


def check_out_dir(out: str | Path, option: str = "--out") -> Path:
    """`out` as a Path if it is a writable directory or one that can be made; else a one-line UserError.

    Nothing is created: a command that fails later (a missing bundle) leaves no empty folder behind.
    The nearest path that exists, `out` itself or a parent, decides: it must be a directory this
    process may write into.
    """
    target = Path(out)
    existing = next(p for p in (target, *target.parents) if os.path.lexists(p))
    where = f"{option} {out}" if existing == target else f"cannot make {option} {out}: {existing}"
    if not existing.is_dir():
        raise UserError(f"{where} is {'a file, ' if existing.is_file() else ''}not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{where} is not writable")
    return target


def free_stem(out: Path, stem: str, names: list[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ...: the first for which no file `<stem><name>` (for every name in
    `names`, e.g. "-00.png", "-grid.png") exists in `out`, so a set of outputs never replaces, or
    mixes with, an earlier set."""
    candidate, n = stem, 1
    while any(os.path.lexists(out / f"{candidate}{name}") for name in names):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate
