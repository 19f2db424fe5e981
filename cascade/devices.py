"""Where a command runs its networks and in what precision: `--device auto|cpu|cuda|cuda:N` and
`--dtype auto|float32|bfloat16|float16`, with one-line errors for what this machine cannot do.

auto: the first CUDA GPU when there is one, else the CPU; bf16 on a GPU that supports it, else fp32
(bf16 runs, but many times slower, on a CPU, and fp16 has no CPU kernels for most layers). Noise is
drawn on the CPU from the run's generators and moved to the device (`cascade.diffusion.noise.randn`),
so a seed gives the same x_T on every device.
"""
from __future__ import annotations

import torch

from cascade.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for `name`; a UserError naming what is missing otherwise."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"--device '{name}': use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: this machine has no CUDA GPU (torch {torch.__version__} sees none); "
                        f"use --device cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", int(index or 0))


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype for `name` on `device` (see the module docstring for auto)."""
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype '{name}': use auto, {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise UserError("--dtype float16 needs a GPU; on the CPU use float32 (or bfloat16, which is slower here)")
    return DTYPES[name]
