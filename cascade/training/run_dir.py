"""Which stage and config a run directory belongs to (`run.json`), so a resume never mixes runs.

A run directory holds one experiment: resuming it with another stage, model config or optimisation
setting is refused with a one-line UserError naming what differs. Keys that only say how long to
train or how often to log/save (`max_steps`, `*_every`, `num_workers`) may change between resumes.
A key the recorded config lacks (an option added to cascade after the run began) counts as its
default, which by convention keeps the old behaviour: an upgrade does not orphan a run; nor does a
key renamed since (the stage config's `upgrade_keys` maps the recorded one). The sampling defaults and
evaluation settings (`MUTABLE_MODEL_KEYS`) shape previews and scores, not the weights, so they may
change too; so may `gradient_checkpointing` and `compile`, which trade memory or start-up time for
speed and change the results at most by rounding.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cascade.atomic_files import write_text_atomic
from cascade.errors import UserError

RUN_FILE = "run.json"
MUTABLE_TRAIN_KEYS = frozenset({"max_steps", "log_every", "ckpt_every", "sample_every", "eval_every",
                                "num_workers", "max_nonfinite", "compile"})
MUTABLE_MODEL_KEYS = frozenset({"sampler", "steps", "guidance", "eval_steps", "eval_guidance",
                                "gradient_checkpointing"})


def identity(run_config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run config (`RunConfig.as_dict()`) a resumed run must share."""
    train = {k: v for k, v in run_config["train"].items() if k not in MUTABLE_TRAIN_KEYS}
    model = {k: v for k, v in run_config["model"].items() if k not in MUTABLE_MODEL_KEYS}
    return {"stage": run_config["stage"], "model": model, "train": train}


def _differences(old: Any, new: Any, prefix: str = "", defaults: Any = None) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            before = old[key] if key in old else defaults.get(key)
            out += _differences(before, new.get(key), f"{prefix}{key}.", defaults.get(key))
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {json.dumps(old)} -> {json.dumps(new)}"]


def claim(run_dir: Path, run_config: dict[str, Any], source: str, *, write: bool,
          defaults: dict[str, Any] | None = None,
          upgrade_model: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """Check that `run_dir` is new or belongs to this run config; record it there when `write`.
    `defaults` ({"model": {...}, "train": {...}}) stand in for keys the recorded config lacks;
    `upgrade_model` maps the recorded model section's old key names to the current ones."""
    path = run_dir / RUN_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is corrupt ({err}); use another --run-dir") from None
        if upgrade_model is not None and isinstance(recorded.get("model"), dict):
            recorded = {**recorded, "model": upgrade_model(recorded["model"])}
        old, new = identity(recorded), identity(run_config)
        if old["stage"] != new["stage"]:
            raise UserError(f"run dir {run_dir} belongs to stage '{old['stage']}', not '{new['stage']}'; "
                            f"use another --run-dir")
        diff = _differences(old, new, defaults=defaults)
        if diff:
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise UserError(f"run dir {run_dir} belongs to another {old['stage']} config "
                            f"({recorded.get('source', '?')}): {shown}; use another --run-dir")
    elif run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "checkpoints").exists():
        raise UserError(f"run dir {run_dir} is not empty and is not a training run; use another --run-dir")
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({**run_config, "source": source}, indent=2) + "\n")
