"""Model bundles: a directory with `cascade.json` and one folder per stage, loaded without unpickling.

    BUNDLE/cascade.json            {"format_version", "cascade_version", "stages": [...], "details": {...}}
    BUNDLE/<stage>/config.json     {"format_version", "cascade_version", "stage", "config": {...}}
    BUNDLE/<stage>/model.safetensors   the EMA weights (safetensors; tied tensors stored once)

A stage folder carries its config and a format version, so loading says what does not match
instead of failing deep inside `load_state_dict` (the breakage DALLE2-pytorch #158/#282 report).

Format 2 (the stage contract): a stage's config holds its own sampling defaults (sampler, steps,
guidance), which the pipeline uses. Format 1 bundles still load: their configs' old key names are
mapped to the new ones, and their sampling defaults are set to the fixed settings the pipeline of
format 1 sampled them with (`V1_SAMPLING`), so they make the same images as before.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

import cascade
from cascade.atomic_files import replace_dir, use_umask_mode, write_text_atomic
from cascade.config import parse_config
from cascade.errors import UserError
from cascade.stage import text_only

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What the format-1 pipeline sampled each stage with, whatever the stage's config said.
V1_SAMPLING = {"prior": {"sampler": "ddim", "steps": 25, "guidance": 4.0},
               "decoder": {"sampler": "ddim", "steps": 50, "guidance": 3.0},
               "sr256": {"sampler": "ddim", "steps": 20, "guidance": 1.0},
               "sr1024": {"sampler": "ddim", "steps": 10, "guidance": 1.0}}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "cascade.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_stage(stage: nn.Module, stage_dir: str | Path) -> Path:
    """Write `stage` (its current weights, which should be the EMA ones) as a bundle stage folder.

    The folder is assembled under a temporary name and renamed, replacing an older export.
    """
    stage_dir = Path(stage_dir)
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir.with_name(f".{stage_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config = {"format_version": FORMAT_VERSION, "cascade_version": cascade.__version__,
              "stage": stage.name, "config": stage.config.model_dump(mode="json")}
    _write_json(tmp / CONFIG_FILE, config)
    save_model(stage, str(tmp / WEIGHTS_FILE),
               metadata={"format_version": str(FORMAT_VERSION), "stage": stage.name})
    use_umask_mode(tmp / WEIGHTS_FILE)
    replace_dir(tmp, stage_dir)
    return stage_dir


def _read_versioned(path: Path, missing: str, kind: str) -> dict[str, Any]:
    """A bundle JSON file whose format version this cascade reads; one-line UserErrors otherwise."""
    if not path.is_file():
        raise UserError(f"{missing}: it has no {path.name}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt: {err}") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version not in READABLE_VERSIONS:
        raise UserError(f"{path}: {kind} format version {version}, this cascade ({cascade.__version__}) "
                        f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    return data


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The parsed `cascade.json` of a model bundle, with its format version checked."""
    bundle_dir = Path(bundle_dir)
    check_bundle_dir(bundle_dir)
    return _read_versioned(bundle_dir / MANIFEST_FILE, f"{bundle_dir} is not a model bundle", "bundle")


def check_bundle_dir(bundle_dir: Path) -> None:
    """A one-line UserError unless `bundle_dir` is a directory: not found, or a file where the bundle's
    directory should be."""
    if not os.path.lexists(bundle_dir):
        raise UserError(f"model bundle not found: {bundle_dir} does not exist")
    if not bundle_dir.is_dir():
        raise UserError(f"{bundle_dir} is a file, not a model bundle (a directory with {MANIFEST_FILE} and "
                        "a folder per stage)")


def read_stage_config(stage_dir: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a stage folder, with its format version checked."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise UserError(f"stage folder not found: {stage_dir}")
    data = _read_versioned(stage_dir / CONFIG_FILE, f"{stage_dir} is not a bundle stage folder", "stage")
    for key in ("stage", "config"):
        if key not in data:
            raise UserError(f"{stage_dir / CONFIG_FILE}: missing key '{key}'")
    return data


def stage_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The stage config of a parsed `config.json`, in the current format (see the module docstring)."""
    from cascade.registry import get_stage

    config = dict(data["config"])
    if data.get("format_version") == 1 and data["stage"] in V1_SAMPLING:
        config, _ = get_stage(data["stage"]).Config.upgrade_keys(config)
        config.update(V1_SAMPLING[data["stage"]])
    return config


def saved_config(stage_dir: str | Path, data: dict[str, Any] | None = None):
    """The typed stage config a stage folder holds (its parsed `config.json` if `data` is given), read
    without the weights."""
    from cascade.registry import get_stage

    stage_dir = Path(stage_dir)
    data = read_stage_config(stage_dir) if data is None else data
    return parse_config(get_stage(data["stage"]).Config, stage_config_dict(data), str(stage_dir / CONFIG_FILE))


def decoder_text_only(bundle_dir: str | Path) -> bool:
    """Whether the bundle's decoder is Imagen-style (`conditioning: imagen`), read from its saved config
    without the weights; False for a bundle without a decoder folder (an unreadable config is a UserError)."""
    decoder = Path(bundle_dir) / "decoder"
    return decoder.is_dir() and text_only(saved_config(decoder))


def load_stage(stage_dir: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """The stage saved in `stage_dir`, in eval mode with its saved weights.

    Every mismatch is a one-line UserError: a missing file, another format version, a config the
    stage class no longer accepts, or weights that do not fit the network the config builds.
    """
    from cascade.registry import get_stage

    stage_dir = Path(stage_dir)
    data = read_stage_config(stage_dir)
    weights_path = stage_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{stage_dir} has no {WEIGHTS_FILE}")
    stage = get_stage(data["stage"])(saved_config(stage_dir, data))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights_path} is not a readable safetensors file: {err}") from None
    _load_weights(stage, state, weights_path)
    return stage.to(device).eval()


def init_from(stage: nn.Module, stage_dir: str | Path) -> list[str]:
    """Load the weights of bundle stage folder `stage_dir` into `stage` (a stage of the same kind whose
    config may add inputs, see `Stage.adapt_weights`), for fine-tuning; returns what was adapted, a line
    each. Every mismatch is a one-line UserError."""
    stage_dir = Path(stage_dir)
    data = read_stage_config(stage_dir)
    if data["stage"] != stage.name:
        raise UserError(f"--init-from {stage_dir} holds a {data['stage']} stage, not a {stage.name}")
    weights_path = stage_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"{stage_dir} has no {WEIGHTS_FILE}")
    source = saved_config(stage_dir, data)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights_path} is not a readable safetensors file: {err}") from None
    adapted = stage.adapt_weights(state, source)
    _load_weights(stage, state, weights_path)
    return adapted


def _load_weights(stage: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = stage.state_dict()
    # save_model stores each set of tied tensors once, under one of their names.
    tied = {name for name in expected if name not in state and _shares_storage(expected, name, state)}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        if wrong:
            k = wrong[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)}, "
                         f"the config builds {tuple(expected[k].shape)}")
        raise UserError(f"{source} does not match its config: " + "; ".join(parts))
    stage.load_state_dict(state, strict=False)


def _shares_storage(expected: dict[str, torch.Tensor], name: str, state: dict[str, torch.Tensor]) -> bool:
    if expected[name].numel() == 0:
        return False
    ptr = expected[name].untyped_storage().data_ptr()
    return any(other in state and expected[other].untyped_storage().data_ptr() == ptr
               for other in expected if other != name)


def write_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Write or update `bundle_dir/cascade.json` to list every stage folder present.

    Per stage it records the image sizes it reads and whether it needs CLIP embeddings, as its saved
    config decides (`Stage.data_needs`), so the orchestrator can check the chain before loading any
    weights.
    """
    from cascade.registry import get_stage

    bundle_dir = Path(bundle_dir)
    check_bundle_dir(bundle_dir)
    details: dict[str, Any] = {}
    for folder in sorted(p for p in bundle_dir.iterdir() if (p / CONFIG_FILE).is_file()):
        data = read_stage_config(folder)
        if data["stage"] != folder.name:
            raise UserError(f"{folder / CONFIG_FILE} holds stage '{data['stage']}' but the folder is "
                            f"named '{folder.name}'")
        cls = get_stage(data["stage"])
        image_sizes, needs_embeddings = cls.data_needs(
            parse_config(cls.Config, stage_config_dict(data), str(folder / CONFIG_FILE)))
        details[folder.name] = {"image_sizes": list(image_sizes),
                                "needs_embeddings": needs_embeddings,
                                "cascade_version": data.get("cascade_version")}
    if not details:
        raise UserError(f"{bundle_dir} holds no stage folders (each needs a {CONFIG_FILE})")
    manifest = {"format_version": FORMAT_VERSION, "cascade_version": cascade.__version__,
                "stages": list(details), "details": details}
    _write_json(bundle_dir / MANIFEST_FILE, manifest)
    return manifest
