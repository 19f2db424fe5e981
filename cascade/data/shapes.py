"""The built-in compositional set: 1-3 coloured shapes in a 3x3 grid, with captions and exact labels
(`--source shapes:single`: one shape per scene, for a decoder that must learn colour and place fast).

Each scene is drawn directly at every requested size with analytic anti-aliasing: a shape is a
signed distance field d (in units of the image side), and a pixel's coverage is
clip(0.5 - d * size, 0, 1), the fraction of a one-pixel-wide ramp across the edge. So 64.png is not
a downscaled 1024.png, and edges are smooth at every size.

Scenes are drawn from a generator seeded by (seed, index) alone, so sample i is the same whatever
--count is, and the same arguments give byte-identical shards. The json holds the ground truth that
`shapes_scorer` checks generated images against.
"""
from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Any, Iterator

import numpy as np
from PIL import Image

from cascade.data.sample import Sample

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 20),
    "green": (35, 160, 60),
    "blue": (30, 80, 215),
    "purple": (135, 50, 190),
    "pink": (240, 110, 180),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
}
# Pale, so that every object colour stands out from every background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (212, 212, 212),
    "cream": (245, 235, 205),
    "pale blue": (200, 222, 245),
    "pale green": (212, 240, 205),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
SIZES = {"big": 0.40, "small": 0.25}  # half-extent of the shape as a fraction of a grid cell
SIZE_WORDS = {"big": ("big", "large"), "small": ("small", "little")}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELL = 1.0 / 3.0


def position_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COLS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLS[col]}"


def position_phrase(row: int, col: int) -> str:
    name = position_name(row, col)
    if name == "center":
        return "in the center"
    if row == 1:
        return f"on the {name}"
    return f"at the {name}"


# -- geometry: unit shapes spanning [-1, 1]^2, y pointing down --------------------------------------

def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles) + 0.1], 1)


def _heart(n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
                     (-1, a), (-1, -a), (-a, -a)], dtype=float)


POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),
    "triangle": np.array([(0.0, -0.95), (1.0, 0.8), (-1.0, 0.8)]),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
}


def polygon_sdf(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Signed distance to a simple polygon (negative inside): the nearest edge gives the distance,
    the even-odd crossing count gives the sign."""
    dist2 = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(poly, np.roll(poly, -1, axis=0)):
        ex, ey = bx - ax, by - ay
        wx, wy = px - ax, py - ay
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist2 = np.minimum(dist2, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        crosses = ((ay > py) != (by > py)) & (px < ax + (py - ay) * ex / (ey if ey != 0 else 1e-12))
        inside ^= crosses
    return np.where(inside, -1.0, 1.0) * np.sqrt(dist2)


def shape_sdf(shape: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Signed distance in unit-shape coordinates."""
    if shape == "circle":
        return np.hypot(px, py) - 0.92
    return polygon_sdf(px, py, POLYGONS[shape])


def coverage(shape: str, cx: float, cy: float, radius: float, size: int) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage of one shape on a size x size canvas, restricted to its bounding box.

    Centre and radius are fractions of the image side; returns (rows, cols, alpha (h, w))."""
    lo_x, hi_x = max(0, int(math.floor((cx - radius) * size)) - 1), min(size, int(math.ceil((cx + radius) * size)) + 1)
    lo_y, hi_y = max(0, int(math.floor((cy - radius) * size)) - 1), min(size, int(math.ceil((cy + radius) * size)) + 1)
    xs = ((np.arange(lo_x, hi_x) + 0.5) / size - cx) / radius
    ys = ((np.arange(lo_y, hi_y) + 0.5) / size - cy) / radius
    px, py = np.meshgrid(xs, ys)  # (h, w)
    d = shape_sdf(shape, px, py) * radius * size  # in pixels
    return slice(lo_y, hi_y), slice(lo_x, hi_x), np.clip(0.5 - d, 0.0, 1.0)


def render(scene: dict[str, Any], size: int) -> Image.Image:
    """Draw a scene (the sample's json) at size x size."""
    bg = scene["background"]
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUNDS[bg["colors"][0]]
    if bg["split"] == "horizontal":
        canvas[size // 2:] = BACKGROUNDS[bg["colors"][1]]
    elif bg["split"] == "vertical":
        canvas[:, size // 2:] = BACKGROUNDS[bg["colors"][1]]
    for obj in scene["objects"]:
        rows, cols, alpha = coverage(obj["shape"], *obj["center"], obj["radius"], size)
        alpha = alpha[..., None]
        canvas[rows, cols] = canvas[rows, cols] * (1 - alpha) + np.array(COLORS[obj["color"]]) * alpha
    return Image.fromarray(np.rint(canvas).clip(0, 255).astype(np.uint8), "RGB")


# -- scenes and captions ----------------------------------------------------------------------------

VARIANTS = ("", "single")  # --source shapes (1-3 objects per scene) or shapes:single (one object)


def make_scene(rng: random.Random, single: bool = False) -> dict[str, Any]:
    n = rng.choice((1, 1, 2, 2, 3))
    if single:
        n = 1
    cells = rng.sample(range(9), n)
    objects = []
    for cell in cells:
        row, col = divmod(cell, 3)
        size = rng.choice(tuple(SIZES))
        radius = SIZES[size] * CELL
        slack = (CELL / 2 - radius) * 0.6  # keeps the whole shape inside its cell
        cx = (col + 0.5) * CELL + rng.uniform(-slack, slack)
        cy = (row + 0.5) * CELL + rng.uniform(-slack, slack)
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(tuple(COLORS)), "size": size,
                        "cell": [row, col], "position": position_name(row, col),
                        "center": [round(cx, 6), round(cy, 6)], "radius": round(radius, 6)})
    if rng.random() < 0.5:
        background = {"colors": [rng.choice(tuple(BACKGROUNDS))], "split": "none"}
    else:
        a, b = rng.sample(tuple(BACKGROUNDS), 2)
        background = {"colors": [a, b], "split": rng.choice(("horizontal", "vertical"))}
    return {"objects": objects, "background": background}


def _noun(obj: dict[str, Any], rng: random.Random, with_size: bool = True) -> str:
    words = [rng.choice(SIZE_WORDS[obj["size"]])] if with_size else []
    return "a " + " ".join(words + [obj["color"], obj["shape"]])


def relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where a is relative to b, by grid cell."""
    (ra, ca), (rb, cb) = a["cell"], b["cell"]
    if ra != rb:
        return "above" if ra < rb else "below"
    return "to the left of" if ca < cb else "to the right of"


def caption(scene: dict[str, Any], rng: random.Random) -> tuple[str, str]:
    """(caption, phrasing name). Every phrasing names each object's colour, shape and size, and its
    position either absolutely or relative to another object."""
    objs = scene["objects"]
    n = len(objs)
    if n == 1:
        obj = objs[0]
        style = rng.choice(("noun_pos", "pos_noun", "there_is"))
        noun, pos = _noun(obj, rng), position_phrase(*obj["cell"])
        text = {"noun_pos": f"{noun} {pos}",
                "pos_noun": f"{pos}, {noun}",
                "there_is": f"there is {noun} {pos}"}[style]
    elif n == 2:
        style = rng.choice(("relation", "both_pos"))
        a, b = objs
        if style == "relation":
            text = f"{_noun(a, rng)} {relation(a, b)} {_noun(b, rng)}"
        else:
            text = f"{_noun(a, rng)} {position_phrase(*a['cell'])} and {_noun(b, rng)} {position_phrase(*b['cell'])}"
    else:
        style = rng.choice(("relation", "all_pos"))
        a, b, c = objs
        if style == "relation":
            text = (f"{_noun(a, rng)} {relation(a, b)} {_noun(b, rng)}, and "
                    f"{_noun(c, rng)} {position_phrase(*c['cell'])}")
        else:
            text = (f"{_noun(a, rng)} {position_phrase(*a['cell'])}, {_noun(b, rng)} "
                    f"{position_phrase(*b['cell'])} and {_noun(c, rng)} {position_phrase(*c['cell'])}")
    if rng.random() < 0.25:
        bg = scene["background"]
        text += (f" on a {bg['colors'][0]} background" if bg["split"] == "none"
                 else f" on a {bg['colors'][0]} and {bg['colors'][1]} background")
    return text, style


def scene_for(seed: int, index: int, single: bool = False) -> tuple[str, dict[str, Any]]:
    """(caption, json) of sample `index`; depends on nothing else. `single`: one object in every scene
    (the shapes:single source), drawn from the same generator otherwise."""
    rng = random.Random(f"shapes/{seed}/{index}")
    scene = make_scene(rng, single)
    text, style = caption(scene, rng)
    scene.update({"source": "shapes", "license": "MIT (generated by cascade)", "phrasing": style,
                  "index": index, "seed": seed})
    return text, scene


def parse_pairs(text: str, option: str = "--holdout-pairs") -> tuple[tuple[str, str], ...]:
    """'red:star,blue:circle' -> (("red", "star"), ("blue", "circle")): colour-shape pairs of the shapes set,
    in the order given, with one-line errors. No colour or shape may be held out with every partner (the
    model would never see it at all, and its pairs would test the word, not the binding)."""
    from cascade.errors import UserError

    pairs = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        colour, sep, shape = (x.strip() for x in part.partition(":"))
        if not sep or colour not in COLORS or shape not in SHAPES:
            raise UserError(f"bad {option} entry '{part}': expected COLOUR:SHAPE with a colour of "
                            f"{', '.join(COLORS)} and a shape of {', '.join(SHAPES)}")
        if (colour, shape) not in pairs:
            pairs.append((colour, shape))
    if not pairs:
        raise UserError(f"{option} '{text}' names no pair; e.g. red:star,blue:circle")
    for colour in {c for c, _ in pairs}:
        if all((colour, shape) in pairs for shape in SHAPES):
            raise UserError(f"{option} holds out every shape in {colour}; leave at least one")
    for shape in {s for _, s in pairs}:
        if all((colour, shape) in pairs for colour in COLORS):
            raise UserError(f"{option} holds out every colour of {shape}; leave at least one")
    return tuple(pairs)


def format_pairs(pairs) -> str:
    """The inverse of `parse_pairs`: (("red", "star"),) -> 'red:star'."""
    return ",".join(f"{colour}:{shape}" for colour, shape in pairs)


def shows_pair(scene: dict[str, Any], pairs) -> bool:
    """Whether any object of the scene has one of the colour-shape `pairs`."""
    return any((obj["color"], obj["shape"]) in pairs for obj in scene.get("objects", ()))


def sample_key(seed: int, index: int, single: bool = False) -> str:
    return f"shapes{'1' if single else ''}-s{seed}-{index:07d}"


def samples(count: int, sizes: tuple[int, ...], seed: int = 0, single: bool = False) -> Iterator[Sample]:
    for index in range(count):
        text, scene = scene_for(seed, index, single)
        yield Sample(sample_key(seed, index, single), {s: render(scene, s) for s in sizes}, text, scene)


@lru_cache(maxsize=4096)
def prototype_mask(shape: str, radius_px: float, phase: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The shape alone at a given pixel radius, its centre shifted by `phase` pixels off the pixel
    grid: (h, w) coverage. Used by the scorer."""
    size = int(math.ceil(2 * radius_px)) + 4
    cx, cy = (size / 2 + phase[0]) / size, (size / 2 + phase[1]) / size
    _, _, alpha = coverage(shape, cx, cy, radius_px / size, size)
    return alpha
