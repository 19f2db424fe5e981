"""benchmarks/clip_probe.py: its linear probes find a fact an embedding carries and not one it lacks."""
import random

import torch

from benchmarks.clip_probe import probe
from cascade.data import shapes


def fake_samples(n: int, seed: int) -> list[dict]:
    """Scenes whose 'image embedding' encodes each object's shape and colour but not where it is, and whose
    'text embedding' encodes the occupied cells: the probes must tell the two apart."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(0)  # the same codebook for train and val
    code = {k: torch.randn(32, generator=g) for k in (*shapes.SHAPES, *shapes.COLORS)}
    cells = torch.randn(9, 32, generator=g)
    out = []
    for _ in range(n):
        scene = shapes.make_scene(rng)
        image = sum(code[o["shape"]] + code[o["color"]] for o in scene["objects"]) + 0.1 * torch.randn(32)
        text = sum(cells[3 * o["cell"][0] + o["cell"][1]] for o in scene["objects"]) + 0.1 * torch.randn(32)
        out.append({"json": scene, "clip_image": image, "clip_text": text})
    return out


def test_probe_finds_what_an_embedding_carries():
    torch.manual_seed(0)
    train, val = fake_samples(600, 0), fake_samples(200, 1)
    image, text = probe(train, val, "clip_image"), probe(train, val, "clip_text")
    assert image["shape_acc"] > 0.9 and image["colour_acc"] > 0.9
    assert image["cell_acc"] < image["cell_majority"] + 0.05  # position is not in the image embedding
    assert text["cell_acc"] > 0.95 > text["cell_majority"]
    assert text["shape_acc"] < 0.5  # ...and shape is not in the text one
