"""The contract every stage (clip, prior, decoder, sr256, sr1024) fulfils.

A stage is a config class, a network, `loss(batch)` and `sample(conditioning, ...)`, registered by
name with `cascade.registry.register_stage`. It knows nothing about launching, files, data sources or
DeepSpeed: the training engine feeds it batches from the shard reader (and, for evaluations that need
them, train batches), and the pipeline calls `sample`.

The diffusion stages (prior, decoder, sr256, sr1024) configure their diffusion with the fields of
`DiffusionConfig`, under one set of names; its `sampler`, `steps` and `guidance` are the stage's
sampling defaults, used by `sample` whenever a caller passes None (the pipeline, the CLI, previews).

Batches are dicts collated from the reader's samples (see `cascade.data.reader`):
  "key": list[str], "txt": list[str], "json": list[dict],
  "image_<size>": (B, 3, size, size) float in [-1, 1] for each size in `image_sizes`,
  and, when `needs_embeddings`, "clip_image": (B, D), "clip_text": (B, D),
  "clip_tokens": (B, L, Dt), "clip_mask": (B, L) bool.
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from cascade.config import Config, DeprecatedKeyWarning


def build_schedule(config: "DiffusionConfig"):
    """The config's noise schedule (name, timesteps, log-SNR shift), on the CPU whatever the default device."""
    from cascade.diffusion import NoiseSchedule

    with torch.device("cpu"):
        return NoiseSchedule.from_name(config.schedule, config.timesteps).shifted(config.schedule_shift)


def text_only(config: Any) -> bool:
    """Whether a stage config reads the prompt's text alone: an Imagen-style decoder (`conditioning:
    imagen`), with no prior and no image embedding before it. Every other config (unCLIP decoders, other
    stages) says no."""
    return getattr(config, "conditioning", "unclip") == "imagen"


def reads_clip(name: str, config: Any) -> bool:
    """Whether stage `name` with `config` reads the bundle's CLIP: the prior and an unCLIP decoder (its
    embeddings and tokens) and an upsampler with `text: true` (its tokens) do; an Imagen-style decoder
    and the other upsamplers do not, so a bundle of only those needs no clip stage."""
    if name == "prior":
        return True
    if name == "decoder":
        return not text_only(config)
    return bool(getattr(config, "text", False))


class DiffusionConfig(Config):
    """The diffusion settings every diffusion stage has; a stage's config derives from it and may change
    the defaults. Keys renamed since an earlier version still load, with a `DeprecatedKeyWarning`."""

    # The forward process and what the network predicts.
    schedule: Literal["linear", "cosine", "angle"] = "cosine"
    timesteps: int = Field(1000, gt=1)
    # Every step's log-SNR moved by this (`NoiseSchedule.shifted`; simple diffusion's 2 log(64 / d)): < 0 noisier
    schedule_shift: float = 0.0
    prediction: Literal["eps", "x0", "v"] = "eps"
    # Loss weighting: min-SNR-gamma (Hang et al. 2023; None = plain MSE); `snr_plus_one` weights
    # min(SNR + 1, gamma) in x0 terms instead (see `cascade.diffusion.losses`).
    snr_gamma: float | None = Field(None, gt=0)
    snr_plus_one: bool = False
    # Classifier-free guidance needs the unconditional model: the text is dropped for this fraction of
    # the training samples (Ho & Salimans 2021).
    p_drop_text: float = Field(0.1, ge=0.0, le=1.0)
    # Sampling defaults: what `Stage.sample` uses for any of these a caller leaves as None.
    sampler: Literal["ddpm", "ddim", "dpmpp", "dpmpp_karras", "euler", "euler_a", "heun"] = "ddim"
    steps: int = Field(50, ge=1)
    guidance: float = Field(1.0, ge=0.0)
    # The lowest timestep (0-based) sampling visits; its last step returns the network's x0 estimate from there
    # (`NoiseSchedule.respace`). > 0 for a net that learned little at the lowest noise levels, as min-SNR
    # weighting leaves them after a short run: the quick demo's decoder drew half the pixel noise at 120
    # (docs/results.md, 2026-12-07). 0: down to the first step.
    t_min: int = Field(0, ge=0)
    # Recompute the network's blocks in backward instead of storing their activations (less memory, ~1/3 more compute).
    gradient_checkpointing: bool = False

    # Old key -> new key; a subclass adds its own.
    renamed_keys: ClassVar[dict[str, str]] = {"sample_steps": "steps"}

    @classmethod
    def upgrade_keys(cls, data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`data` with renamed keys moved to their new names, and a note per key moved. Giving both the
        old and the new name is an error."""
        data, notes = dict(data), []
        for old, new in cls.renamed_keys.items():
            if old in data:
                if new in data:
                    raise ValueError(f"'{old}' is the old name of '{new}'; give only '{new}'")
                data[new] = data.pop(old)
                notes.append(f"'{old}' is now called '{new}'")
        return data, notes

    @model_validator(mode="after")
    def _t_min_within_schedule(self) -> "DiffusionConfig":
        if self.t_min >= self.timesteps:
            raise ValueError(f"t_min must be below timesteps ({self.timesteps}), got {self.t_min}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, notes = cls.upgrade_keys(data)
        for note in notes:
            warnings.warn(f"{note}; the old name still loads but will not forever", DeprecatedKeyWarning,
                          stacklevel=2)
        return data


def resolve_sampling(config: DiffusionConfig, sampler: str | None, steps: int | None, guidance: float | None
                     ) -> tuple[str, int, float]:
    """(sampler, steps, guidance): each given value, else the config's default."""
    return (config.sampler if sampler is None else sampler, config.steps if steps is None else int(steps),
            config.guidance if guidance is None else float(guidance))


class Stage(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type[Config]] = Config
    image_sizes: ClassVar[tuple[int, ...]] = ()  # which `<size>.png` the reader decodes
    needs_embeddings: ClassVar[bool] = False  # whether batches carry precomputed CLIP embeddings
    samples_images: ClassVar[bool] = True  # whether `preview` returns an image grid
    # A preview in rows of these columns (e.g. bicubic / SR / real), labelled on top; () = one image per sample.
    preview_columns: ClassVar[tuple[str, ...]] = ()
    networks: ClassVar[tuple[str, ...]] = ()  # the submodules `compile_networks` compiles

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        # per instance: what the reader decodes for this config (see `data_needs`)
        self.image_sizes, self.needs_embeddings = self.data_needs(config)
        # Where `sample` runs when the weights live elsewhere (sequential CPU offload keeps them off the
        # device between layer calls); None: where the weights are.
        self.execution_device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        """Where this stage computes: its execution device, else its first parameter's (or buffer's)."""
        if self.execution_device is not None:
            return self.execution_device
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    @classmethod
    def data_needs(cls, config: Config) -> tuple[tuple[int, ...], bool]:
        """(image_sizes, needs_embeddings) for a stage built from `config`: the class attributes unless
        the config decides (a stage overrides this then). The one source for the training reader,
        evaluation and the bundle manifest."""
        return tuple(cls.image_sizes), cls.needs_embeddings

    def compile_networks(self, **options: Any) -> None:
        """Compile the stage's networks (`networks`) in place with `torch.compile`, for training and sampling.

        Each network's call is compiled (`nn.Module.compile`): the modules stay where they are, so parameter
        names, state_dict keys, checkpoints and bundles are the same as uncompiled. `options` go to
        `torch.compile` (backend, mode, dynamic). Compiling is lazy: the first calls are slow (seconds to
        minutes), and a new input shape, dtype or device, or switching between training and eval, compiles
        again (about one compilation of each variant a run uses)."""
        if not self.networks:
            raise NotImplementedError(f"the {self.name or type(self).__name__} stage names no networks to compile")
        for name in self.networks:
            getattr(self, name).compile(**options)

    def keeps(self, meta: dict[str, Any]) -> bool:
        """Whether this stage trains and evaluates on a sample, from its json (read before the images are
        decoded). Every sample by default; the upsamplers skip images upscaled from a smaller original."""
        return True

    def adapt_weights(self, state: dict[str, torch.Tensor], source: Config) -> list[str]:
        """Make `state`, the weights of a stage built from config `source`, fit this stage's network, in place,
        for `train_stage.py --init-from`; returns a line per tensor changed. The default changes nothing
        (then every tensor must already fit); a stage whose config can add inputs widens the layers
        that read them."""
        return []

    def preprocess(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Per-sample transform run in the data loader before collation (crops, degradations)."""
        return sample

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scalar training loss on one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, conditioning: dict[str, Any], *, sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None,
               callback=None) -> torch.Tensor:
        """Draw outputs for a batch of conditioning (images in [-1, 1], or embeddings).

        sampler, steps and guidance left as None are the config's (`resolve_sampling`). All noise comes
        from `generator`. `callback(info)`, when given, is called after every sampling step (see
        `cascade.diffusion.sample`); the pipeline draws its per-stage progress bars from it. Stages may
        take further keyword options (noise, threshold, augmentation level)."""
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor | None:
        """Images (N, 3, H, W) in [-1, 1] for the training sample grid, or None."""
        return None

    def preview_grid(self, images: torch.Tensor, captions: list[str] | None = None):
        """The PIL grid `preview`'s images are shown as: captioned (one caption per image, wrapped) or,
        for a stage with `preview_columns`, in labelled columns without captions (its preview picks its
        own rows from the batch)."""
        from cascade.images import make_grid

        if self.preview_columns:
            return make_grid(images, ncols=len(self.preview_columns), column_labels=list(self.preview_columns))
        n = images.shape[0]
        return make_grid(images, list(captions[:n]) if captions is not None and len(captions) >= n else None)

    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator, train_batches=None) -> dict[str, float]:
        """Metrics on validation batches (an iterable of batches as above). `train_batches`, when the
        caller has a train split, is an iterable of train batches for baselines fitted on it (read only
        by the stages that have one; the same object may be passed at every evaluation of a run)."""
        return {}
