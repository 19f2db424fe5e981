"""Token grounding for an Imagen-style decoder (`grounding_loss` in the decoder config): a training loss that
asks the attention blocks' queries inside each object to read that object's own words, as TokenCompose
(Wang et al. 2024) does with segmentation masks for Stable Diffusion.

For each shapes scene in a batch (its json names every object's colour, shape and place, and its caption
names the objects in the json's order, colour right before shape: "a big red star above a small blue
circle"), each object's colour and shape tokens are found in the caption, and the object's coverage is
drawn at every attention resolution. With A(p, j) the share of query p's attention that goes to text token
j (averaged over heads), a token's loss is the share of its attention that falls outside its object,

    L(j) = 1 - sum_p M_k(p) A(p, j) / sum_p A(p, j),

averaged over the objects' tokens and the attention blocks. Only the caption's tokens are read; samples
whose text was dropped (classifier-free guidance) or that are not shapes scenes add nothing. With
`grounding_places` the words naming an object's cell ("top left" in "at the top left", "center") count
as its tokens too, where the caption names the cell (not for the pair a relation places).

`drop_colours` is the decoder's `p_drop_colour` augmentation: it cuts objects' colour words from a training
caption, which the spans above then skip.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np
import torch

_WORD = re.compile(r"[a-z]+")


def object_token_spans(caption: str, scene: dict[str, Any], places: bool = False,
                       ) -> list[list[tuple[int, int]]] | None:
    """Per object, in the json's order, the (start, end) character spans in `caption` of its colour and shape
    words (the shape's only where `drop_colours` cut the colour), and with `places` of its cell's name where
    the caption names that cell; None when the caption does not name the objects that way (not a shapes
    caption, or another order)."""
    from cascade.layout import named_cells

    objects = scene.get("objects") if isinstance(scene, dict) else None
    if not objects or not all(isinstance(o, dict) and "shape" in o and "color" in o for o in objects):
        return None
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(caption.lower())]
    cells = named_cells(caption.lower()) if places else {}
    spans, i = [], 0
    for obj in objects:
        named = obj.get("colour_in_caption", True)  # False: `drop_colours` cut its colour word
        while i < len(words) and not (words[i][0] in (obj["shape"], obj["shape"] + "s") and i > 0
                                      and (words[i - 1][0] == obj["color"] or not named)):
            i += 1
        if i == len(words):
            return None
        spans.append([words[i - 1][1:], words[i][1:]] if named else [words[i][1:]])
        if places and "cell" in obj:
            place = cells.get(tuple(obj["cell"]))  # cells are unique in a scene: one phrase, one object
            if place:
                spans[-1].append(place)
        i += 1
    return spans


def drop_colours(caption: str, scene: dict[str, Any], drop) -> tuple[str, dict[str, Any]]:
    """The caption without the colour word of each object k with `drop[k]` true ("a big red star above a
    blue circle" -> "a big star above a blue circle"), and a copy of the scene whose dropped objects say
    `colour_in_caption: False` (so `object_token_spans` still finds their shape word). The caption and
    scene unchanged where the caption does not name its objects by colour and shape."""
    spans = object_token_spans(caption, scene)
    if spans is None or not any(drop[k] for k in range(len(spans))):
        return caption, scene
    cuts = [spans[k][0] for k in range(len(spans)) if drop[k]]
    out, last = [], 0
    for start, end in cuts:  # the colour word and the space after it
        out.append(caption[last:start])
        last = end + 1 if caption[end:end + 1] == " " else end
    out.append(caption[last:])
    objects = [dict(obj, colour_in_caption=False) if drop[k] else obj for k, obj in enumerate(scene["objects"])]
    return "".join(out), dict(scene, objects=objects)


def object_masks(scene: dict[str, Any], size: int, oversample: int = 4) -> torch.Tensor:
    """(K, size * size) each object's coverage of the size x size cells (drawn `oversample` times finer by the
    renderer's own `coverage`, then averaged), scaled so that its best-covered cell is 1 (a small object
    may cover no 8 x 8 cell whole), flattened row-major like an attention block's queries."""
    from cascade.data.shapes import coverage

    fine = size * oversample
    masks = np.zeros((len(scene["objects"]), fine, fine), dtype=np.float32)
    for k, obj in enumerate(scene["objects"]):
        rows, cols, alpha = coverage(obj["shape"], *obj["center"], obj["radius"], fine)
        masks[k, rows, cols] = alpha
    masks = masks.reshape(len(masks), size, oversample, size, oversample).mean((2, 4))
    masks /= np.maximum(masks.max((1, 2), keepdims=True), 1e-6)
    return torch.from_numpy(masks.reshape(len(masks), -1))


def grounding_targets(captions: list[str], scenes: list[dict[str, Any]], tokenizer, max_len: int,
                      places: bool = False) -> list[list[tuple[list[int], int]]]:
    """Per sample, [(the context indices of object k's colour and shape tokens, and with `places` its cell's,
    k)]: token i of the caption is context token 1 + i (the decoder's context starts with its null token).
    Empty for a sample whose caption does not name its objects (`object_token_spans`)."""
    enc = tokenizer(list(captions), truncation=True, max_length=max_len, return_offsets_mapping=True)
    out = []
    for caption, scene, offsets in zip(captions, scenes, enc["offset_mapping"]):
        spans = object_token_spans(caption, scene, places)
        targets = []
        for k, obj_spans in enumerate(spans or []):
            tokens = [1 + i for i, (a, b) in enumerate(offsets) if b > a and any(
                a < end and b > start for start, end in obj_spans)]
            if tokens:
                targets.append((tokens, k))
        out.append(targets)
    return out


def grounding_loss(maps: list[torch.Tensor], targets: list[list[tuple[list[int], int]]],
                   scenes: list[dict[str, Any]], keep_text: torch.Tensor) -> torch.Tensor:
    """Mean over objects' tokens and attention maps of L(j) above; `maps` are (B, HW, L) shares of each
    query's attention per context token, one per attention block; rows where `keep_text` is False add
    nothing. Zero (with a graph) when nothing in the batch has a target.

    One batched product per map rather than a loop over samples and objects: the loop's few hundred small
    autograd ops a step cost more than the product (`tests/test_grounding.py` checks the two agree)."""
    rows = [b for b, sample in enumerate(targets) if sample and bool(keep_text[b])]
    if not rows or not maps:
        return maps[0].sum() * 0 if maps else torch.zeros(())
    # every (row, object, token) term, as index tensors into the (R, K, L) inside shares
    r_idx, k_idx, j_idx = [], [], []
    for r, b in enumerate(rows):
        for tokens, k in targets[b]:
            r_idx += [r] * len(tokens)
            k_idx += [k] * len(tokens)
            j_idx += tokens
    device = maps[0].device
    r_idx, k_idx, j_idx = (torch.tensor(i, device=device) for i in (r_idx, k_idx, j_idx))
    rows_t = torch.tensor(rows, device=device)
    objects = max(len(scenes[b]["objects"]) for b in rows)
    by_size: dict[int, torch.Tensor] = {}
    losses = []
    for attention in maps:
        size = int(round(attention.shape[1] ** 0.5))
        if size not in by_size:  # (R, K, HW), drawn on the CPU and moved in one copy
            masks = torch.zeros(len(rows), objects, size * size)
            for r, b in enumerate(rows):
                m = _cached_masks(_scene_key(scenes[b]), size)
                masks[r, :len(m)] = m
            by_size[size] = masks.to(device, attention.dtype)
        masks = by_size[size]
        a = attention.index_select(0, rows_t)  # (R, HW, L)
        inside = torch.bmm(masks, a)  # (R, K, L): each object's share of each token's attention
        total = a.sum(1)  # (R, L)
        losses.append(1 - inside[r_idx, k_idx, j_idx] / total[r_idx, j_idx].clamp_min(1e-6))
    return torch.cat(losses).mean()


def _scene_key(scene: dict[str, Any]) -> tuple:
    """What `object_masks` reads of a scene, hashable."""
    return tuple((o["shape"], tuple(o["center"]), o["radius"]) for o in scene["objects"])


@functools.lru_cache(maxsize=16384)
def _cached_masks(key: tuple, size: int) -> torch.Tensor:
    """`object_masks` of the scene `key` names, kept: a training set's scenes come back every epoch, and
    drawing them is most of the loss's cost otherwise (16384 entries of at most 3 x 256 floats: ~50 MB)."""
    objects = [{"shape": shape, "center": center, "radius": radius} for shape, center, radius in key]
    return object_masks({"objects": objects}, size)


def cell_word_targets(captions: list[str], scenes: list[dict[str, Any]], tokenizer, max_len: int,
                      ) -> list[list[tuple[list[int], int]]]:
    """Per sample, [(the context indices of object k's cell words only, k)]: `grounding_targets` with places,
    less its colour and shape tokens. Empty for an object whose cell the caption does not name."""
    words = grounding_targets(captions, scenes, tokenizer, max_len)
    both = grounding_targets(captions, scenes, tokenizer, max_len, places=True)
    out = []
    for noun, every in zip(words, both):
        named = {k: set(tokens) for tokens, k in noun}
        sample = [([j for j in tokens if j not in named.get(k, ())], k) for tokens, k in every]
        out.append([(tokens, k) for tokens, k in sample if tokens])
    return out


def inside_share(maps: list[torch.Tensor], targets: list[list[tuple[list[int], int]]],
                 scenes: list[dict[str, Any]]) -> float | None:
    """The mean, over the targets' tokens and the attention maps, of the share of a token's attention that
    comes from inside its object (1 - the loss, every row's text kept); None when nothing has a target.
    Attention spread evenly over the image gives the objects' mean coverage."""
    if not any(targets):
        return None
    keep = torch.ones(len(targets), dtype=torch.bool)
    return 1.0 - float(grounding_loss(maps, targets, scenes, keep))
