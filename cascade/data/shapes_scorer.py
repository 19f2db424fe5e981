"""Judging an image against a shapes caption's attributes: for each object, is its colour there, is
it the right shape, in the right grid cell, at the right size?

1. Colour segmentation: each pixel takes the nearest colour of the renderer's palette (objects and
   backgrounds) if it is close enough; a small morphological opening removes the thin rims that
   anti-aliased edges leave in blended colours.
2. Each object of the caption is matched to the connected component of its colour whose centroid
   lies in its cell (else the largest one): colour present = such a component exists; position =
   its centroid's cell; size = its extent against the renderer's two sizes.
3. Shape: moment features of the component mask (Hu's first three invariants, extent = area over
   bounding-box area, and the centroid's offset inside the box, which tells a triangle from a
   heart) are compared with the same features of each shape drawn by the renderer at the same
   pixel size; the nearest prototype names the shape (M.-K. Hu, "Visual pattern recognition by
   moment invariants", IRE Trans. Inf. Theory 1962).

Works on any image size: images larger than `WORK_SIZE` are downscaled first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from cascade.data.shapes import BACKGROUNDS, CELL, COLORS, SHAPES, SIZES, prototype_mask

WORK_SIZE = 256
MAX_COLOR_DISTANCE = 90.0  # RGB distance beyond which a pixel is no palette colour at all
MIN_AREA_FRACTION = 0.25  # of a small object's nominal area: smaller blobs are noise
_PALETTE_NAMES = tuple(COLORS) + tuple(f"bg:{b}" for b in BACKGROUNDS)
_PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)  # (P, 3)
IOU_WEIGHT = 2.0
_PHASES = tuple((x, y) for x in (0.0, 0.25, 0.5) for y in (0.0, 0.25, 0.5))
_FEATURE_SCALE = np.array([1.0, 1.0, 1.0, 4.0, 4.0, 4.0])


@dataclass
class ObjectScore:
    color: bool
    shape: bool
    position: bool
    size: bool
    found_shape: str | None
    found_cell: tuple[int, int] | None

    @property
    def all(self) -> bool:
        return self.color and self.shape and self.position


def to_array(image: Any) -> np.ndarray:
    """PIL image, uint8 array (H, W, 3) or tensor (3, H, W) in [-1, 1] -> uint8 (S, S, 3), S <= WORK_SIZE."""
    if isinstance(image, torch.Tensor):
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
        image = Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8), "RGB")
    image = image.convert("RGB")
    if max(image.size) > WORK_SIZE:
        image = image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
    return np.asarray(image)


def segment(array: np.ndarray) -> np.ndarray:
    """(H, W) palette index per pixel, -1 where no palette colour is close."""
    d = np.linalg.norm(array[:, :, None, :].astype(np.float32) - _PALETTE, axis=-1)  # (H, W, P)
    labels = d.argmin(-1)
    labels[d.min(-1) > MAX_COLOR_DISTANCE] = -1
    return labels


def mask_features(mask: np.ndarray) -> np.ndarray:
    """Scale-invariant moment features of a binary mask: log Hu 1-3, extent, centroid offset (x, y)
    within the bounding box, and the box's aspect."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    cx, cy = xs.mean(), ys.mean()
    dx, dy = xs - cx, ys - cy
    # Normalised central moments eta_pq = mu_pq / area^(1 + (p+q)/2).
    def eta(p, q):
        return float((dx ** p * dy ** q).sum()) / area ** (1 + (p + q) / 2)
    n20, n02, n11 = eta(2, 0), eta(0, 2), eta(1, 1)
    n30, n03, n21, n12 = eta(3, 0), eta(0, 3), eta(2, 1), eta(1, 2)
    hu1 = n20 + n02
    hu2 = (n20 - n02) ** 2 + 4 * n11 ** 2
    hu3 = (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2
    logs = [-math.copysign(math.log10(abs(v) + 1e-12), v) for v in (hu1, hu2 + 1e-6, hu3 + 1e-6)]
    extent = area / (w * h)
    off_x = (cx + 0.5 - (x0 + x1) / 2) / w
    off_y = (cy + 0.5 - (y0 + y1) / 2) / h
    return np.array([logs[0], logs[1] / 4, logs[2] / 4, extent, off_x * 2, off_y * 2])


@lru_cache(maxsize=None)
def _span(shape: str) -> float:
    """The shape's bounding box side over its radius (the renderer's shapes do not all fill it)."""
    ys, xs = np.nonzero(prototype_mask(shape, 100.0) > 0.5)
    return max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 100.0


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _iou_to(crop: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """A prototype's bounding-box crop stretched to the observed box, for a pixelwise overlap."""
    if crop.shape == target_hw:
        return crop
    image = Image.fromarray(crop.astype(np.uint8) * 255).resize(target_hw[::-1], Image.Resampling.NEAREST)
    return np.asarray(image) > 127


@lru_cache(maxsize=512)
def _prototypes(shape: str, bbox_px: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Features (V, F) and bounding-box crops of the shape drawn with about this bounding box, at
    several sub-pixel phases and box sizes: at a few pixels across, the grid changes the moments."""
    feats, crops = [], []
    for box in (bbox_px - 0.5, bbox_px, bbox_px + 0.5):
        for phase in _PHASES:
            mask = prototype_mask(shape, max(box, 3.0) / _span(shape), phase) > 0.5
            if mask.any():
                feats.append(mask_features(mask))
                crops.append(_crop(mask))
    return np.stack(feats), crops


def classify_shape(mask: np.ndarray) -> str:
    """Nearest prototype by moment features plus (1 - IoU) of the bounding-box-aligned masks."""
    crop = _crop(mask)
    bbox = int(max(crop.shape))
    feats = mask_features(mask)
    costs = []
    for shape in SHAPES:
        proto_feats, proto_crops = _prototypes(shape, bbox)
        moment = np.abs((feats - proto_feats) * _FEATURE_SCALE).sum(1).min()
        iou = max((crop & p).sum() / (crop | p).sum() for p in (_iou_to(c, crop.shape) for c in proto_crops))
        costs.append(moment + IOU_WEIGHT * (1.0 - iou))
    return SHAPES[int(np.argmin(costs))]


def _components(labels: np.ndarray, color: str, min_area: float) -> list[np.ndarray]:
    mask = labels == _PALETTE_NAMES.index(color)
    core = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))
    cores, n = ndimage.label(core)
    full, _ = ndimage.label(mask)
    out = []
    for i in range(1, n + 1):
        # Keep the component's full (unopened) pixels: the opening only decides what is noise.
        ids = np.unique(full[cores == i])
        comp = np.isin(full, ids[ids > 0])
        if comp.sum() >= min_area:
            out.append(comp)
    return out


def _min_area(size: int) -> float:
    """Pixels below which a blob is noise, not an object, in an image `size` pixels wide."""
    return MIN_AREA_FRACTION * math.pi * (SIZES["small"] * CELL * size) ** 2


def count_objects(image: Any) -> int:
    """How many objects the image shows: connected components of the object colours (not the
    backgrounds') at least `_min_area` large. A second copy of an object counts twice."""
    array = to_array(image)
    labels = segment(array)
    return sum(len(_components(labels, color, _min_area(array.shape[0]))) for color in COLORS)


def score_objects(image: Any, attributes: dict[str, Any]) -> list[ObjectScore]:
    """One `ObjectScore` per object in `attributes["objects"]` (a shapes sample's json)."""
    array = to_array(image)
    size = array.shape[0]
    labels = segment(array)
    cell_px = CELL * size
    min_area = _min_area(size)
    size_cut = (SIZES["small"] + SIZES["big"]) * cell_px  # between the two nominal diameters
    cache: dict[str, list[np.ndarray]] = {}
    scores = []
    for obj in attributes["objects"]:
        comps = cache.setdefault(obj["color"], _components(labels, obj["color"], min_area))
        if not comps:
            scores.append(ObjectScore(False, False, False, False, None, None))
            continue
        want = tuple(obj["cell"])

        def cell_of(comp: np.ndarray) -> tuple[int, int]:
            ys, xs = np.nonzero(comp)
            return (min(2, int(ys.mean() / cell_px)), min(2, int(xs.mean() / cell_px)))

        in_cell = [c for c in comps if cell_of(c) == want]
        comp = in_cell[0] if in_cell else max(comps, key=lambda c: c.sum())
        ys, xs = np.nonzero(comp)
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        found_size = "big" if extent > size_cut else "small"
        shape = classify_shape(comp)
        scores.append(ObjectScore(True, shape == obj["shape"], cell_of(comp) == want,
                                  found_size == obj["size"], shape, cell_of(comp)))
    return scores


def score(image: Any, attributes: dict[str, Any]) -> float:
    """Fraction of (object, attribute) checks that hold, over colour, shape and position."""
    checks = [v for s in score_objects(image, attributes) for v in (s.color, s.shape, s.position)]
    return sum(checks) / len(checks)


def accuracy(images: Sequence[Any], attributes: Sequence[dict[str, Any]]) -> float:
    """Mean `score` over a set (on the renderer's own images, the fraction judged right)."""
    return float(np.mean([score(i, a) for i, a in zip(images, attributes)]))
