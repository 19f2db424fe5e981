"""The prior's model config: network size, diffusion settings, sampling and eval defaults.

Every default is here, in one place; `configs/tiny/prior.yaml` and `configs/dalle2/prior.yaml` override them.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from cascade.config import Config


class PriorConfig(Config):
    # What the CLIP model hands us; must match the embedded shards.
    embed_dim: int = Field(64, gt=0)  # D, CLIP's shared embedding width
    token_dim: int = Field(384, gt=0)  # Dt, width of the text tower's token states
    max_text_len: int = Field(32, gt=0)  # L, tokens per caption (fixed per CLIP model)

    # The decoder-only transformer (DALL-E 2 section 2.2).
    width: int = Field(256, gt=0)
    depth: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    ff_mult: int = Field(4, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    # Diffusion over the image embedding scaled by sqrt(D); the network predicts x0.
    schedule: Literal["cosine", "linear"] = "cosine"
    timesteps: int = Field(1000, gt=1)
    cond_drop_prob: float = Field(0.1, ge=0.0, le=1.0)  # text conditioning dropped for guidance

    # Sampling defaults (also used by `evaluate`).
    sampler: Literal["ddim", "dpmpp"] = "ddim"
    sample_steps: int = Field(64, gt=0)
    guidance: float = 1.0
    candidates: int = Field(2, ge=1)  # DALL-E 2 draws 2 and keeps the one closer to the text embedding

    # Evaluation.
    eval_max_samples: int = Field(1000, gt=0)  # val samples scored (sampling cost grows with it)
    train_pool_size: int = Field(50000, gt=0)  # train (text, image) pairs searched by the nn baseline
