"""Sharded inference: the large stages' weights partitioned across ranks with ZeRO-3 (ZeRO-Inference).

    deepspeed --num_gpus 2 --module cascade.cli generate --prompt "..." --shard [--offload]

Every rank runs the same command on the same prompts and seeds; DeepSpeed keeps 1/N of each stage's
weights per rank and gathers a layer's weights just before its forward, so a model too large for one
device's memory still samples. `--offload` keeps the partitions in CPU memory (for GPUs). Results match
the unsharded run within float tolerance; only rank 0 writes files.

Parameters used outside a submodule's forward (learned null embeddings, queries) must stay whole on
every rank: they are all small, and `PERSIST_BELOW` keeps any tensor below that many elements unpartitioned.
"""
from __future__ import annotations

import torch
from torch import nn

PERSIST_BELOW = 100_000


def zero3_config(offload: bool) -> dict:
    zero = {"stage": 3, "stage3_param_persistence_threshold": PERSIST_BELOW}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def shard_module(module: nn.Module, offload: bool = False) -> nn.Module:
    """Partition `module`'s parameters across the ranks (ZeRO-3, no optimizer); returns the module,
    whose submodules now gather their weights around each forward."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, config=zero3_config(offload))
    engine.module.eval()
    return engine.module


def shard_cascade(cascade, offload: bool = False) -> int:
    """Shard every stage of a loaded `Cascade` in place (the CLIP towers stay whole); returns the rank."""
    from cascade.training.distributed import setup

    import sys

    dist = setup()
    for name in list(cascade.stages):
        cascade.stages[name] = shard_module(cascade.stages[name], offload)
    if dist.is_main:
        held = {name: 1.0 - partitioned_fraction(stage) for name, stage in cascade.stages.items()}
        print(f"sharded across {dist.world_size} ranks; rank 0 holds "
              + ", ".join(f"{name} {100 * h:.0f}%" for name, h in held.items()) + " of the weights",
              file=sys.stderr)
    return dist.rank


def partitioned_fraction(module: nn.Module) -> float:
    """Fraction of `module`'s parameter elements this rank does not hold (0 when unsharded)."""
    full = held = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        full += n
        held += getattr(p, "ds_tensor", p).numel() if hasattr(p, "ds_tensor") else n
    return 1.0 - held / max(full, 1)
