"""Synthetic CLIP-like embedding pairs for the prior's tests and benchmarks.

Scenes of 1-3 shapes (8 colours x 6 shapes x 2 sizes x 9 grid cells, as in `cascade data build --source
shapes`) are described by a feature vector f: histograms of colours, shapes, sizes and cells, plus the
colour x shape bindings. The image embedding is a noisy linear function of f plus image-only nuisance
(background, jitter) that the caption never mentions; the text embedding is a *different* noisy linear
function of f, sharing only part of the image map, so the text embedding is an imperfect guess of the
image embedding, as with a real CLIP. Token states spell the caption word by word from a fixed random
word table. Everything is drawn from one seed, so the same arguments give the same tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

COLOURS, SHAPES, SIZES, CELLS = 8, 6, 2, 9
FEATURES = COLOURS + SHAPES + SIZES + CELLS + COLOURS * SHAPES
NUISANCE = 16  # image-only factors: background colour, exact placement...
# Word table: "a", "and", relation words, then one word per colour, shape, size and cell.
_WORD_A, _WORD_AND = 0, 1
_WORD_COLOUR = 2
_WORD_SHAPE = _WORD_COLOUR + COLOURS
_WORD_SIZE = _WORD_SHAPE + SHAPES
_WORD_CELL = _WORD_SIZE + SIZES
WORDS = _WORD_CELL + CELLS
_NAMES = (["a", "and"] + ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
          + ["circle", "square", "triangle", "star", "hexagon", "cross"] + ["small", "big"]
          + [f"{v} {h}" for v in ("top", "middle", "bottom") for h in ("left", "centre", "right")])


def _scene_features(objects: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """objects (N, 3, 4) long [colour, shape, size, cell], count (N,) in 1..3 -> f (N, FEATURES)."""
    present = (torch.arange(3)[None, :] < count[:, None]).float()  # (N, 3)
    parts = []
    for k, n in enumerate((COLOURS, SHAPES, SIZES, CELLS)):
        parts.append((F.one_hot(objects[..., k], n).float() * present[..., None]).sum(1))
    binding = objects[..., 0] * SHAPES + objects[..., 1]
    parts.append((F.one_hot(binding, COLOURS * SHAPES).float() * present[..., None]).sum(1))
    return torch.cat(parts, dim=1)


def _tokens(objects, count, word_table, max_len, noise, g):
    """Caption token states and text: "a <size> <colour> <shape> <cell>" per object joined by "and"."""
    n = objects.shape[0]
    ids = torch.zeros(n, max_len, dtype=torch.long)
    mask = torch.zeros(n, max_len, dtype=torch.bool)
    captions = []
    for i in range(n):
        words = []
        for j in range(int(count[i])):
            c, s, z, cell = objects[i, j].tolist()
            words += ([_WORD_AND] if j else []) + [_WORD_A, _WORD_SIZE + z, _WORD_COLOUR + c,
                                                   _WORD_SHAPE + s, _WORD_CELL + cell]
        captions.append(" ".join(_NAMES[w] for w in words))
        words = words[:max_len]
        ids[i, : len(words)] = torch.tensor(words)
        mask[i, : len(words)] = True
    states = word_table[ids] + noise * torch.randn(n, max_len, word_table.shape[1], generator=g)
    return states * mask[..., None], mask, captions


def make_pairs(n: int, *, embed_dim: int = 64, token_dim: int = 32, max_text_len: int = 16,
               text_share: float = 0.4, image_noise: float = 0.15, text_noise: float = 0.35,
               seed: int = 0, world_seed: int = 1234) -> dict[str, torch.Tensor]:
    """n samples as a batch dict: clip_image, clip_text (n, D) L2-normalised, clip_tokens (n, L, Dt),
    clip_mask (n, L) bool, the scene features "f" (n, FEATURES) and the captions "txt" (list of n str).

    `world_seed` fixes the linear maps and word table (the "CLIP model"); `seed` draws the scenes, so
    train and val splits share a world and differ in seed. `text_share` is how much of the image map
    the text map shares: 1 makes text and image embeddings agree up to noise.
    """
    gw = torch.Generator().manual_seed(world_seed)
    image_map = torch.randn(FEATURES, embed_dim, generator=gw) / FEATURES ** 0.5
    own_map = torch.randn(FEATURES, embed_dim, generator=gw) / FEATURES ** 0.5
    text_map = text_share * image_map + (1 - text_share ** 2) ** 0.5 * own_map
    nuisance_map = torch.randn(NUISANCE, embed_dim, generator=gw) / NUISANCE ** 0.5
    word_table = torch.randn(WORDS, token_dim, generator=gw)

    g = torch.Generator().manual_seed(seed)
    count = torch.randint(1, 4, (n,), generator=g)
    objects = torch.stack([torch.randint(0, k, (n, 3), generator=g)
                           for k in (COLOURS, SHAPES, SIZES, CELLS)], dim=-1)  # (n, 3, 4)
    f = _scene_features(objects, count)
    scale = count.float().sqrt()[:, None]  # keep the signal's norm independent of the object count
    nuisance = torch.randn(n, NUISANCE, generator=g)
    image = f @ image_map / scale + image_noise * (nuisance @ nuisance_map)
    image = image + 0.1 * image_noise * torch.randn(n, embed_dim, generator=g)
    text = f @ text_map / scale + text_noise * torch.randn(n, embed_dim, generator=g)
    tokens, mask, captions = _tokens(objects, count, word_table, max_text_len, 0.1, g)
    return {
        "clip_image": F.normalize(image, dim=-1),
        "clip_text": F.normalize(text, dim=-1),
        "clip_tokens": tokens,
        "clip_mask": mask,
        "f": f,
        "txt": captions,
    }


def batches(pairs: dict[str, torch.Tensor], batch_size: int, *, shuffle: bool = False, seed: int = 0,
            drop_last: bool = False):
    """Iterate `pairs` as reader-style batch dicts (the embedding keys only, plus "key")."""
    n = pairs["clip_image"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i: i + batch_size]
        batch = {k: pairs[k][idx] for k in ("clip_image", "clip_text", "clip_tokens", "clip_mask")}
        batch["key"] = [f"{seed}-{j}" for j in idx.tolist()]
        yield batch


def write_shards(out_dir, n_train: int, n_val: int, *, shard_size: int = 1000, **kwargs) -> None:
    """Write `out_dir/{train,val}/shard-*.tar` as `cascade data embed` leaves them, minus the images:
    txt, json and the four embedding members (tokens as float16), so the prior trains on them with
    the engine. kwargs go to `make_pairs` (train uses seed 0, val seed 1)."""
    import numpy as np

    from cascade.data.shards import ShardWriter

    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        pairs = make_pairs(n, seed=seed, **kwargs)
        with ShardWriter(Path(out_dir) / split, max_count=shard_size) as writer:
            for i in range(n):
                writer.write(f"{split}-{i:06d}", {
                    "txt": pairs["txt"][i],
                    "json": {"source": "prior.synthetic", "seed": seed},
                    "clip_image.npy": pairs["clip_image"][i].numpy(),
                    "clip_text.npy": pairs["clip_text"][i].numpy(),
                    "clip_tokens.npy": pairs["clip_tokens"][i].numpy().astype(np.float16),
                    "clip_mask.npy": pairs["clip_mask"][i].numpy(),
                })


def write_scene_shards(out_dir, *, train: int, val: int = 0, clip_dim: int, text_dim: int, text_len: int,
                       visible: int, shard_size: int = 8) -> Path:
    """`out_dir/{train,val}/` with shapes scenes rendered at 64 and random unit 'CLIP' embeddings and token
    states (the first `visible` of `text_len` unmasked) in `cascade data embed`'s layout: data for the
    decoder's engine tests and the memory benchmark, where only the shapes matter. One seeded stream
    over train then val, so the same arguments give the same shards."""
    import numpy as np

    from cascade.data.shapes import samples
    from cascade.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    items = list(samples(train + val, (64,), seed=0))
    for split, chosen in (("train", items[:train]), ("val", items[train:])):
        with ShardWriter(Path(out_dir) / split, max_count=shard_size) as writer:
            for s in chosen:
                z = rng.normal(size=(2, clip_dim)).astype(np.float32)
                z /= np.linalg.norm(z, axis=1, keepdims=True)
                writer.write(s.key, {"64.png": s.images[64], "txt": s.txt, "json": s.json,
                                     "clip_image.npy": z[0], "clip_text.npy": z[1],
                                     "clip_tokens.npy": rng.normal(size=(text_len, text_dim)).astype(np.float16),
                                     "clip_mask.npy": np.arange(text_len) < visible})
    return Path(out_dir)
