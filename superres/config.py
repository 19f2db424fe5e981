"""The `model:` section of an sr256 / sr1024 config; the diffusion fields (schedule, prediction,
snr_gamma, p_drop_text, sampler, steps, guidance, ...) are `cascade.stage.DiffusionConfig`'s."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from cascade.stage import DiffusionConfig


class SRConfig(DiffusionConfig):
    """A 64 -> 256 upsampler's settings (sr1024's differ in the defaults of `SR1024Config`)."""

    # network (Imagen's Efficient U-Net: channels = base_channels * channel_mults[i] at level i)
    base_channels: int = 32
    channel_mults: list[int] = [1, 2, 4]
    num_res_blocks: list[int] = [1, 2, 2]
    dropout: float = 0.0
    # text conditioning by cross-attention at the lowest resolution (Imagen); DALL-E 2 used none
    text: bool = False
    text_dim: int = 512  # width of clip_tokens
    head_dim: int = 64
    # "diffusion", or "l1" / "l2": the same network as a plain one-pass regressor trained with an L1 / squared
    # error loss (no noise, no augmentation, t = 0), the non-diffusion baselines of the SR evaluations; steps,
    # sampler and aug levels are then unused
    objective: Literal["diffusion", "l1", "l2"] = "diffusion"
    # diffusion
    prediction: Literal["eps", "x0", "v"] = "v"
    # diffuse the residual high - bicubic(low) instead of the image (SRDiff, Li et al. 2022): a new
    # network then starts at bicubic quality instead of noise, which short CPU runs need
    residual: bool = False
    # noise-conditioning augmentation: train on s ~ U[0, train_aug_max]; sample at aug_level
    train_aug_max: float = Field(0.5, ge=0.0, le=1.0)
    aug_level: float = Field(0.2, ge=0.0, le=1.0)
    # low-res degradation in training: "blur" (sigma ~ U[0, level * blur_sigma]) or "mixed" (BSR-style)
    degradation: Literal["none", "blur", "mixed"] = "blur"
    degradation_max: float = Field(1.0, ge=0.0, le=1.0)  # level ~ U[0, degradation_max]
    degradation_prob: float = Field(0.5, ge=0.0, le=1.0)
    blur_sigma: float = 0.6
    # random aligned crops for training, as the high-res crop size (None: whole images)
    train_crop: int | None = None
    # images larger than tile_size run in pieces (None: every image in one pass); sizes in high-res
    # pixels. The pieces are blended tiles of tile_size with tile_margin of context, or, when stream_rows
    # is set, bands of stream_rows rows (superres.streaming): every pixel computed once, only a band of
    # each feature map in memory, the whole-image output exactly. With tile_size None, stream_rows
    # streams every image taller than it. Training (with autograd) never streams.
    tile_size: int | None = None
    tile_margin: int = 16
    stream_rows: int | None = Field(None, ge=1)
    # sampling defaults (the cascade's): DDIM, 20 steps, no guidance
    steps: int = Field(20, ge=1)
    # evaluation
    eval_images: int = 8
    eval_crop: int | None = None  # evaluate on the most detailed crop of this high-res size (None: whole)
    eval_steps: list[int] = [5, 25]
    eval_aug_levels: list[float] = [0.0, 0.1, 0.2, 0.4]

    renamed_keys: ClassVar[dict[str, str]] = {**DiffusionConfig.renamed_keys, "p_uncond": "p_drop_text"}


class SR1024Config(SRConfig):
    degradation: Literal["none", "blur", "mixed"] = "mixed"
    train_crop: int | None = 256
    tile_size: int | None = 256
    steps: int = Field(10, ge=1)
    eval_crop: int | None = 256
