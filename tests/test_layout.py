"""`cascade.layout`: the layout a prompt names (each object's cell) and the masks of those cells, which the
Imagen-style decoder's per-object guidance keeps each object's term to."""
from __future__ import annotations

import pytest
import torch

from cascade.layout import cell_mask, object_cells, prompt_regions, region_cells


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
    "a red star above a blue circle",  # a relation: no cells
    "a red star to the left of a blue circle, and a green heart at the top",
    "at the top left, a red star",  # the cell before its shape
    "a red star and a blue circle at the top",  # two shapes, one cell
    "a red star at the top and a blue circle",  # a shape with no cell
    "a red circle", "", "at the top left",
])
def test_prompts_that_do_not_name_every_objects_cell_have_no_layout(prompt):
    assert object_cells(prompt) is None and prompt_regions(prompt, 64) is None


def test_the_shapes_captions_and_the_benchmark_prompts_read_back_their_scenes():
    from cascade.binding import DEFAULT_HOLDOUT, binding_cases
    from cascade.data.shapes import parse_pairs, scene_for

    checked = 0
    for index in range(400):
        caption, scene = scene_for(0, index)
        cells = object_cells(caption)
        if scene["phrasing"] in ("relation", "pos_noun"):
            assert cells is None, caption
            continue
        assert [(r, c) for _, r, c in cells] == [tuple(o["cell"]) for o in scene["objects"]], caption
        assert all(o["color"] in phrase and o["shape"] in phrase for (phrase, _, _), o in zip(cells, scene["objects"]))
        checked += 1
    assert checked > 150
    for case in binding_cases(parse_pairs(DEFAULT_HOLDOUT)):
        cells = object_cells(case.caption)
        if all(case.stated):
            assert [(r, c) for _, r, c in cells] == [tuple(o["cell"]) for o in case.scene["objects"]]
        else:
            assert cells is None


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
