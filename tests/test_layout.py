"""`cascade.layout`: the layout a prompt names (each object's cell) and the masks of those cells, which the
Imagen-style decoder's per-object guidance keeps each object's term to."""
from __future__ import annotations

import pytest
import torch

from cascade.layout import cell_mask, named_cells, object_cells, planned_cells, prompt_regions, region_cells


def test_each_object_gets_its_own_phrase_and_cell():
    prompt = "a big red star in the center, a small blue circle at the bottom left and a green heart on the right"
    assert object_cells(prompt) == [("a big red star in the center", 1, 1),
                                    ("a small blue circle at the bottom left", 2, 0),
                                    ("a green heart on the right", 1, 2)]
    # "at the top left" is read whole, not as "at the top"; a background belongs to no object
    assert object_cells("A red star at the top left on a cream background") == [("a red star at the top left", 0, 0)]
    # one object: its own term would be the prompt again, so no per-object guidance
    assert region_cells("a red star at the top left") is None and prompt_regions("a red star at the top left", 64) is None
    assert object_cells("there is a yellow square at the bottom") == [("there is a yellow square at the bottom", 2, 1)]


@pytest.mark.parametrize("prompt", [
    "a red star above a blue circle",  # a relation: no cells of its own (a planned layout: planned_cells)
    "a red star to the left of a blue circle, and a green heart at the top",
    "at the top left, a red star",  # the cell before its shape
    "a red star and a blue circle at the top",  # two shapes, one cell
    "a red star at the top and a blue circle",  # a shape with no cell
    "a red circle", "", "at the top left",
])
def test_prompts_that_do_not_name_every_objects_cell_have_no_layout(prompt):
    assert object_cells(prompt) is None
    if planned_cells(prompt) is None:
        assert prompt_regions(prompt, 64) is None


def _relation_holds(kind, a, b):
    return {"above": a[0] < b[0], "below": a[0] > b[0], "to the left of": a[1] < b[1],
            "to the right of": a[1] > b[1]}[kind]


@pytest.mark.parametrize("kind", ["above", "below", "to the left of", "to the right of"])
@pytest.mark.parametrize("third", [None, *[(r, c) for r in range(3) for c in range(3)]])
def test_a_relation_gets_a_planned_layout_where_it_holds(kind, third):
    from cascade.data.shapes import position_phrase

    prompt = f"a big red star {kind} a small blue circle"
    if third is not None:
        prompt += f", and a green heart {position_phrase(*third)}"
    cells = planned_cells(prompt + " on a white background")
    assert cells == region_cells(prompt) and len(cells) == 2 + (third is not None)
    (pa, *a), (pb, *b) = cells[:2]
    assert pa.startswith("a big red star ") and pb.startswith("a small blue circle ")
    assert _relation_holds(kind, a, b)
    # each phrase names its planned cell the way captions do, so it reads back as that cell
    assert object_cells(f"{pa} and {pb}") == [(pa, *a), (pb, *b)]
    # the two ends of one column ("above") or row ("left of"), the middle one unless the third object is there
    line = 1 if kind in ("above", "below") else 0
    assert a[line] == b[line] and abs(a[1 - line] - b[1 - line]) == 2
    ends_of_middle = {(0, 1), (2, 1)} if line == 1 else {(1, 0), (1, 2)}
    assert (a[line] == 1) == (third not in ends_of_middle)
    if third is not None:
        assert cells[2] == (f"a green heart {position_phrase(*third)}", *third)
        assert third not in (tuple(a), tuple(b))


@pytest.mark.parametrize("prompt", [
    "a red star above a blue circle at the top",  # the pair's own cell: not a relation to plan
    "a red star above a blue circle and a green heart",  # a third object with no cell
    "a red star above a blue circle above a green heart",  # two relations
    "above a blue circle", "a red star above", "a red star at the top left above a blue circle",
])
def test_prompts_that_are_not_a_plannable_relation_have_no_plan(prompt):
    assert planned_cells(prompt) is None


def test_the_shapes_captions_and_the_benchmark_prompts_read_back_their_scenes():
    from cascade.binding import DEFAULT_HOLDOUT, binding_cases
    from cascade.data.shapes import parse_pairs, scene_for

    checked = relations = 0
    for index in range(400):
        caption, scene = scene_for(0, index)
        cells = object_cells(caption)
        if scene["phrasing"] in ("relation", "pos_noun"):
            assert cells is None, caption
            if scene["phrasing"] == "relation":  # a relation's captions all get a plan, with the other's cell
                planned = planned_cells(caption)
                assert len(planned) == len(scene["objects"]), caption
                assert [(r, c) for _, r, c in planned[2:]] == [tuple(o["cell"]) for o in scene["objects"][2:]]
                relations += 1
            continue
        assert [(r, c) for _, r, c in cells] == [tuple(o["cell"]) for o in scene["objects"]], caption
        assert all(o["color"] in phrase and o["shape"] in phrase for (phrase, _, _), o in zip(cells, scene["objects"]))
        checked += 1
    assert checked > 150 and relations > 100
    for case in binding_cases(parse_pairs(DEFAULT_HOLDOUT)):
        cells = object_cells(case.caption)
        if all(case.stated):
            assert [(r, c) for _, r, c in cells] == [tuple(o["cell"]) for o in case.scene["objects"]]
        else:
            assert cells is None
            a, b, kind = case.relation
            planned = planned_cells(case.caption)
            assert _relation_holds(kind, planned[a][1:], planned[b][1:]), case.caption


@pytest.mark.parametrize("size", [64, 96])
def test_cell_masks_cover_their_cell_and_a_margin(size):
    masks = torch.stack([cell_mask(r, c, size) for r in range(3) for c in range(3)])
    assert masks.amax(0).min() == 1.0  # together they cover the image
    pad = round(2 / 64 * size)
    centre = cell_mask(1, 1, size)
    lo, hi = round(size / 3) - pad, round(2 * size / 3) + pad
    assert centre[lo:hi, lo:hi].min() == 1.0 and centre.sum() == (hi - lo) ** 2
    corner = cell_mask(2, 2, size)
    assert corner[-1, -1] == 1.0 and corner[: round(2 * size / 3) - pad].sum() == 0
    regions = prompt_regions("a red star at the top left and a blue circle at the bottom right", size)
    assert [phrase for phrase, _ in regions] == ["a red star at the top left", "a blue circle at the bottom right"]
    assert torch.equal(regions[1][1], corner) and regions[0][1].shape == (size, size)


def test_named_cells_are_the_spans_of_each_cell_name_longest_first():
    text = "a red star at the top left, a blue circle at the top and a green heart in the center"
    spans = named_cells(text)
    assert {cell: text[a:b] for cell, (a, b) in spans.items()} == {(0, 0): "top left", (0, 1): "top", (1, 1): "center"}
    assert named_cells("a red star above a blue circle") == {}
