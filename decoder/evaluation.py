"""Decoder evaluation on validation batches: decode the true CLIP image embeddings (with their text) at
each guidance scale in `eval_guidance`, then
  - colour / shape / position accuracy of the decoded images by the shapes scorer
    (`cascade.data.shapes_scorer`), for samples whose json describes a shapes scene;
  - FD-EffNet between the decoded and the real validation images (`decoder.fd_effnet`).
Every guidance scale decodes from the same x_T, so the scales differ only in guidance.
`score_decodes` is the part that takes any embeddings, e.g. the prior's samples in an end-to-end eval.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from decoder.fd_effnet import effnet_features, frechet_distance, load_feature_net

CONDITIONING_KEYS = ("clip_image", "clip_tokens", "clip_mask")


def collect(batches: Iterable[dict[str, Any]], image_key: str, limit: int) -> dict[str, Any]:
    """`limit` validation samples: conditioning tensors, real images and json, concatenated.

    Samples whose json describes a shapes scene come first (the scorer can only judge those), so a
    mixed val split whose other shards sort first still yields a scored evaluation; the rest fill up.
    """
    scenes, others = [], []  # (batch, row, json)
    for batch in batches:
        jsons = list(batch.get("json", [{}] * batch["clip_image"].shape[0]))
        for i, scene in enumerate(jsons):
            (scenes if scene.get("objects") else others).append((batch, i, scene))
        if len(scenes) >= limit:
            break
    chosen = (scenes + others)[:limit]
    if not chosen:
        raise ValueError("no validation samples to evaluate the decoder on")
    keys = [k for k in (*CONDITIONING_KEYS, "clip_text", image_key) if k in chosen[0][0]]
    out: dict[str, Any] = {k: torch.stack([batch[k][i] for batch, i, _ in chosen]) for k in keys}
    out["json"] = [scene for _, _, scene in chosen]
    return out


@torch.no_grad()
def decode_all(stage, conditioning: dict[str, torch.Tensor], noise: torch.Tensor, guidance: float,
               chunk: int = 16) -> torch.Tensor:
    """Decode every row of `conditioning` from the matching rows of `noise`, `chunk` rows at a time."""
    out = []
    n = conditioning["clip_image"].shape[0]
    for start in tqdm(range(0, n, chunk), desc=f"decoding (guidance {guidance:g})", leave=False):
        rows = slice(start, start + chunk)
        out.append(stage.sample({k: v[rows] for k, v in conditioning.items()}, sampler=stage.config.sampler,
                                steps=stage.config.sample_steps, guidance=guidance, noise=noise[rows],
                                threshold=stage.config.threshold))
    return torch.cat(out)


def shapes_accuracy(images: torch.Tensor, scenes: list[dict[str, Any]]) -> dict[str, float]:
    """Fraction of described objects whose colour / shape / position the scorer finds in the image;
    empty when no scene describes objects (e.g. emoji data)."""
    from cascade.data.shapes_scorer import score_objects

    if not any(scene.get("objects") for scene in scenes):
        return {}

    totals = {"colour": 0, "shape": 0, "position": 0}
    objects = 0
    for image, scene in zip(images, scenes):
        if not scene.get("objects"):
            continue
        for result in score_objects(image, scene):
            objects += 1
            totals["colour"] += result.color
            totals["shape"] += result.shape
            totals["position"] += result.position
    if objects == 0:
        return {}
    return {f"{k}_acc": v / objects for k, v in totals.items()}


def score_decodes(images: torch.Tensor, scenes: list[dict[str, Any]], real_features=None, net=None,
                  suffix: str = "") -> dict[str, float]:
    """Shapes-scorer accuracies and, given the real images' features, FD-EffNet of `images`."""
    metrics = {f"{k}{suffix}": v for k, v in shapes_accuracy(images, scenes).items()}
    if real_features is not None and net is not None:
        metrics[f"fd_effnet{suffix}"] = frechet_distance(effnet_features(net, images), real_features)
    return metrics


@torch.no_grad()
def evaluate_decoder(stage, batches: Iterable[dict[str, Any]], generator: torch.Generator) -> dict[str, float]:
    config = stage.config
    data = collect(batches, f"image_{config.image_size}", config.eval_samples)
    conditioning = {k: data[k] for k in CONDITIONING_KEYS if k in data}
    n, s = conditioning["clip_image"].shape[0], config.image_size
    noise = torch.randn(n, 3, s, s, generator=generator, device=generator.device)
    net = load_feature_net()
    real = effnet_features(net, data[f"image_{s}"])
    metrics: dict[str, float] = {}
    for w in config.eval_guidance:
        images = decode_all(stage, conditioning, noise, w)
        metrics.update(score_decodes(images, data["json"], real, net, suffix=f"@g{w:g}"))
    return metrics
