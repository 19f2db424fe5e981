"""Typed configs: YAML files loaded into pydantic models that reject unknown keys.

Every config class derives from `Config`, which forbids extra keys, so a typo is an error that
names the key and the file instead of a silently ignored setting.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cascade.errors import ConfigError

C = TypeVar("C", bound="Config")


class DeprecatedKeyWarning(FutureWarning):
    """A config uses a key's old name (shown to users by default, unlike DeprecationWarning)."""


class Config(BaseModel):
    """Base of every config class: unknown keys are errors; values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _describe(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"key '{key}': {e['msg']}")
    return f"{source}: " + "; ".join(parts)


def parse_config(cls: type[C], data: dict[str, Any] | None, source: str = "<config>") -> C:
    """Validate a mapping into `cls`; errors name every offending key and `source`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecatedKeyWarning)
        try:
            parsed = cls.model_validate(data or {})
        except ValidationError as err:
            raise ConfigError(_describe(err, source)) from None
    for w in caught:  # said again with the file they are about
        if issubclass(w.category, DeprecatedKeyWarning):
            warnings.warn(f"{source}: {w.message}", DeprecatedKeyWarning, stacklevel=2)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return parsed


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err.__class__.__name__}: {err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path) -> C:
    """Load a YAML file into `cls`."""
    return parse_config(cls, read_yaml(path), str(path))
