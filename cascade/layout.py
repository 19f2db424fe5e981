"""A layout read from the prompt: which object goes in which cell of the shapes grid, for prompts that name
every object's cell the way the shapes captions do ("a big red star in the center and a blue circle at the
bottom left"), and the masks of those cells. The decoder's per-object guidance (`Decoder.sample(regions=)`)
keeps each object's own guidance term to its cell, so no object's term can erase the others
(docs/results.md, "Levers for several objects")."""
from __future__ import annotations

import re

import torch

from cascade.data.shapes import SHAPES, position_phrase

_CELLS = {position_phrase(r, c): (r, c) for r in range(3) for c in range(3)}
# longest first, so that "at the top left" wins over "at the top"
_POSITION = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(_CELLS, key=len, reverse=True)) + r")\b")
_SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_RELATION = re.compile(r"\b(above|below|left of|right of)\b")
_JOIN = re.compile(r"^[\s,]*(and\b)?[\s,]*")


def object_cells(prompt: str) -> list[tuple[str, int, int]] | None:
    """[(the object's own phrase, row, column)] in the prompt's order, or None unless every object is named
    as a shape followed by its cell: a relation ("above"), a second shape before a cell, a cell before its
    shape or a shape with no cell make it None. What follows the last cell without a shape (" on a white
    background") belongs to no object."""
    text = prompt.strip().lower()
    if _RELATION.search(text):
        return None
    objects, start = [], 0
    for match in _POSITION.finditer(text):
        phrase = _JOIN.sub("", text[start:match.end()]).strip()
        if len(_SHAPE.findall(phrase)) != 1:
            return None
        objects.append((phrase, *_CELLS[match.group(1)]))
        start = match.end()
    if not objects or _SHAPE.search(text[start:]):
        return None
    return objects


def cell_mask(row: int, col: int, size: int, margin: float = 2 / 64) -> torch.Tensor:
    """(size, size) float mask, 1 on grid cell (row, col) of a size x size image and `margin` (a fraction of
    the image) around it, 0 elsewhere."""
    pad = round(margin * size)
    mask = torch.zeros(size, size)
    top, bottom = round(row * size / 3) - pad, round((row + 1) * size / 3) + pad
    left, right = round(col * size / 3) - pad, round((col + 1) * size / 3) + pad
    mask[max(0, top):bottom, max(0, left):right] = 1.0
    return mask


def region_cells(prompt: str) -> list[tuple[str, int, int]] | None:
    """`object_cells` where per-object guidance applies: two or more objects, each with its cell; else None.
    One object's own term would be the prompt again, and would only raise the guidance inside its cell
    (which drew worse shapes: 0.58 against 0.78 one-object binding, docs/results.md)."""
    cells = object_cells(prompt)
    return cells if cells is not None and len(cells) >= 2 else None


def prompt_regions(prompt: str, size: int) -> list[tuple[str, torch.Tensor]] | None:
    """[(object phrase, its cell's (size, size) mask)] for `Decoder.sample(regions=)`, or None (`region_cells`)."""
    cells = region_cells(prompt)
    return None if cells is None else [(phrase, cell_mask(row, col, size)) for phrase, row, col in cells]
