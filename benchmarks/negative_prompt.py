"""Does a negative prompt steer away from what it names? On a shapes-trained bundle, "a circle" with and
without --negative-prompt "red", from the same seeds: the fraction of the decoded 64x64 pixels the
shapes scorer's palette calls red (`cascade.data.shapes_scorer.segment`), and of the object pixels (those
nearest an object colour, not a background). Prints one JSON line.

    python -m benchmarks.negative_prompt --model bundles/tiny [--images 32] [--prompt "a circle"] [--negative red]
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import emit
from cascade.errors import run_cli
from cascade.process_defaults import set_process_defaults


def colour_fractions(images: torch.Tensor, colour: str) -> tuple[float, float]:
    """(share of all pixels, share of object pixels) whose nearest palette colour is `colour`."""
    from cascade.data.shapes import COLORS
    from cascade.data.shapes_scorer import _PALETTE_NAMES, segment, to_array

    target, objects = _PALETTE_NAMES.index(colour), len(COLORS)  # object colours come first in the palette
    hit = total = obj = 0
    for image in images:
        labels = segment(to_array(image))
        hit += int((labels == target).sum())
        total += labels.size
        obj += int(((labels >= 0) & (labels < objects)).sum())
    return hit / total, hit / max(obj, 1)


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.negative_prompt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model bundle (trained on shapes)")
    p.add_argument("--images", type=int, default=32, help="images per setting (default: %(default)s)")
    p.add_argument("--prompt", default="a circle")
    p.add_argument("--negative", default="red", help="the negative prompt; also the colour measured")
    args = p.parse_args(argv)

    def run() -> int:
        from cascade.pipeline import Cascade

        cascade = Cascade.from_bundle(args.model, ("prior", "decoder"))
        out = {"bench": "negative_prompt", "model": args.model, "prompt": args.prompt, "negative": args.negative,
               "images": args.images}
        for name, negative in (("plain", None), ("negative", args.negative)):
            images = torch.cat([cascade.generate([args.prompt], seed=seed, until="decoder",
                                                 negative_prompt=negative).final for seed in range(args.images)])
            share, of_objects = colour_fractions(images, args.negative)
            out[f"{args.negative}_pixels_{name}"] = round(share, 4)
            out[f"{args.negative}_of_object_pixels_{name}"] = round(of_objects, 4)
        emit(out)
        return 0

    return run_cli("negative_prompt", run)


if __name__ == "__main__":
    sys.exit(main())
