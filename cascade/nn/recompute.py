"""Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): a block
run through `run_block(..., checkpoint=True)` keeps only its inputs for backward and runs its forward
again there, trading one more forward pass for the activations inside the block.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint


def run_block(block: nn.Module, *args, checkpoint: bool = False):
    """`block(*args)`; with `checkpoint`, while the block trains and autograd records, recomputed in
    backward. The recomputation replays the forward's RNG state, so dropout draws the same mask and the
    loss and gradients equal the stored-activation ones."""
    if checkpoint and block.training and torch.is_grad_enabled():
        return _checkpoint(block, *args, use_reentrant=False)
    return block(*args)
