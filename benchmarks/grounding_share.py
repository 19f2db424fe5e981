"""Where an Imagen-style decoder reads each object's words from: for two- and three-object shapes scenes,
rendered and noised to t, the share of each word's attention that comes from inside its own object, for the
colour and shape words and for the words naming the object's cell ("top left"), averaged over the words and
the text-reading attention blocks (`Decoder.text_attention`). The grounding loss (`grounding_loss`,
`grounding_places`) asks for 1; attention spread evenly over the image gives the objects' mean coverage
(`even` in the output). Prints one JSON line.

    python -m benchmarks.grounding_share --model base=bundles/a --model grounded=bundles/b [--scenes 48] \\
        [--t 100,500,900] [--seed 7]

The scenes are the shapes generator's `scene_for(seed, i)` with two or more objects, the first --scenes of
them; every model sees the same scenes and the same noise.
"""
from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import emit, parse_models, parse_times
from cascade.errors import UserError, run_cli
from cascade.process_defaults import set_process_defaults


def scenes_for(count: int, seed: int) -> tuple[list[str], list[dict]]:
    """The first `count` shapes scenes of `seed` with two or more objects: (captions, jsons)."""
    from cascade.data.shapes import scene_for

    captions, scenes, i = [], [], 0
    while len(scenes) < count:
        caption, scene = scene_for(seed, i)
        if len(scene["objects"]) >= 2:
            captions.append(caption)
            scenes.append(scene)
        i += 1
    return captions, scenes


def shares(stage, captions: list[str], scenes: list[dict], times: list[int], seed: int = 0) -> dict[str, float]:
    """{"colour_shape@tT", "cell_words@tT" for each T, "even"} for one decoder stage (see the module doc)."""
    import torch

    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render
    from cascade.diffusion.forward_process import q_sample
    from decoder.grounding import cell_word_targets, grounding_targets, inside_share

    size = stage.config.image_size
    x0 = torch.stack([image_to_tensor(render(s, size)) for s in scenes])
    tokenizer = stage._text_encoder().tokenizer
    words = grounding_targets(captions, scenes, tokenizer, stage.config.text_len)
    cells = cell_word_targets(captions, scenes, tokenizer, stage.config.text_len)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out: dict[str, float] = {}
    maps = []
    for t_ in times:
        t = torch.full((len(scenes),), t_, dtype=torch.long)
        maps = [m.cpu() for m in stage.text_attention(q_sample(stage.schedule, x0, t, noise), t, captions)]
        if not maps:
            raise UserError("this decoder has no attention block that reads the text")
        for name, targets in (("colour_shape", words), ("cell_words", cells)):
            share = inside_share(maps, targets, scenes)
            if share is not None:
                out[f"{name}@t{t_}"] = share
    out["even"] = inside_share([torch.ones_like(m) for m in maps], words, scenes)  # every query alike
    return out


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.grounding_share", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]BUNDLE",
                   help="a bundle with an Imagen-style decoder (repeatable; NAME labels its numbers)")
    p.add_argument("--scenes", type=int, default=48, help="two- and three-object scenes (default: 48)")
    p.add_argument("--t", default="100,500,900", help="the timesteps to noise the scenes to (default: 100,500,900)")
    p.add_argument("--seed", type=int, default=7, help="the shapes generator's seed for the scenes (default: 7)")
    args = p.parse_args(argv)

    def run() -> int:
        from cascade.bundle import load_stage

        if args.scenes < 1:
            raise UserError(f"--scenes {args.scenes}: give at least 1")
        models = parse_models(args.model)
        captions, scenes = scenes_for(args.scenes, args.seed)
        out = {"bench": "grounding_share", "scenes": len(scenes), "seed": args.seed, "models": {}}
        for name, bundle in models.items():
            started = time.monotonic()
            if not (bundle / "decoder").is_dir():
                raise UserError(f"--model {name}: {bundle} has no decoder")
            stage = load_stage(bundle / "decoder")
            if stage.config.conditioning != "imagen":
                raise UserError(f"--model {name}: its decoder is not Imagen-style (conditioning: "
                                f"{stage.config.conditioning}); only those read the caption's words")
            times = parse_times(args.t, stage.config.timesteps, "--t")
            scores = shares(stage, captions, scenes, times)
            scores["seconds"] = time.monotonic() - started
            out["models"][name] = {k: round(v, 4) for k, v in scores.items()}
        emit(out)
        return 0

    return run_cli("grounding_share", run)


if __name__ == "__main__":
    sys.exit(main())
