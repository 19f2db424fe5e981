"""The binding benchmark: does a model put each colour on the right shape in the right place, also for
colour-shape pairs it never saw in training (`cascade data build --holdout-pairs`)?

A fixed prompt set (`binding_cases`) built from the held-out pairs H and as many seen control pairs S,
which reuse H's colours and shapes with the partners shifted by one (red:star, blue:circle -> red:circle,
blue:star), so a held-out pair and its controls need the same words and differ only in which go together.
For each group: one object in two cells each, two objects by cells and by a relation ("above", "to the
left of"), three objects by cells and by a relation plus a cell. Every object is big, on white.

Scored with the shapes scorer (`cascade.data.shapes_scorer`), per object: colour, shape, position (its
cell where the prompt names it; for a relation's pair, whether the relation holds between the cells the
scorer found) and **binding** (all three right). Per image: the exact object count. `binding_scores` gives
each split by object count and by seen / held-out, and `heldout_gap` = binding(seen) - binding(held-out).

Generation goes through `cascade.pipeline.Cascade.generate` up to the decoder, so an unCLIP bundle runs
text -> prior -> decoder and an Imagen-style one text -> decoder, with each stage's default sampling.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cascade.errors import UserError

DEFAULT_HOLDOUT = "red:star,blue:circle,green:heart,yellow:square"
SEED = 25  # the prompt set's cells; fixed, so every run scores the same prompts


@dataclass
class BindingCase:
    caption: str
    scene: dict[str, Any]  # a shapes json (objects, background) the scorer reads
    heldout: bool  # the scene's pairs are held-out ones (else seen controls)
    relation: tuple[int, int, str] | None = None  # (a, b, "above" | "to the left of"): objects a and b
    stated: list[bool] = field(default_factory=list)  # per object: its cell is named in the caption

    @property
    def count(self) -> int:
        return len(self.scene["objects"])


def seen_controls(pairs: tuple[tuple[str, str], ...], held: tuple[tuple[str, str], ...] = ()
                  ) -> tuple[tuple[str, str], ...]:
    """Seen pairs with the held-out pairs' colours and shapes: colour i with shape i + k, for the first shift
    k that gives no held-out pair (one pair alone: the first other shape)."""
    from cascade.data.shapes import SHAPES

    held = held or pairs
    colours, shapes = [c for c, _ in pairs], [s for _, s in pairs]
    for k in range(1, len(pairs)):
        out = tuple((colours[i], shapes[(i + k) % len(pairs)]) for i in range(len(pairs)))
        if not any(p in held for p in out):
            return out
    return tuple((c, next(s for s in SHAPES if (c, s) not in held)) for c in colours)


def _object(colour: str, shape: str, cell: int) -> dict[str, Any]:
    from cascade.data.shapes import CELL, SIZES, position_name

    row, col = divmod(cell, 3)
    return {"shape": shape, "color": colour, "size": "big", "cell": [row, col], "position": position_name(row, col),
            "center": [(col + 0.5) * CELL, (row + 0.5) * CELL], "radius": SIZES["big"] * CELL}


def _noun(obj: dict[str, Any]) -> str:
    return f"a big {obj['color']} {obj['shape']}"


def _at(obj: dict[str, Any]) -> str:
    from cascade.data.shapes import position_phrase

    return f"{_noun(obj)} {position_phrase(*obj['cell'])}"


def _relation_cells(rng: random.Random, kind: str) -> tuple[int, int]:
    """Cells (a, b) with a above b (same column) or a left of b (same row)."""
    line = rng.randrange(3)
    i, j = sorted(rng.sample(range(3), 2))
    return (3 * i + line, 3 * j + line) if kind == "above" else (3 * line + i, 3 * line + j)


def binding_cases(holdout: tuple[tuple[str, str], ...]) -> list[BindingCase]:
    """The fixed prompt set for held-out pairs `holdout` (and their `seen_controls`)."""
    rng = random.Random(SEED)
    cases = []
    for heldout, pairs in ((True, holdout), (False, seen_controls(holdout))):
        n = len(pairs)

        def case(objs, caption, relation=None, stated=None):
            scene = {"objects": objs, "background": {"colors": ["white"], "split": "none"}}
            cases.append(BindingCase(caption, scene, heldout, relation, stated or [True] * len(objs)))

        for colour, shape in pairs:  # one object, twice, in different cells
            for cell in rng.sample(range(9), 2):
                obj = _object(colour, shape, cell)
                case([obj], _at(obj))
        for i in range(n):
            a, b, c = pairs[i], pairs[(i + 1) % n], pairs[(i + 2) % n]
            cells = rng.sample(range(9), 3)
            two = [_object(*a, cells[0]), _object(*b, cells[1])]
            case(two, f"{_at(two[0])} and {_at(two[1])}")
            kind = ("above", "to the left of")[i % 2]
            ca, cb = _relation_cells(rng, kind)
            rel = [_object(*a, ca), _object(*c, cb)]
            case(rel, f"{_noun(rel[0])} {kind} {_noun(rel[1])}", (0, 1, kind), [False, False])
            if n >= 3:
                three = [_object(*p, cell) for p, cell in zip((a, b, c), cells)]
                case(three, f"{_at(three[0])}, {_at(three[1])} and {_at(three[2])}")
                ca, cb = _relation_cells(rng, kind)
                free = [x for x in range(9) if x not in (ca, cb)]
                rel3 = [_object(*a, ca), _object(*b, cb), _object(*c, rng.choice(free))]
                case(rel3, f"{_noun(rel3[0])} {kind} {_noun(rel3[1])}, and {_at(rel3[2])}", (0, 1, kind),
                     [False, False, True])
    return cases


def _relation_holds(kind: str, a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return False
    return a[0] < b[0] if kind == "above" else a[1] < b[1]


def score_case(image: Any, case: BindingCase) -> dict[str, Any]:
    """Per object {colour, shape, position, binding} (bools) and the image's object count."""
    from cascade.data.shapes_scorer import count_objects, score_objects

    found = score_objects(image, case.scene)
    objects = []
    for i, (result, stated) in enumerate(zip(found, case.stated)):
        if stated:
            position = result.position
        else:
            a, b, kind = case.relation
            position = _relation_holds(kind, found[a].found_cell, found[b].found_cell)
        objects.append({"colour": result.color, "shape": result.shape, "position": position,
                        "binding": result.color and result.shape and position})
    return {"objects": objects, "count": count_objects(image)}


def binding_scores(images: torch.Tensor, cases: list[BindingCase]) -> dict[str, float]:
    """The benchmark's numbers for `images` (one per case, in order): colour / shape / position / binding
    accuracy over all objects, binding by object count (`binding_1obj`, ...) and for seen and held-out pairs,
    `heldout_gap` (seen - held-out binding), the exact-count rate (`count_acc`, also per object count),
    `relation_acc` (the relation's pair placed as asked) and `scene_acc` (every object bound, count exact)."""
    tallies: dict[str, list[float]] = {}

    def add(key: str, value: bool) -> None:
        tallies.setdefault(key, []).append(float(value))

    for image, case in zip(images, cases):
        scored = score_case(image, case)
        group = "heldout" if case.heldout else "seen"
        for i, obj in enumerate(scored["objects"]):
            for attribute in ("colour", "shape", "position", "binding"):
                add(f"{attribute}_acc", obj[attribute])
            add(f"binding_{case.count}obj", obj["binding"])
            add(f"binding_{group}", obj["binding"])
            add(f"shape_{group}", obj["shape"])
            if case.count == 1:
                add(f"binding_1obj_{group}", obj["binding"])
        if case.relation is not None:
            add("relation_acc", scored["objects"][case.relation[0]]["position"])
        exact = scored["count"] == case.count
        add("count_acc", exact)
        add(f"count_{case.count}obj", exact)
        add("scene_acc", exact and all(o["binding"] for o in scored["objects"]))
    out = {k: sum(v) / len(v) for k, v in sorted(tallies.items())}
    if "binding_seen" in out and "binding_heldout" in out:
        out["heldout_gap"] = out["binding_seen"] - out["binding_heldout"]
    return out


def holdout_of(data: str | Path | None, pairs: str | None = None) -> tuple[tuple[str, str], ...]:
    """The held-out pairs: `pairs` if given, else those `data`'s dataset.json records, else DEFAULT_HOLDOUT."""
    from cascade.data.shapes import parse_pairs

    if pairs is None and data is not None:
        manifest = Path(data) / "dataset.json"
        if manifest.is_file():
            pairs = json.loads(manifest.read_text()).get("holdout_pairs")
    return parse_pairs(pairs or DEFAULT_HOLDOUT)


@torch.no_grad()
def generate_cases(cascade, cases: list[BindingCase], *, seed: int = 0, chunk: int = 16, settings=None,
                   progress=None, regions: float | None = None, region_share: float | None = None) -> torch.Tensor:
    """The decoder's 64x64 images of every case's caption (N, 3, 64, 64), through `cascade.generate` up to
    the decoder, `chunk` prompts per call, call k with seed + k; `regions`, `region_share`: its per-object
    guidance."""
    out = []
    captions = [case.caption for case in cases]
    per_object = {} if regions is None else {"regions": regions, "region_share": region_share}
    for k, start in enumerate(range(0, len(captions), chunk)):
        result = cascade.generate(captions[start:start + chunk], seed=seed + k, until="decoder", settings=settings,
                                  progress=progress, **per_object)
        out.append(result.images["decoder"].float().cpu())
    return torch.cat(out)


def load_for_binding(bundle: str | Path, device: str | torch.device = "cpu"):
    """The bundle's stages up to the decoder (the prior only for unCLIP), as the benchmark samples them."""
    from cascade.pipeline import Cascade

    return Cascade.from_bundle(bundle, ("prior", "decoder"), device=device)


def evaluate_binding(bundle: str | Path, *, holdout: tuple[tuple[str, str], ...], seed: int = 0,
                     device: str | torch.device = "cpu", settings=None, repeats: int = 1
                     ) -> tuple[dict[str, float], torch.Tensor, list[BindingCase]]:
    """(scores, images, cases) of a bundle on the prompt set of `holdout`, each prompt drawn `repeats` times
    (the cases are the prompt set repeated, with other noise each time)."""
    return score_binding(load_for_binding(bundle, device), holdout=holdout, seed=seed, settings=settings,
                         repeats=repeats)


def score_binding(cascade, *, holdout: tuple[tuple[str, str], ...], seed: int = 0, settings=None,
                  repeats: int = 1, regions: float | None = None, region_share: float | None = None
                  ) -> tuple[dict[str, float], torch.Tensor, list[BindingCase]]:
    """`evaluate_binding` on a loaded cascade (`load_for_binding`), so that one load serves many settings;
    `regions`: per-object guidance at that scale, at the noisiest `region_share` of the steps (default: the
    decoder config's; `Cascade.generate`)."""
    if repeats < 1:
        raise UserError(f"images per prompt must be >= 1, got {repeats}")
    cases = binding_cases(holdout) * repeats
    images = generate_cases(cascade, cases, seed=seed, settings=settings, regions=regions,
                            region_share=region_share)
    scores = binding_scores(images, cases)
    scores["images"] = float(len(cases))
    return scores, images, cases


def figure_rows(cases: list[BindingCase]) -> list[int]:
    """Which cases a figure shows: the first of each kind (held-out / seen, 1-3 objects, by cells / by a
    relation), held-out first: 10 rows for a set of 3 or more pairs."""
    seen, rows = set(), []
    for i, case in enumerate(cases):
        kind = (not case.heldout, case.count, case.relation is not None)
        if kind not in seen:
            seen.add(kind)
            rows.append(i)
    return sorted(rows, key=lambda i: (not cases[i].heldout, cases[i].count, cases[i].relation is not None))


def binding_figure(images: dict[str, torch.Tensor], cases: list[BindingCase], path: str | Path,
                   rows: list[int] | None = None, scale: int = 3) -> Path:
    """Prompts in rows, models in columns (`images`: model name -> (N, 3, S, S) for all cases), after a first
    column, "asked", with the scene the prompt describes drawn by the shapes renderer and the prompt under it
    ("(held out)" for held-out pairs). Tiles are enlarged `scale` times (nearest), so the prompts fit."""
    import torch.nn.functional as F

    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render
    from cascade.images import make_grid, save_png

    rows = figure_rows(cases) if rows is None else rows
    names = list(images)
    size = next(iter(images.values())).shape[-1]
    tiles, captions = [], []
    for r in rows:
        tiles.append(image_to_tensor(render(cases[r].scene, size)))
        captions.append(cases[r].caption + (" (held out)" if cases[r].heldout else ""))
        for name in names:
            tiles.append(images[name][r].float().cpu())
            captions.append("")
    big = F.interpolate(torch.stack(tiles), scale_factor=scale, mode="nearest")
    grid = make_grid(big, captions, ncols=len(names) + 1, column_labels=["asked", *names])
    return save_png(grid, Path(path), {"prompts": json.dumps([cases[r].caption for r in rows])})
