"""Stages by name. A stage module registers its class here; the engine and pipeline look it up.

Stages import only this module (never the orchestrator), so the arrows stay one way.
"""
from __future__ import annotations

import importlib

from cascade.errors import UserError

_STAGES: dict[str, type] = {}

# The built-in stages in cascade order, and where each lives (importing the module registers it).
_BUILTIN = {
    "clip": "cascade.clip_stage",
    "prior": "prior",
    "decoder": "decoder",
    "sr256": "superres",
    "sr1024": "superres",
}
STAGE_ORDER = tuple(_BUILTIN)  # every stage of a bundle, in the order they run and are evaluated
SAMPLED_STAGES = STAGE_ORDER[1:]  # the diffusion stages the pipeline samples (clip is an encoder)
IMAGE_STAGES = ("decoder", "sr256", "sr1024")  # the stages that make images; a run may stop after any
SUPERRES_STAGES = IMAGE_STAGES[1:]
# The jobs that work on CLIP image embeddings, which only an unCLIP bundle's decoder reads: the CLI's commands
# of these names, the pipeline's methods and the studio's tabs (an Imagen-style bundle refuses or disables them).
EMBEDDING_JOBS = ("vary", "interpolate", "textdiff")


def image_stages_until(until: str) -> tuple[str, ...]:
    """The image stages a run stopping after `until` goes through (decoder first); a UserError for a
    name that is not an image stage."""
    if until not in IMAGE_STAGES:
        raise UserError(f"--until must be one of {', '.join(IMAGE_STAGES)}, not '{until}'")
    return IMAGE_STAGES[: IMAGE_STAGES.index(until) + 1]


def register_stage(name: str):
    """Class decorator: make a stage class available as `name`."""

    def wrap(cls):
        cls.name = name
        _STAGES[name] = cls
        return cls

    return wrap


def stage_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_STAGES))


def get_stage(name: str) -> type:
    """The stage class registered as `name`; a UserError listing the known names otherwise."""
    if name not in _STAGES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _STAGES:
        raise UserError(f"unknown stage '{name}'; known stages: {', '.join(stage_names())}")
    return _STAGES[name]
