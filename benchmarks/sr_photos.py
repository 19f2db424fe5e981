"""Super-resolution on held-out photographs (#21 part 2): each bundle's sr256 and sr1024 on scikit-image's
bundled photos (`superres.photos`: whole scenes 64 -> 256 for sr256, native-resolution 256-px windows from
64 for sr1024), PSNR / SSIM beside bicubic, sampled at each stage's defaults. Prints one JSON line.

    python -m benchmarks.sr_photos --model diffusion=bundles/tiny --model l1=bundles/sr-l1 \\
        [--stages sr256,sr1024] [--seed 0] [--figure out/sr-photos.png]

The figure: per stage, three photos in rows; bicubic, each model and the real image in columns (the 256-px
outputs, the low-res input enlarged in the bicubic column's place).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import emit, parse_models
from cascade.errors import UserError, run_cli
from cascade.process_defaults import set_process_defaults

FIGURE_PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png")


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.sr_photos", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]BUNDLE",
                   help="a bundle with sr256 and/or sr1024 (repeatable; NAME labels its numbers and column)")
    p.add_argument("--stages", default="sr256,sr1024")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--figure", default=None, help="write the photos x models figure (PNG) here")
    args = p.parse_args(argv)

    def run() -> int:
        import torch

        from cascade.bundle import load_stage, read_manifest
        from cascade.images import make_grid, save_png
        from superres.metrics import bicubic_upsample
        from superres.photos import PHOTOS, evaluate_photos, load_photos, photo_pairs

        models = parse_models(args.model)
        stages = [s for s in args.stages.split(",") if s]
        if not stages or not set(stages) <= {"sr256", "sr1024"}:
            raise UserError(f"--stages {args.stages}: give sr256 and/or sr1024")
        photos = load_photos()
        out = {"bench": "sr_photos", "photos": list(PHOTOS), "seed": args.seed, "stages": {}}
        tiles, labels = [], []
        rows = [PHOTOS.index(name) for name in FIGURE_PHOTOS]
        for stage_name in stages:
            pairs = low, high, _ = photo_pairs(stage_name, photos)  # once for every model
            results, images = {}, {}
            for name, bundle in models.items():
                if stage_name not in read_manifest(bundle).get("stages", []):
                    continue
                stage = load_stage(bundle / stage_name)
                started = time.monotonic()
                scores, images[name] = evaluate_photos(stage, seed=args.seed, pairs=pairs)
                scores["seconds"] = time.monotonic() - started
                results[name] = {k: round(v, 4) for k, v in scores.items()}
            if not results:
                raise UserError(f"no --model has a {stage_name} stage")
            first = next(iter(results.values()))
            out["stages"][stage_name] = {"bicubic": {"psnr": round(first["psnr_photos_bicubic"], 4),
                                                     "ssim": round(first["ssim_photos_bicubic"], 4)},
                                         **{n: {"psnr": r["psnr_photos"], "ssim": r["ssim_photos"],
                                                "seconds": round(r["seconds"], 1)} for n, r in results.items()}}
            bicubic = bicubic_upsample(low, high.shape[-1])
            for r in rows:
                tiles += [bicubic[r], *(images[n][r] for n in images), high[r]]
                labels += [f"{stage_name}: {PHOTOS[r]}"] + [""] * (len(images) + 1)
        if args.figure:
            columns = ["bicubic", *(k for k in next(iter(out["stages"].values())) if k != "bicubic"), "real"]
            if any(len(v) != len(columns) - 1 for v in out["stages"].values()):
                raise UserError("--figure needs every --model to have every stage of --stages")
            grid = make_grid(torch.stack(tiles), labels, ncols=len(columns), column_labels=columns)
            out["figure"] = str(save_png(grid, Path(args.figure)))
        emit(out)
        return 0

    return run_cli("sr_photos", run)


if __name__ == "__main__":
    sys.exit(main())
