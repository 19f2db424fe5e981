"""Builders of small, untrained stages for the tests that save them into bundles (it holds no tests)."""
from __future__ import annotations

import torch

from cascade.registry import get_stage


def seeded_stage(name: str, **model):
    """The registered stage `name` with config `model`, its weights drawn after torch.manual_seed(0)."""
    cls = get_stage(name)
    torch.manual_seed(0)
    return cls(cls.Config(**model))
