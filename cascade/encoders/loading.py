"""Load a `ClipEncoder` from a CLIP stage folder of a model bundle, or from an open_clip name.

A stage folder (see `cascade.bundle`) holds `config.json` ({"stage": "clip", "config": {...}, ...}) and
`model.safetensors` (the stage's weights, whose keys start with "encoder."; tied tensors stored once).
Loading never unpickles.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from cascade.encoders.clip_model import ClipEncoder, ClipEncoderConfig
from cascade.errors import UserError

STAGE_PREFIX = "encoder."  # the CLIP stage keeps its ClipEncoder as `self.encoder`


def _stage_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: not a CLIP stage folder (no config.json)")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path} is corrupt: {err}") from None
    if data.get("stage", "clip") != "clip":
        raise UserError(f"{folder}: a '{data['stage']}' stage, not a CLIP stage")
    for section in ("config", "model"):  # the bundle's layout, or a bare {"model": ...}
        if isinstance(data.get(section), dict):
            data = data[section]
            break
    return {k: v for k, v in data.items() if k in ClipEncoderConfig.model_fields}


def load_encoder(source: str | Path, device: str | torch.device = "cpu") -> ClipEncoder:
    """A ClipEncoder in eval mode from a stage folder, or from "open_clip_name[:tag_or_file]"."""
    folder = Path(source)
    if folder.is_dir():
        fields = _stage_config(folder)
        # The folder's weights replace everything, so skip loading the packaged or pretrained ones.
        config = ClipEncoderConfig(**{**fields, "pretrained_towers": False, "open_clip_pretrained": None})
        weights_path = folder / "model.safetensors"
        if not weights_path.is_file():
            raise UserError(f"{folder}: no model.safetensors")
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
        state = {k[len(STAGE_PREFIX):] if k.startswith(STAGE_PREFIX) else k: v for k, v in state.items()}
        encoder = ClipEncoder(config)
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        missing = [k for k in missing if not _tied_to_loaded(encoder, k, state)]
        if missing or unexpected:
            raise UserError(f"{weights_path}: weights do not match its config.json "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        encoder.identity = encoder_identity(folder)
    elif os.path.lexists(folder):
        raise UserError(f"{folder} is a file, not a CLIP stage folder (a directory with config.json and "
                        "model.safetensors) or an open_clip model name")
    elif _looks_like_path(str(source)):
        raise UserError(f"CLIP stage folder not found: {folder} does not exist")
    else:
        name, _, pretrained = str(source).partition(":")
        config = ClipEncoderConfig(open_clip_model=name, open_clip_pretrained=pretrained or None)
        encoder = ClipEncoder(config)
        encoder.identity = f"open_clip:{source}"
    return encoder.to(device).eval()


def _looks_like_path(source: str) -> bool:
    """Whether `source` names a folder rather than "open_clip_name[:tag_or_file]": its name part has a
    path separator or starts like a relative or home path (open_clip names have neither)."""
    name = source.partition(":")[0]
    return "/" in name or os.sep in name or name.startswith((".", "~"))


def _tied_to_loaded(encoder: ClipEncoder, name: str, state: dict[str, torch.Tensor]) -> bool:
    """Whether `name` shares storage with a tensor the file did hold (saved once for both)."""
    tensors = encoder.state_dict(keep_vars=True)
    ptr = tensors[name].untyped_storage().data_ptr()
    return any(k in state and k != name and t.untyped_storage().data_ptr() == ptr for k, t in tensors.items())


def encoder_identity(folder: str | Path) -> str:
    """A stable id of a stage folder's CLIP: a hash of its config and weights files."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]
