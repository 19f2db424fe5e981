"""Timing helpers shared by the benchmark scripts: medians of repeated runs, interleaved runs, FLOP counts and an
in-process matmul peak probe, so that every speed is reported beside what this machine can do now;
and the `--model [NAME=]BUNDLE` parsing of the scripts that compare bundles."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from cascade.errors import UserError


def median_seconds(fn: Callable[[], Any], runs: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `runs` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: dict[Any, Callable[[], Any]], runs: int) -> dict[Any, list[float]]:
    """Seconds of each call, calling the functions in turn `runs` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention that `fn()` runs (torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_gflops(n: int = 1024, runs: int = 7) -> float:
    """Achieved GFLOP/s of an (n x n) @ (n x n) fp32 matmul: the practical peak on this CPU right now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, runs=runs, warmup=2) / 1e9


def emit(record: dict[str, Any]) -> None:
    """Print the benchmark's one JSON line."""
    print(json.dumps(record, sort_keys=True))


def parse_models(specs: list[str]) -> dict[str, Path]:
    """["name=BUNDLE" or "BUNDLE", ...] -> {name: bundle}; a bare bundle is named by its folder."""
    models: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not (Path(path) / "cascade.json").is_file():
            raise UserError(f"--model {spec}: {path} is not a model bundle (no cascade.json)")
        if name in models:
            raise UserError(f"--model {spec}: the name '{name}' is given twice")
        models[name] = Path(path)
    return models


def parse_times(text: str, timesteps: int, option: str) -> list[int]:
    """"100,500,900" -> [100, 500, 900], each a timestep in [0, timesteps); one-line errors naming `option`."""
    try:
        times = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{option} {text}: give whole timesteps separated by commas, e.g. 100,500,900") from None
    bad = [t for t in times if not 0 <= t < timesteps]
    if bad:
        raise UserError(f"{option} {text}: timesteps must be in [0, {timesteps}), got {bad[0]}")
    return times
