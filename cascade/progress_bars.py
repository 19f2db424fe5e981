"""Progress bars counted in images that move at every sampling step, for the evaluation loops that
sample many images in batches (a batch of 16 decodes takes tens of seconds on a CPU; a bar that moved
only between batches would look stuck)."""
from __future__ import annotations

from typing import Callable

from tqdm.auto import tqdm

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} images [{elapsed}<{remaining}]"


class ImageBar:
    """`with ImageBar(total, "decoding") as bar: stage.sample(..., callback=bar.steps(rows, steps))`;
    each of a batch's `steps` sampling steps advances the bar by rows / steps images. `disable` (or a
    total of 0) draws nothing."""

    def __init__(self, total: int, desc: str, *, disable: bool = False):
        self.bar = tqdm(total=total, desc=desc, bar_format=_FORMAT, disable=disable or total == 0,
                        dynamic_ncols=True)
        self._batch_end = 0.0  # where the current batch ends on the bar

    def steps(self, rows: int, steps: int) -> Callable[[dict], None]:
        """The per-step callback for one batch of `rows` images sampled in `steps` steps; `done(rows)`
        after the batch squares the count whatever the sampler called back."""
        per_step = rows / max(1, steps)
        self._batch_end = self.bar.n + rows

        def step(_: dict) -> None:
            # the count is set (a disabled tqdm counts nothing itself), never past the batch's end (float
            # shares can sum a hair past it, and tqdm warned "clamping frac"), then drawn by update(0)
            self.bar.n = min(self.bar.n + per_step, self._batch_end)
            self.bar.update(0)

        return step

    def done(self) -> None:
        """The batch finished: count whatever its callbacks did not (a sampler may call back fewer times),
        whole images again."""
        self.bar.n = self._batch_end
        self.bar.refresh()

    @property
    def count(self) -> float:
        return self.bar.n

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ImageBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
