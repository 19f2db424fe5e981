"""What a run reports: a tqdm bar (loss, it/s, ETA), `metrics.jsonl`, and TensorBoard scalars.

Only rank 0 reports; the other ranks get a `RunLog` that does nothing. `metrics.jsonl` gets one
JSON object per logged step (`step`, `loss`, `lr`, `samples_per_s`, and eval metrics when they
run), appended and flushed line by line so a killed run keeps what it logged. On resume, lines of
steps after the checkpoint are dropped first, so every step appears once.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cascade.atomic_files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop the records of steps after `after_step` (logged by a run that died before checkpointing)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    write_text_atomic(path, "".join(k + "\n" for k in kept))


class RunLog:
    def __init__(self, run_dir: Path, *, active: bool, start_step: int, max_steps: int, desc: str):
        self.active = active
        if not active:
            return
        self.bar = tqdm(total=max_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True)
        self.file = open(run_dir / METRICS_FILE, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:
            self.write_line("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write_line(self, text: str) -> None:
        if self.active:
            tqdm.write(text)

    def advance(self) -> None:
        """One optimizer step done (the bar shows the loss of the last logged window, see `record`: reading
        the loss every step would wait for the device every step)."""
        if self.active:
            self.bar.update(1)

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """One line of metrics.jsonl (and TensorBoard scalars) for `step`."""
        if not self.active:
            return
        if "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        # JSON has no NaN or infinity; a diverged loss is written as the string "nan".
        clean = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.file.close()
            if self.tb is not None:
                self.tb.close()
