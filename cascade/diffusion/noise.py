"""Gaussian noise drawn from a caller's generator, wherever the sample lives."""
from __future__ import annotations

import torch


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn on the generator's own device so that a
    CPU generator seeds CUDA samples too (the same seed then gives the same noise on every device)."""
    draw_on = generator.device if generator is not None else (device or "cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=dtype)
    return noise.to(device) if device is not None else noise
