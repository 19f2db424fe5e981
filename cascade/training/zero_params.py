"""Parameters as DeepSpeed holds them: ZeRO-3 partitions to gather, and 0-d parameters to promote.

DeepSpeed 0.19 cannot train 0-d parameters (CLIP's logit scale is one): its start-up broadcast views
each parameter as bytes and its gradient clipping multiplies by a (1,) coefficient in place, and both
fail on a 0-d tensor. So the engine trains them as (1,) tensors, which broadcast the same way in any
stage's arithmetic, and hands them back as 0-d wherever weights leave the engine (checkpoints, EMA,
exports).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

GATHER_CHUNK = 32  # parameters gathered at once under ZeRO-3, to bound the memory a gather needs
_SCALAR_MARK = "_cascade_was_scalar"


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Full tensors for ZeRO-3 partitioned `params` inside the block (a collective); a no-op otherwise."""
    partitioned = [p for p in params if is_zero3_param(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def promote_scalars(module: nn.Module) -> int:
    """Make every 0-d parameter of `module` a (1,) one in place; returns how many there were."""
    count = 0
    for p in module.parameters():
        if p.ndim == 0:
            p.data = p.data.reshape(1)
            setattr(p, _SCALAR_MARK, True)
            count += 1
    return count


def saved_form(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a copy of parameter `p`) in the shape the stage declared."""
    return value.reshape(()) if getattr(p, _SCALAR_MARK, False) else value


def params_read_outside_forward(module: nn.Module, run) -> list[nn.Parameter]:
    """Parameters that `run()` may use without calling their module, found by running it once.

    ZeRO-3 gathers a module's own parameters in hooks around that module's call, so a parameter
    read as an attribute elsewhere (a stage's own `nn.Parameter`, CLIP's `model.logit_scale`) would
    be an empty slice. Those of modules that `run()` never calls are the ones to register with
    `deepspeed.zero.register_external_parameter` on the module that is called.
    """
    called: set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in module.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return [p for m in module.modules() if id(m) not in called for p in m.parameters(recurse=False)]
