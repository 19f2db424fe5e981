"""`cascade data build`: any source of captioned images -> train/val shards at the requested sizes.

A source is an iterator of `Sample`s (`sample.py`: one image per requested size, a caption, a json
dict); this module splits them by a hash of the key, writes the shards atomically (see
`shards.staged_output`) and shows progress. Sources live beside it: `shapes.py`, `emoji.py`, `folder.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from cascade.data import emoji, folder, shapes
from cascade.data.embed import STATE_FILE as EMBED_STATE_FILE
from cascade.data.sample import Sample
from cascade.data.shards import ShardWriter, split_of, staged_output
from cascade.errors import UserError

MAX_SIZE = 4096


def parse_sizes(text: str) -> tuple[int, ...]:
    """'64,256,1024' -> (64, 256, 1024); one clear line for anything else."""
    try:
        sizes = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise UserError(f"bad --sizes '{text}': expected comma-separated integers like 64,256,1024") from None
    if not sizes or any(not 8 <= s <= MAX_SIZE for s in sizes):
        raise UserError(f"bad --sizes '{text}': each size must be between 8 and {MAX_SIZE}")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"bad --sizes '{text}': a size is repeated")
    return tuple(sorted(sizes))


def cache_dir(explicit: str | None = None) -> Path:
    """Where downloaded packages are kept: --cache, else $CASCADE_CACHE, else ~/.cache/cascade/npm."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("CASCADE_CACHE"):
        return Path(os.environ["CASCADE_CACHE"]).expanduser()
    return Path.home() / ".cache" / "cascade" / "npm"


def open_source(spec: str, *, sizes: tuple[int, ...], count: int | None, seed: int,
                cache: str | None) -> tuple[Iterator[Sample], int | None, str | None]:
    """(samples, expected total or None, LICENSES text or None) for a --source value."""
    name, _, arg = spec.partition(":")
    if name == "shapes":
        if arg not in shapes.VARIANTS:
            raise UserError(f"unknown source '{spec}': shapes takes no option or ':single' (one object per scene)")
        n = count if count is not None else 1000
        return shapes.samples(n, sizes, seed, single=arg == "single"), n, None
    if name == "emoji":
        return emoji.open_source(cache_dir(cache), sizes, count, arg or "all")
    if name == "folder":
        if not arg:
            raise UserError("--source folder needs a path: --source folder:PATH")
        return folder.open_source(Path(arg).expanduser(), sizes, count)
    raise UserError(f"unknown source '{spec}': choose shapes, emoji or folder:PATH")


def build(spec: str, out: str | Path, *, sizes: tuple[int, ...], count: int | None = None, seed: int = 0,
          val_fraction: float = 0.05, shard_size: int = 1000, overwrite: bool = False,
          cache: str | None = None, progress: bool = True, holdout_pairs: str | None = None) -> dict[str, int]:
    """Write the shards; returns the number of samples per split. A hash of each key picks its split;
    with val_fraction > 0 and 2 or more samples, at least one lands in val (the last train one when no
    key hashes there).

    `holdout_pairs` ('red:star,blue:circle', shapes only): a compositional split. Train keeps no scene
    with an object of a held-out colour-shape pair (those scenes are dropped, counted in the manifest's
    `holdout_dropped`); val keeps them, so the pairs can be scored as unseen. The manifest records the
    pairs (`holdout_pairs`) for `cascade eval --binding` and `benchmarks/binding.py`."""
    if count is not None and count < 1:
        raise UserError(f"bad --count {count}: must be >= 1")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"bad --val-fraction {val_fraction}: must be in [0, 1)")
    held_out = ()
    if holdout_pairs is not None:
        if spec.partition(":")[0] != "shapes":
            raise UserError(f"--holdout-pairs works with --source shapes, not '{spec}'")
        held_out = shapes.parse_pairs(holdout_pairs)
    samples, total, licenses = open_source(spec, sizes=sizes, count=count, seed=seed, cache=cache)
    counts = {"train": 0, "val": 0}
    dropped = 0
    with staged_output(out, overwrite=overwrite) as stage:
        with ShardWriter(stage / "train", shard_size) as train, ShardWriter(stage / "val", shard_size) as val:
            writers = {"train": train, "val": val}

            def write(split: str, key: str, fields: dict[str, Any]) -> None:
                writers[split].write(key, fields)
                counts[split] += 1

            # While val is empty, the latest train sample waits here: if no key hashes into val by the
            # end, it goes there instead, so a small set still has one val sample (it keeps its place
            # in train otherwise, and the shards stay what the hash alone makes).
            held: tuple[str, dict[str, Any]] | None = None
            for sample in tqdm(samples, total=total, desc=f"building {spec}", unit="sample",
                               disable=not progress):
                if not sample.txt.strip():
                    raise UserError(f"empty caption for sample {sample.key}")
                split = split_of(sample.key, val_fraction)
                if held_out and split == "train" and shapes.shows_pair(sample.json, held_out):
                    dropped += 1
                    continue
                fields: dict[str, Any] = {f"{s}.png": sample.images[s] for s in sizes}
                fields["txt"] = sample.txt
                fields["json"] = sample.json
                if held is not None:
                    write("train", *held)
                    held = None
                if split == "train" and val_fraction > 0 and counts["val"] == 0:
                    held = (sample.key, fields)
                else:
                    write(split, sample.key, fields)
            if held is not None:
                write("val" if counts["train"] > 0 else "train", *held)
        if counts["train"] + counts["val"] == 0:
            raise UserError(f"source '{spec}' gave no samples")
        manifest = {"source": spec, "sizes": list(sizes), "seed": seed, "counts": counts,
                    "val_fraction": val_fraction}
        if held_out:
            manifest.update(holdout_pairs=shapes.format_pairs(held_out), holdout_dropped=dropped)
        (stage / "dataset.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if licenses:
            (stage / "LICENSES").write_text(licenses)
    # New shards: what `cascade data embed` recorded of the old ones (under --overwrite) no longer holds.
    (Path(out) / EMBED_STATE_FILE).unlink(missing_ok=True)
    return counts
