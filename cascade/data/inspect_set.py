"""`cascade data inspect`: counts and sizes per split, a captioned contact sheet, and (for shapes sets)
the shapes scorer's accuracy on the set's own 64 px images as the last line."""
from __future__ import annotations

import json
from pathlib import Path

from cascade.data.reader import find_shards, read_samples
from cascade.errors import UserError


def inspect_set(directory: str | Path, *, out: str | Path | None = None, n: int = 32, score: bool = False) -> int:
    from cascade.images import make_grid, save_png

    directory = Path(directory)
    manifest_path = directory / "dataset.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    sizes = tuple(manifest.get("sizes") or (64,))
    find_shards(directory, "train")
    for split in ("train", "val"):
        shards = list((directory / split).glob("*.tar"))
        count = manifest.get("counts", {}).get(split, "?")
        print(f"{split}: {count} samples in {len(shards)} shards")
    print(f"source: {manifest.get('source', '?')}; sizes: {','.join(map(str, sizes))}")
    if n < 1:
        raise UserError(f"--n {n}: must be >= 1")
    shown = read_samples(directory, "train", image_sizes=(min(sizes),), limit=n)
    sheet = Path(out) if out else directory / "contact_sheet.png"
    save_png(make_grid([s[f"image_{min(sizes)}"] for s in shown], [s["txt"] for s in shown], ncols=8), sheet)
    print(f"contact sheet: {sheet}")
    if score:
        from cascade.data.shapes_scorer import score_objects

        if 64 not in sizes:
            raise UserError(f"{directory} has no 64 px images to score (sizes: {sizes})")
        right = total = 0
        for sample in read_samples(directory, "val", image_sizes=(64,)) or read_samples(directory, "train",
                                                                                        image_sizes=(64,)):
            if not sample["json"].get("objects"):
                raise UserError(f"{directory} is not a shapes set: --score needs the shapes attributes")
            for result in score_objects(sample["image_64"], sample["json"]):
                right += result.all
                total += 1
        print(f"shapes scorer accuracy (colour, shape and position all right): {right / max(total, 1):.4f} "
              f"of {total} objects")
    return 0
