"""Binding: does each colour land on the right shape in the right place, for seen and for held-out
colour-shape pairs? Each bundle (unCLIP: text -> prior -> decoder; Imagen-style: text -> decoder) draws the
fixed prompt set of `cascade.binding` (48 prompts of 1-3 objects, by cells and by relations) and the shapes
scorer judges every object's colour, shape and place; binding = all three right. Prints one JSON line.

    python -m benchmarks.binding --model unclip=bundles/a --model imagen=bundles/b --data data/binding \\
        [--holdout-pairs red:star,blue:circle] [--seed 0] [--figure out/binding.png] [--guidance 3,5]

The held-out pairs are --holdout-pairs, else those --data's dataset.json records (`cascade data build
--holdout-pairs`), else `cascade.binding.DEFAULT_HOLDOUT`. The figure: prompts in rows, models in columns.
--guidance scores every model at each decoder guidance scale given (each a column NAME@gG); without it, each
bundle's own. --regions 0,2 also scores each with per-object guidance at each scale W given (a column
NAME+rW; 0: without; an Imagen-style bundle only): each object whose cell the prompt names gets its own
guidance term inside its cell (`cascade.layout`), which reads the layout from the prompt, so such a column
is layout-to-image, not the model binding by itself. Those terms run at the noisiest share of the timesteps
only, each decoder config's `region_share` (0.25), or each share --regions-share F[,F...] gives (1: every
step; with more than one, a column NAME+rW/sF each).
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import emit, parse_models
from cascade.errors import UserError, run_cli
from cascade.process_defaults import set_process_defaults


def _numbers(text: str, option: str, example: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{option} {text}: give numbers separated by commas, e.g. {example}") from None


def parse_scales(text: str | None, option: str = "--guidance") -> list[float | None]:
    """"3,5" -> [3.0, 5.0]; None -> [None] (each bundle's own guidance)."""
    if text is None:
        return [None]
    from cascade.cli import check_guidance

    return [check_guidance(g, f"{option} {text}") for g in _numbers(text, option, "3,5")]


def parse_shares(text: str | None) -> list[float | None]:
    """"0.25,1" -> [0.25, 1.0], each in (0, 1]; None -> [None] (each decoder config's region_share)."""
    if text is None:
        return [None]
    from cascade.cli import check_region_share

    return [check_region_share(s, f"--regions-share {text}") for s in _numbers(text, "--regions-share", "0.25,1")]


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.binding", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]BUNDLE",
                   help="a model bundle (repeatable; NAME labels its column and its numbers)")
    p.add_argument("--data", default=None, help="the shapes set the models trained on (its held-out pairs)")
    p.add_argument("--holdout-pairs", default=None, metavar="COLOUR:SHAPE,...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=1, help="images per prompt, each with other noise (default: 1)")
    p.add_argument("--figure", default=None, help="write the prompts x models figure (PNG) here")
    p.add_argument("--guidance", default=None, metavar="G[,G...]",
                   help="decoder guidance scales to score each model at (default: the bundle's own)")
    p.add_argument("--regions", default=None, metavar="W[,W...]",
                   help="per-object guidance scales to score each model at as well (0: without; Imagen-style "
                        "bundles): a column NAME+rW each")
    p.add_argument("--regions-share", default=None, metavar="F[,F...]",
                   help="the noisiest shares of the timesteps the per-object terms run at (default: each "
                        "decoder config's region_share, 0.25); more than one: a column NAME+rW/sF each")
    args = p.parse_args(argv)

    def run() -> int:
        from cascade.binding import binding_figure, holdout_of, load_for_binding, score_binding
        from cascade.data.shapes import format_pairs
        from cascade.pipeline import Settings, check_seed

        check_seed(args.seed, "--seed")
        models = parse_models(args.model)
        scales = parse_scales(args.guidance)
        regions = [None if w == 0 else w for w in parse_scales(args.regions, "--regions")]
        shares = parse_shares(args.regions_share)
        if args.regions_share is not None and not any(regions):
            raise UserError("--regions-share sets when --regions' terms run: give --regions W too")
        holdout = holdout_of(args.data, args.holdout_pairs)
        out = {"bench": "binding", "holdout_pairs": format_pairs(holdout), "seed": args.seed,
               "images_per_prompt": args.images, "models": {}}
        images = {}
        cases = None
        for name, bundle in models.items():
            started = time.monotonic()
            cascade = load_for_binding(bundle)  # once per model, whatever the number of scales
            for scale in scales:
                for region, share in [(r, s) for r in regions for s in ([None] if r is None else shares)]:
                    column = (name if scale is None else f"{name}@g{scale:g}") + ("" if region is None else f"+r{region:g}")
                    if share is not None and len(shares) > 1:
                        column += f"/s{share:g}"
                    settings = None if scale is None else Settings(guidance={"decoder": scale})
                    scores, images[column], cases = score_binding(cascade, holdout=holdout, seed=args.seed,
                                                                  repeats=args.images, settings=settings,
                                                                  regions=region, region_share=share)
                    scores["seconds"] = time.monotonic() - started  # the first column's includes the loading
                    started = time.monotonic()
                    if region is not None:
                        scores["region_share"] = (cascade.stages["decoder"].config.region_share
                                                  if share is None else share)
                    out["models"][column] = {k: round(v, 4) for k, v in scores.items()}
        if args.figure:
            out["figure"] = str(binding_figure(images, cases, args.figure))
        emit(out)
        return 0

    return run_cli("binding", run)


if __name__ == "__main__":
    sys.exit(main())
