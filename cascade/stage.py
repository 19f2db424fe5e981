"""The contract every stage (clip, prior, decoder, sr256, sr1024) fulfils.

A stage is a config class, a network, `loss(batch)` and `sample(conditioning, ...)`, registered by
name with `cascade.registry.register_stage`. It knows nothing about launching, files or DeepSpeed:
the training engine feeds it batches from the shard reader, and the pipeline calls `sample`.

Batches are dicts collated from the reader's samples (see `cascade.data.reader`):
  "key": list[str], "txt": list[str], "json": list[dict],
  "image_<size>": (B, 3, size, size) float in [-1, 1] for each size in `image_sizes`,
  and, when `needs_embeddings`, "clip_image": (B, D), "clip_text": (B, D),
  "clip_tokens": (B, L, Dt), "clip_mask": (B, L) bool.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cascade.config import Config


class Stage(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type[Config]] = Config
    image_sizes: ClassVar[tuple[int, ...]] = ()  # which `<size>.png` the reader decodes
    needs_embeddings: ClassVar[bool] = False  # whether batches carry precomputed CLIP embeddings
    samples_images: ClassVar[bool] = True  # whether `preview` returns an image grid

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        # per instance: what the reader decodes for this config (see `data_needs`)
        self.image_sizes, self.needs_embeddings = self.data_needs(config)

    @classmethod
    def data_needs(cls, config: Config) -> tuple[tuple[int, ...], bool]:
        """(image_sizes, needs_embeddings) for a stage built from `config`: the class attributes unless
        the config decides (a stage overrides this then). The one source for the training reader,
        evaluation and the bundle manifest."""
        return tuple(cls.image_sizes), cls.needs_embeddings

    def preprocess(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Per-sample transform run in the data loader before collation (crops, degradations)."""
        return sample

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scalar training loss on one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, conditioning: dict[str, Any], *, sampler: str = "ddim", steps: int = 50,
               guidance: float = 1.0, generator: torch.Generator | None = None,
               callback=None) -> torch.Tensor:
        """Draw outputs for a batch of conditioning (images in [-1, 1], or embeddings).

        `callback(info)`, when given, is called after every sampling step (see `cascade.diffusion.sample`);
        the pipeline draws its per-stage progress bars from it. Stages may take further keyword options
        (noise, threshold, augmentation level)."""
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor | None:
        """Images (N, 3, H, W) in [-1, 1] for the training sample grid, or None."""
        return None

    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator) -> dict[str, float]:
        """Metrics on validation batches (an iterable of batches as above)."""
        return {}
