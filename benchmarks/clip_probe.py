"""What the CLIP embeddings of shapes scenes carry: linear probes, fitted on the train split and scored on
val, for each object's grid cell (which of the 9 cells are occupied), and for one-object scenes the
object's shape and colour, from the image embedding and from the text embedding.

The decoder can only draw what its conditioning tells it: a fact the embeddings do not carry must come
through the text token states (cross-attention) or not at all.

    python -m benchmarks.clip_probe --data data/tiny/mixed     # a set embedded by `cascade data embed`

Prints one JSON line: per embedding, val accuracy of each probe beside its trivial baseline (the
majority answer per cell; chance for shape and colour).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from cascade.data import shapes
from cascade.data.reader import read_samples
from cascade.process_defaults import set_process_defaults


def scenes(data: str, split: str) -> list[dict]:
    samples = read_samples(data, split, image_sizes=(64,), with_embeddings=True)
    return [s for s in samples if s["json"].get("objects")]


def targets(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 9) cell occupancy; (N,) shape and colour index of one-object scenes, -1 for the others."""
    cells = torch.zeros(len(samples), 9)
    shape = torch.full((len(samples),), -1)
    colour = torch.full((len(samples),), -1)
    for i, s in enumerate(samples):
        objects = s["json"]["objects"]
        for obj in objects:
            row, col = obj["cell"]
            cells[i, 3 * row + col] = 1
        if len(objects) == 1:
            shape[i] = list(shapes.SHAPES).index(objects[0]["shape"])
            colour[i] = list(shapes.COLORS).index(objects[0]["color"])
    return cells, shape, colour


def fit_linear(x: torch.Tensor, y: torch.Tensor, multilabel: bool, l2: float = 1e-3):
    """L2-regularised logistic regression (LBFGS); returns the fitted map x -> logits."""
    n_out = y.shape[1] if multilabel else int(y.max()) + 1
    w = torch.zeros(x.shape[1], n_out, requires_grad=True)
    b = torch.zeros(n_out, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        loss = F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: (z @ w + b).detach()


def probe(train: list[dict], val: list[dict], key: str) -> dict:
    def features(samples):  # unit-normalised, scaled by sqrt(D) so the regulariser means the same for any D
        x = torch.stack([s[key].float() for s in samples])
        return F.normalize(x, dim=-1) * x.shape[1] ** 0.5

    x, xv = features(train), features(val)
    cells, shape, colour = targets(train)
    cells_v, shape_v, colour_v = targets(val)
    out = {"cell_acc": ((fit_linear(x, cells, True)(xv) > 0).float() == cells_v).float().mean().item(),
           "cell_majority": ((cells.mean(0) > 0.5).float() == cells_v).float().mean().item()}
    one, one_v = shape >= 0, shape_v >= 0
    for name, y, yv, classes in (("shape", shape, shape_v, shapes.SHAPES), ("colour", colour, colour_v, shapes.COLORS)):
        predict = fit_linear(x[one], y[one], False)
        out[f"{name}_acc"] = (predict(xv[one_v]).argmax(1) == yv[one_v]).float().mean().item()
        out[f"{name}_chance"] = 1 / len(classes)
    return {k: round(v, 3) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a shard directory embedded by `cascade data embed`")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train, val = scenes(args.data, "train"), scenes(args.data, "val")
    if not train or not val:
        raise SystemExit(f"{args.data}: no embedded shapes scenes in train and val")
    result = {"train_scenes": len(train), "val_scenes": len(val),
              "one_object_val_scenes": int((targets(val)[1] >= 0).sum())}
    for key in ("clip_image", "clip_text"):
        result[key] = probe(train, val, key)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
