"""The stage YAML a run is configured by: `stage`, `model` (the stage's Config) and `train` (TrainConfig).

Unknown or mistyped keys are `ConfigError`s that name the key and the file, at every level.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, create_model, field_validator

from cascade.config import Config, parse_config, read_yaml
from cascade.errors import ConfigError

class TrainConfig(Config):
    """Optimisation and bookkeeping for one stage; every step count is in optimizer steps."""

    batch_size: int = Field(gt=0)  # per process, per micro-batch
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # floor of the cosine, as a fraction of lr
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 turns clipping off
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    ckpt_every: int = Field(500, ge=0)  # 0: only at the end and on a signal
    sample_every: int = Field(500, ge=0)  # 0: no sample grids
    eval_every: int = Field(0, ge=0)  # 0: at the end only
    eval_at_end: bool = True  # False: no evaluation at the last step (e.g. when `cascade eval` follows)
    num_workers: int = Field(0, ge=0)
    max_nonfinite: int = Field(10, gt=0)  # non-finite losses in a row (each batch skipped) before the run stops
    compile: bool = False  # torch.compile the stage's networks (`Stage.compile_networks`); the first steps compile

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(betas)}")
        return betas


class RunConfig:
    """A parsed stage YAML: the stage's name, its validated model config and the TrainConfig."""

    def __init__(self, stage: str, model: Config, train: TrainConfig, source: str):
        self.stage = stage
        self.model = model
        self.train = train
        self.source = source

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "model": self.model.model_dump(mode="json"),
                "train": self.train.model_dump(mode="json")}

    def defaults(self) -> dict[str, Any]:
        """Each model and train field's default, JSON-typed like `as_dict` (fields without one left out)."""
        def of(config) -> dict[str, Any]:
            return {name: json.loads(json.dumps(field.get_default(call_default_factory=True)))
                    for name, field in type(config).model_fields.items() if not field.is_required()}
        return {"model": of(self.model), "train": of(self.train)}


def load_run_config(path: str | Path, stage: str | None = None) -> RunConfig:
    """Read `path`, check it configures `stage` (when given), and validate `model` and `train`.

    The whole file is validated as one schema built from the stage's Config, so an error names
    the key with its section (`model.widht`, `train.lr`) and the file.
    """
    from cascade.registry import get_stage

    source = str(path)
    if stage is not None:
        get_stage(stage)  # an unknown --stage is reported as such, before the file is read
    data = read_yaml(path)
    named = data.get("stage", stage)
    if named is None:
        raise ConfigError(f"{source}: missing key 'stage'")
    if stage is not None and named != stage:
        raise ConfigError(f"{source}: key 'stage' is '{named}' but --stage is '{stage}'")
    cls = get_stage(str(named))
    schema = create_model("StageFile", __base__=Config, stage=(str, ...), model=(cls.Config, ...),
                          train=(TrainConfig, ...))
    parsed = parse_config(schema, {"stage": named, **data}, source)
    return RunConfig(parsed.stage, parsed.model, parsed.train, source)
