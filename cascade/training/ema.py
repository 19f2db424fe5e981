"""An exponential moving average of the trainable weights, kept on rank 0 in fp32.

    ema <- d * ema + (1 - d) * w,   d = min(decay, (1 + n) / (10 + n))

after the n-th optimizer step; the ramp on d (as in TensorFlow's ExponentialMovingAverage with
`num_updates`) stops the average from clinging to the random initialisation in short runs.

Under ZeRO-3 every rank holds only a slice of each parameter, so the update gathers the full tensors
with `deepspeed.zero.GatheredParameters` (a collective: every rank must call `update`), a few
parameters at a time to bound the memory the gather needs.
"""
from __future__ import annotations

import torch
from torch import nn

from cascade.training.zero_params import GATHER_CHUNK, gathered, saved_form


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used by the `updates`-th update: ramps up from 0.1 towards `decay`."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class EMA:
    """EMA of `module`'s trainable parameters; `holds` is False on ranks that keep no copy."""

    def __init__(self, module: nn.Module, decay: float, *, holds: bool = True):
        self.decay = decay
        self.holds = holds
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        self._params = trainable(module)
        self._for_each_gathered(lambda name, p: self.shadow.__setitem__(name, p.detach().float().clone()))
        self._by_name = dict(self._params)

    def _for_each_gathered(self, fn) -> None:
        for start in range(0, len(self._params), GATHER_CHUNK):
            chunk = self._params[start:start + GATHER_CHUNK]
            with gathered([p for _, p in chunk]):
                if self.holds:
                    for name, p in chunk:
                        fn(name, p)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = ema_decay_at(self.decay, self.updates)
        self._for_each_gathered(lambda name, p: self.shadow[name].lerp_(p.detach().float(), 1.0 - d))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under their parameter names and declared shapes."""
        return {name: saved_form(self._by_name[name], t) for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        if self.holds:
            missing = sorted(set(self.shadow) - set(state))
            if missing:
                raise KeyError(f"EMA state lacks {missing[:3]}")
            for name in self.shadow:
                self.shadow[name].copy_(state[name].reshape(self.shadow[name].shape))
        self.updates = updates
