"""`cascade data inspect`: counts and sizes per split (read from the shards themselves when the set has
no dataset.json, as a mixed set copied together from others does), a captioned contact sheet, and the
shapes scorer's accuracy on the shapes scenes' own 64 px images as the last line."""
from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from pathlib import Path

from cascade.data.reader import find_shards, read_samples
from cascade.data.shards import split_member
from cascade.data.sources import source_of
from cascade.errors import UserError


def scan_split(directory: Path, split: str) -> tuple[int, tuple[int, ...], Counter]:
    """(samples, image sizes, samples per source) of DIR/split/*.tar, from the tar headers and each
    sample's json member; the images are not decoded."""
    keys, sizes, sources = 0, set(), Counter()
    for shard in sorted((directory / split).glob("*.tar")):
        try:
            with tarfile.open(shard) as tar:
                previous = None
                for info in tar:
                    key, field = split_member(info.name)
                    if key != previous:
                        keys += 1
                        previous = key
                    size = re.fullmatch(r"(\d+)\.png", field)
                    if size:
                        sizes.add(int(size.group(1)))
                    elif field == "json":
                        sources[source_of(json.loads(tar.extractfile(info).read() or b"{}"))] += 1
        except (OSError, tarfile.TarError, ValueError) as err:
            print(f"{shard}: unreadable ({err.__class__.__name__}); not counted")
    return keys, tuple(sorted(sizes)), sources


def inspect_set(directory: str | Path, *, out: str | Path | None = None, n: int = 32, score: bool = False) -> int:
    from cascade.images import make_grid, save_png

    directory = Path(directory)
    find_shards(directory, "train")
    if n < 1:
        raise UserError(f"--n {n}: must be >= 1")
    manifest_path = directory / "dataset.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    all_sizes: set[int] = set()
    for split in ("train", "val"):
        shards = list((directory / split).glob("*.tar"))
        count, sizes, sources = scan_split(directory, split)
        all_sizes.update(sizes)
        by_source = ", ".join(f"{name} {k}" for name, k in sorted(sources.items()))
        print(f"{split}: {count} samples in {len(shards)} shards" + (f" ({by_source})" if len(sources) > 1 else ""))
    sizes = tuple(sorted(all_sizes)) or tuple(manifest.get("sizes") or ())
    if not sizes:
        raise UserError(f"{directory}: its shards hold no images (*.png members)")
    print(f"source: {manifest.get('source', 'mixed' if not manifest else '?')}; sizes: {','.join(map(str, sizes))}")
    shown = read_samples(directory, "train", image_sizes=(min(sizes),), limit=n)
    sheet = Path(out) if out else directory / "contact_sheet.png"
    save_png(make_grid([s[f"image_{min(sizes)}"] for s in shown], [s["txt"] for s in shown], ncols=8), sheet)
    print(f"contact sheet: {sheet}")
    if score:
        from cascade.data.shapes_scorer import score_objects

        if 64 not in sizes:
            raise UserError(f"{directory} has no 64 px images to score (sizes: {sizes})")
        right = total = scenes = others = 0
        samples = read_samples(directory, "val", image_sizes=(64,)) if (directory / "val").is_dir() else []
        for sample in samples or read_samples(directory, "train", image_sizes=(64,)):
            if not sample["json"].get("objects"):
                others += 1
                continue
            scenes += 1
            for result in score_objects(sample["image_64"], sample["json"]):
                right += result.all
                total += 1
        if scenes == 0:
            raise UserError(f"{directory} holds no shapes scenes: --score needs the shapes attributes")
        skipped = f"; {others} other samples not scored" if others else ""
        print(f"shapes scorer accuracy (colour, shape and position all right): {right / max(total, 1):.4f} "
              f"of {total} objects in {scenes} shapes scenes{skipped}")
    return 0
