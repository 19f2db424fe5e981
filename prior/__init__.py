"""The diffusion prior (DALL-E 2 sec. 2.2): text embedding and token states -> CLIP image embedding.

Importing this package registers the "prior" stage. Modules: `config` (PriorConfig), `network`
(the causal transformer), `stage` (loss, sample, evaluate), `metrics` (cosine, retrieval rank, the
nearest-caption baseline), `synthetic` (CLIP-like embedding pairs for tests and benchmarks).
"""
from prior.config import PriorConfig
from prior.stage import PriorStage

__all__ = ["PriorConfig", "PriorStage"]
