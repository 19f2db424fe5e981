"""The `cascade data` subcommands: build, inspect (and embed, registered by its own module)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build, inspect and embed datasets (webdataset shards)",
                          description="Datasets as webdataset shards: `build` writes DIR/train/*.tar and "
                                      "DIR/val/*.tar from a source of captioned images, `inspect` shows what a "
                                      "set holds, `embed` stores CLIP embeddings in its shards for training.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    build = data_sub.add_parser("build", help="write train/val shards from a source of captioned images",
                                description="Write train/ and val/ shards from a source of captioned images, "
                                            "each image at every --sizes size. A hash of each sample's key "
                                            "picks its split; the same arguments give byte-identical shards, "
                                            "and an interrupted build leaves nothing half-written.")
    build.add_argument("--source", required=True,
                       help="shapes[:single] | emoji[:fluent|openmoji] | folder:PATH (images beside .txt "
                            "captions, or .tar shards with jpg/png + txt); shapes:single draws one object per scene")
    build.add_argument("--out", required=True, help="output directory (gets train/ and val/)")
    build.add_argument("--sizes", default="64",
                       help="comma-separated square sizes, e.g. 64,256,1024 (default: %(default)s); the "
                            "stages train on 64 (clip, decoder), 64,256 (sr256) and 256,1024 (sr1024)")
    build.add_argument("--count", type=int, default=None,
                       help="number of samples (shapes: default 1000; others: cap, default all)")
    build.add_argument("--seed", type=int, default=0,
                       help="which scenes the shapes source draws (the other sources ignore it; default: "
                            "%(default)s)")
    build.add_argument("--val-fraction", type=float, default=0.05,
                       help="share of the samples that go to val/, in [0, 1), picked by a hash of each key; "
                            "a build of 2 or more samples gets at least one (default: %(default)s)")
    build.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: %(default)s)")
    build.add_argument("--cache", default=None,
                       help="download cache for emoji packages (default $CASCADE_CACHE or ~/.cache/cascade/npm)")
    build.add_argument("--holdout-pairs", default=None, metavar="COLOUR:SHAPE,...",
                       help="shapes only: keep these colour-shape pairs out of train (scenes showing one are "
                            "dropped from train; val keeps them), e.g. red:star,blue:circle; recorded in "
                            "dataset.json for `cascade eval --binding`")
    build.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    build.set_defaults(func=_build)

    inspect = data_sub.add_parser("inspect", help="counts, sizes and a contact sheet of a built set",
                                  description="Print a built set's sample counts per split and its image "
                                              "sizes, and write a captioned contact sheet; with --score, the "
                                              "shapes scorer's accuracy on the set's own images.")
    inspect.add_argument("dir", help="a directory made by `cascade data build`")
    inspect.add_argument("--out", default=None, help="where to write the contact sheet (default DIR/contact_sheet.png)")
    inspect.add_argument("--n", type=int, default=32, help="samples on the contact sheet (default: %(default)s)")
    inspect.add_argument("--score", action="store_true",
                         help="run the shapes scorer on the set's own 64px images (shapes sets only)")
    inspect.set_defaults(func=_inspect)

    from cascade.data import embed

    embed.add_parser(data_sub)


def _build(args: argparse.Namespace) -> int:
    from cascade.data.build import build, parse_sizes

    sizes = parse_sizes(args.sizes)
    counts = build(args.source, args.out, sizes=sizes, count=args.count, seed=args.seed,
                   val_fraction=args.val_fraction, shard_size=args.shard_size, overwrite=args.overwrite,
                   cache=args.cache, holdout_pairs=args.holdout_pairs)
    print(f"wrote {counts['train']} train and {counts['val']} val samples at sizes "
          f"{','.join(map(str, sizes))} to {args.out}")
    if args.holdout_pairs is not None:
        import json
        from pathlib import Path

        manifest = json.loads((Path(args.out) / "dataset.json").read_text())
        print(f"held out of train: {manifest['holdout_pairs']} ({manifest['holdout_dropped']} scenes dropped)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from cascade.data.inspect_set import inspect_set

    return inspect_set(args.dir, out=args.out, n=args.n, score=args.score)
