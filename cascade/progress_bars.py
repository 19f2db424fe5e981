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
        self._batch_left = 0.0
        self._count = 0.0  # what the bar shows (a disabled tqdm counts nothing)
        self._batch_end = 0.0

    def _add(self, images: float) -> None:
        self._count += images
        # set, then update(0) to draw: float shares added by tqdm itself can land a hair past the batch, and
        # update() draws before anything could clamp it ("clamping frac" warnings at the end of SR evals)
        self.bar.n = min(self.bar.n + images, self._batch_end)
        self.bar.update(0)

    def steps(self, rows: int, steps: int) -> Callable[[dict], None]:
        """The per-step callback for one batch of `rows` images sampled in `steps` steps; `done(rows)`
        after the batch squares the count whatever the sampler called back."""
        per_step = rows / max(1, steps)
        self._batch_left = float(rows)
        self._batch_end = self._count + rows

        def step(_: dict) -> None:
            add = min(per_step, self._batch_left)
            self._batch_left -= add
            self._add(add)

        return step

    def done(self) -> None:
        """The batch finished: count whatever its callbacks did not (a sampler may call back fewer times)."""
        if self._batch_left > 0:
            self._add(self._batch_left)
        self._batch_left = 0.0
        # whole images again: the float steps may have summed to a hair over or under the batch
        self._count = self.bar.n = self._batch_end
        self.bar.refresh()

    @property
    def count(self) -> float:
        return self._count

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ImageBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
