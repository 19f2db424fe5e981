"""A layout read from the prompt: which object goes in which cell of the shapes grid, for prompts that name
every object's cell the way the shapes captions do ("a big red star in the center and a blue circle at the
bottom left"), or planned for a prompt that places a pair by a relation ("a red star above a blue circle":
two cells where the relation holds, as LLM-grounded diffusion plans boxes, here by a fixed rule), and the
masks of those cells. The decoder's per-object guidance (`Decoder.sample(regions=)`)
keeps each object's own guidance term to its cell, so no object's term can erase the others
(docs/results.md, "Levers for several objects")."""
from __future__ import annotations

import re

import torch

from cascade.data.shapes import SHAPES, position_name, position_phrase

_CELLS = {position_phrase(r, c): (r, c) for r in range(3) for c in range(3)}
# longest first, so that "at the top left" wins over "at the top"
_POSITION = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(_CELLS, key=len, reverse=True)) + r")\b")
_SHAPE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_RELATION = re.compile(r"\b(above|below|left of|right of)\b")
# "a red star above a blue circle[, and a green heart at the top][ on a white background]"
_RELATION_PROMPT = re.compile(r"^(?P<a>.+?)\s+(?P<kind>above|below|to the left of|to the right of)\s+"
                              r"(?P<b>.+?)(?:,?\s+and\s+(?P<rest>.+?))?(?P<bg>\s+on an? [a-z ]+ background)?$")
# the cells a relation's pair may take, most preferred first: the same column (row) at the two ends, so the
# relation holds with the widest margin, the middle line first
_PLANS = {"above": [((0, c), (2, c)) for c in (1, 0, 2)] + [((0, c), (1, c)) for c in (1, 0, 2)]
          + [((1, c), (2, c)) for c in (1, 0, 2)],
          "to the left of": [((r, 0), (r, 2)) for r in (1, 0, 2)] + [((r, 0), (r, 1)) for r in (1, 0, 2)]
          + [((r, 1), (r, 2)) for r in (1, 0, 2)]}
_JOIN = re.compile(r"^[\s,]*(and\b)?[\s,]*")


def named_cells(text: str) -> dict[tuple[int, int], tuple[int, int]]:
    """{(row, column): (start, end)} of the cell's name ("top left" of "at the top left") for each cell phrase in
    `text` (lower case), its first mention; the phrases `object_cells` reads, so "at the top" is not found inside
    "at the top left"."""
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for match in _POSITION.finditer(text):
        cell = _CELLS[match.group(1)]
        found.setdefault(cell, (match.end(1) - len(position_name(*cell)), match.end(1)))
    return found


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


def _one_noun(phrase: str) -> bool:
    return len(_SHAPE.findall(phrase)) == 1 and not _POSITION.search(phrase) and not _RELATION.search(phrase)


def _plan(prompt: str) -> tuple[list[tuple[str, int, int]], str] | None:
    """(planned_cells' list, the prompt's background phrase or "") or None."""
    match = _RELATION_PROMPT.match(prompt.strip().lower())
    if match is None or not _one_noun(match["a"]) or not _one_noun(match["b"]):
        return None
    a, b, kind = match["a"].strip(" ,"), match["b"].strip(" ,"), match["kind"]
    others = [] if match["rest"] is None else object_cells(match["rest"])
    if others is None:
        return None
    if kind in ("below", "to the right of"):  # b above (left of) a
        a, b, kind = b, a, "above" if kind == "below" else "to the left of"
    taken = {(r, c) for _, r, c in others}
    cell_a, cell_b = next(plan for plan in _PLANS[kind] if not taken & set(plan))
    first, second = (a, cell_a), (b, cell_b)
    if match["kind"] in ("below", "to the right of"):  # back in the prompt's order
        first, second = second, first
    cells = [(f"{noun} {position_phrase(*cell)}", *cell) for noun, cell in (first, second)] + others
    return cells, match["bg"] or ""


def planned_cells(prompt: str) -> list[tuple[str, int, int]] | None:
    """A layout planned for a prompt that places two objects by a relation ("a red star above a blue
    circle", optionally ", and a green heart at the top" with its own cell), as the shapes captions and the
    binding benchmark phrase them: [(object phrase with its planned cell, row, column)], or None for any
    other prompt. The pair goes to the two ends of one column ("above") or row ("to the left of"), the
    middle line unless a third object's cell is there; each phrase is the object's noun followed by its
    planned cell ("a red star at the top"), as a caption that names cells would say it."""
    plan = _plan(prompt)
    return None if plan is None else plan[0]


def layout_prompt(prompt: str) -> str:
    """The text the decoder reads under per-object guidance: for a relation with a planned layout, the
    caption that names each object's planned cell ("a red star at the top and a blue circle at the bottom",
    with the prompt's background), so that the whole prompt's term asks for the same layout as the objects'
    own terms (with the relation left in, the count fell from 0.48 to 0.31, docs/results.md); any other
    prompt as it is."""
    plan = _plan(prompt)
    if plan is None:
        return prompt
    phrases = [phrase for phrase, _, _ in plan[0]]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + plan[1]


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
    """`object_cells` (or, for a relation's pair, `planned_cells`) where per-object guidance applies: two or
    more objects, each with its cell; else None.
    One object's own term would be the prompt again, and would only raise the guidance inside its cell
    (which drew worse shapes: 0.58 against 0.78 one-object binding, docs/results.md)."""
    cells = object_cells(prompt)
    if cells is None:
        cells = planned_cells(prompt)
    return cells if cells is not None and len(cells) >= 2 else None


def prompt_regions(prompt: str, size: int) -> list[tuple[str, torch.Tensor]] | None:
    """[(object phrase, its cell's (size, size) mask)] for `Decoder.sample(regions=)`, or None (`region_cells`)."""
    cells = region_cells(prompt)
    return None if cells is None else [(phrase, cell_mask(row, col, size)) for phrase, row, col in cells]
