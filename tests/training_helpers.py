"""A tiny stage and tiny shard sets shared by the engine's tests (it holds no tests itself)."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from cascade.config import Config
from cascade.registry import register_stage
from cascade.stage import Stage

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # train_stage.py lives at the top of the repository


class TinyAEConfig(Config):
    width: int = 8


@register_stage("test_tiny_ae")
class TinyAE(Stage):
    """A conv autoencoder on 64x64 images with loss = MSE reconstruction of image_64.

    It has a parameter on the stage itself (`gain`) and a frozen one, the two cases the engine has
    to handle specially (ZeRO-3 gathering outside a submodule call; no EMA/optimizer for frozen).
    """

    Config = TinyAEConfig
    image_sizes = (64,)
    networks = ("encode", "decode")

    def __init__(self, config: TinyAEConfig):
        super().__init__(config)
        w = config.width
        self.encode = nn.Sequential(nn.Conv2d(3, w, 4, stride=4), nn.SiLU(), nn.Conv2d(w, w, 1))
        self.decode = nn.ConvTranspose2d(w, 3, 4, stride=4)
        self.gain = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 64, 64) -> same
        return self.gain * self.decode(self.encode(x))

    def loss(self, batch):
        # Tests of the signal handling make the run signal itself at a given call of `loss`.
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == int(os.environ.get("CASCADE_TEST_SIGTERM_AT_CALL", "0")):
            os.kill(os.getpid(), signal.SIGTERM)
        x = batch["image_64"]
        loss = (self(x) - x).pow(2).mean()
        # Tests of the non-finite guard: the calls (1-based) whose loss is NaN, e.g. "3,4", or "3-" for all from 3.
        nan_at = os.environ.get("CASCADE_TEST_NAN_AT_CALLS", "")
        if nan_at.endswith("-") and self.calls >= int(nan_at[:-1]) or str(self.calls) in nan_at.split(","):
            return loss * float("nan")
        return loss

    @torch.no_grad()
    def preview(self, batch, generator):
        return self(batch["image_64"][:4]).clamp(-1, 1)

    @torch.no_grad()
    def evaluate(self, batches, generator, train_batches=None):
        total, n = 0.0, 0
        for batch in batches:
            x = batch["image_64"]
            total += float((self(x) - x).pow(2).mean(dim=(1, 2, 3)).sum())
            n += x.shape[0]
        return {"mse": total / n, "count": float(n)}


def write_shards(out: Path, *, train: int, val: int = 4, per_shard: int = 8, seed: int = 0) -> Path:
    """Shapes samples (the data helper's renderer) into out/train and out/val shards."""
    from cascade.data.shapes import samples
    from cascade.data.shards import ShardWriter

    items = list(samples(train + val, (64,), seed=seed))
    for split, chosen in (("train", items[:train]), ("val", items[train:])):
        if not chosen:
            continue
        with ShardWriter(out / split, max_count=per_shard) as writer:
            for s in chosen:
                writer.write(s.key, {"64.png": s.images[64], "txt": s.txt, "json": s.json})
    return out


def write_config(path: Path, *, width: int = 8, **train) -> Path:
    defaults = dict(batch_size=8, lr=3e-3, warmup_steps=2, max_steps=30, log_every=5, ckpt_every=0,
                    sample_every=0, eval_every=0, ema_decay=0.9, seed=0)
    defaults.update(train)
    path.write_text(yaml.safe_dump({"stage": "test_tiny_ae", "model": {"width": width}, "train": defaults}))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    # `deepspeed --num_gpus 2 tests/training_helpers.py ARGS` trains the tiny stage like
    # train_stage.py would (the stage is registered by importing this file).
    from train_stage import main

    from cascade.training.distributed import exit_process

    exit_process(main())
