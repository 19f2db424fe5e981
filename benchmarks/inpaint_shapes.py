"""Remove an object and ask for another in its place: the inpainting methods side by side on shapes scenes.

Each scene has two objects, A and B, in different grid cells. A's cell is masked, and the prompt asks for
a new object C there ("a small blue star at the top left": a colour and a shape that A and B do not
have). The shapes scorer then checks C's colour, shape and cell, that A is gone (no component of A's
colour in its cell) and that B is still found with all its attributes; the pixels outside the mask must
equal the original's (they are pasted back, so any difference is a bug). Methods: "replace" on the
plain decoder, "replace" with RePaint's resampling, and "glide" on a decoder fine-tuned with
`model.inpaint: true` when --glide-model is given. Scored on the decoder's 64x64 output; with --figure,
the first scenes go through sr256 too into a picture (rows: scenes; columns: the original with the mask
outlined, then each method). Prints one JSON line.

    python -m benchmarks.inpaint_shapes --model bundles/quick [--glide-model bundles/quick-inpaint] \\
        [--scenes 36] [--resample 5] [--figure docs/images/inpaint-shapes.png]
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np
import torch

from benchmarks.common import emit
from cascade.errors import run_cli
from cascade.process_defaults import set_process_defaults

SIZE = 256  # the scenes are rendered at sr256's output size


def edit_tasks(count: int, seed: int = 0) -> list[dict]:
    """`count` tasks {"scene", "removed", "kept", "new", "prompt", "box"}: a two-object scene, the object
    to remove (A), the one to keep (B), the object to draw in A's cell (C), its prompt, and A's cell as a
    box (x0, y0, x1, y1) at SIZE."""
    from cascade.data.shapes import COLORS, SHAPES, SIZE_WORDS, SIZES, make_scene, position_phrase

    rng = random.Random(f"inpaint/{seed}")
    tasks = []
    while len(tasks) < count:
        scene = make_scene(rng)
        if len(scene["objects"]) != 2:
            continue
        removed, kept = scene["objects"]
        row, col = removed["cell"]
        color = rng.choice([c for c in COLORS if c not in (removed["color"], kept["color"])])
        shape = rng.choice([s for s in SHAPES if s != removed["shape"]])
        size = rng.choice(tuple(SIZES))
        new = {"shape": shape, "color": color, "size": size, "cell": [row, col]}
        prompt = f"a {SIZE_WORDS[size][0]} {color} {shape} {position_phrase(row, col)}"
        cell = SIZE / 3
        box = (round(col * cell), round(row * cell), round((col + 1) * cell), round((row + 1) * cell))
        tasks.append({"scene": scene, "removed": removed, "kept": kept, "new": new, "prompt": prompt, "box": box})
    return tasks


def judge(image: torch.Tensor, task: dict) -> dict[str, bool]:
    """The scorer's verdicts on one edited image (3, S, S) in [-1, 1]."""
    from cascade.data.shapes_scorer import score_objects

    new, kept, removed = score_objects(image, {"objects": [task["new"], task["kept"], task["removed"]]})
    return {"new_colour": new.color and new.position, "new_shape": new.shape and new.position,
            "new_position": new.position, "new_all": new.all, "kept_all": kept.all,
            "removed": not (removed.color and removed.position)}


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.inpaint_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model bundle trained on shapes (its decoder for 'replace')")
    p.add_argument("--glide-model", help="the same bundle with a decoder fine-tuned with model.inpaint: true")
    p.add_argument("--scenes", type=int, default=36, help="edit tasks (default: %(default)s)")
    p.add_argument("--resample", type=int, default=5, help="RePaint resampling of the third method (default: 5)")
    p.add_argument("--figure", help="write a picture of the first --figure-rows tasks through sr256 here")
    p.add_argument("--figure-rows", type=int, default=4)
    args = p.parse_args(argv)

    def run() -> int:
        from cascade.data.shapes import render
        from cascade.images import from_pil
        from cascade.masks import box_mask
        from cascade.pipeline import Cascade, Region

        plain = Cascade.from_bundle(args.model, ("prior", "decoder", "sr256"))
        methods = [("replace", plain, "replace", 1), (f"replace+repaint{args.resample}", plain, "replace",
                                                      args.resample)]
        if args.glide_model:
            methods.append(("glide", Cascade.from_bundle(args.glide_model, ("prior", "decoder", "sr256")),
                            "glide", 1))
        tasks = edit_tasks(args.scenes)
        originals = [from_pil(render(t["scene"], SIZE)) for t in tasks]
        masks = [box_mask(",".join(map(str, t["box"])), (SIZE, SIZE)) for t in tasks]
        out = {"bench": "inpaint_shapes", "model": args.model, "glide_model": args.glide_model,
               "scenes": len(tasks), "scored_at": 64}
        unedited = [judge(o, t) for o, t in zip(originals, tasks)]
        out["unedited"] = {k: round(float(np.mean([j[k] for j in unedited])), 3) for k in unedited[0]}
        rows = {}
        for label, cascade, method, resample in methods:
            verdicts, seconds, outside = [], [], 0.0
            for i, (task, image, mask) in enumerate(zip(tasks, originals, masks)):
                start = time.perf_counter()
                result = cascade.inpaint(image, mask, task["prompt"], method=method, seed=i, until="decoder",
                                         resample=resample)
                seconds.append(time.perf_counter() - start)
                edited = result.final[0]
                known, m64 = Region(image, mask).at(64, 1)  # what the decoder kept, as the pipeline made it
                outside = max(outside, float(((edited - known).abs() * (1 - m64)).max()))
                verdicts.append(judge(edited, task))
            row = {k: round(float(np.mean([v[k] for v in verdicts])), 3) for k in verdicts[0]}
            row.update(seconds_per_edit=round(float(np.median(seconds)), 2), max_change_outside_mask=outside)
            out[label] = row
            rows[label] = (cascade, method, resample)
        if args.figure:
            _figure(args.figure, tasks[: args.figure_rows], originals, masks, rows)
            out["figure"] = args.figure
        emit(out)
        return 0

    return run_cli("inpaint_shapes", run)


def _figure(path: str, tasks: list[dict], originals, masks, rows: dict) -> None:
    from cascade.images import make_grid, save_png

    tiles, captions = [], []
    for i, task in enumerate(tasks):
        outlined = originals[i].clone()
        x0, y0, x1, y1 = task["box"]
        for c, v in enumerate((1.0, 1.0, 1.0)):  # a white outline around the masked cell
            outlined[c, y0:y1, [x0, x1 - 1]] = v
            outlined[c, [y0, y1 - 1], x0:x1] = v
        tiles.append(outlined)
        captions.append(f"original; ask: {task['prompt']}")
        for label, (cascade, method, resample) in rows.items():
            result = cascade.inpaint(originals[i], masks[i], task["prompt"], method=method, seed=i, until="sr256",
                                     resample=resample)
            tiles.append(result.final[0])
            captions.append(label)
    save_png(make_grid(torch.stack(tiles), captions, ncols=1 + len(rows)), path)


if __name__ == "__main__":
    sys.exit(main())
