"""The descending step order every sampler walks, with an optional tqdm bar."""
from __future__ import annotations

from typing import Iterator


def descending_steps(num_steps: int, progress: bool = False, desc: str = "sampling") -> Iterator[int]:
    """num_steps - 1, ..., 0; with `progress`, behind a tqdm bar (imported only then, so that
    cascade.diffusion itself needs nothing but torch)."""
    steps = range(num_steps - 1, -1, -1)
    if not progress:
        return iter(steps)
    from tqdm.auto import tqdm

    return iter(tqdm(steps, desc=desc, leave=False))
