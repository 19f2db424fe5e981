"""The prior's model config: network size, diffusion settings, sampling and eval defaults.

Every default is here, in one place; `configs/tiny/prior.yaml` and `configs/dalle2/prior.yaml` override them.
The diffusion fields (schedule, prediction, p_drop_text, sampler, steps, guidance, ...) are
`cascade.stage.DiffusionConfig`'s.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from cascade.stage import DiffusionConfig


class PriorConfig(DiffusionConfig):
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

    # Diffusion over the image embedding scaled by sqrt(D); DALL-E 2's network predicts x0.
    prediction: Literal["eps", "x0", "v"] = "x0"
    # Sampling defaults (the cascade's): DDIM, 25 steps, guidance 4.
    steps: int = Field(25, ge=1)
    guidance: float = Field(4.0, ge=0.0)
    candidates: int = Field(2, ge=1)  # DALL-E 2 draws 2 and keeps the one closer to the text embedding

    # Evaluation: the prior's own samples against the true image embeddings, unguided by default.
    eval_steps: int | None = Field(None, ge=1)  # None: `steps`
    eval_guidance: float = Field(1.0, ge=0.0)
    eval_max_samples: int = Field(1000, gt=0)  # val samples scored (sampling cost grows with it)
    train_pool_size: int = Field(50000, gt=0)  # train (text, image) pairs searched by the nn baseline

    renamed_keys: ClassVar[dict[str, str]] = {"cond_drop_prob": "p_drop_text"}

    @classmethod
    def upgrade_keys(cls, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        # Before the stage contract, `sample_steps` and `guidance` were the evaluation's settings (the
        # cascade sampled with its own constants); a config that still says `sample_steps` means that.
        data, notes = super().upgrade_keys(data)
        if "sample_steps" in data:
            if "eval_steps" in data:
                raise ValueError("'sample_steps' is the old name of 'eval_steps'; give only 'eval_steps'")
            data["eval_steps"] = data.pop("sample_steps")
            notes.append("'sample_steps' is now called 'eval_steps'")
            if "guidance" in data and "eval_guidance" not in data:
                data["eval_guidance"] = data.pop("guidance")
                notes.append("'guidance' beside 'sample_steps' was the evaluation's: it is now 'eval_guidance'")
        return data, notes
