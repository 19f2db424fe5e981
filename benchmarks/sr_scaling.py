"""How the sr1024 network's cost grows with image size: one sampling step (= one forward) at 256^2 and
at 1024^2, whole-image, in blended tiles (256 px and twice as large) and row-streamed
(`superres.streaming`, bands of --stream-rows), with peak memory; issue #21's targets are a 1024/256
time ratio <= 16 for 16x the pixels and <= 200 MB at 1024^2. The 256^2 step every ratio divides by is
one whole-image pass, the fastest way to run it. Also streamed at 512^2: streaming's own growth to 1024^2.
Also the full 1024x1024 forward time of the tiny net and of the DALL-E 2-shaped sr1024 net (the latter
timed at 128^2 and scaled by its pixels, since one full forward of a 284M-parameter net at 1024^2 takes
tens of minutes here), and the max |tiled - untiled| difference of the tiny net with random weights at
the configured margin, and of the streamed forward (float rounding only).

All timings are medians over interleaved repeats in one process, so load from other processes
affects every setting alike. Peak memory is measured in a fresh child process per setting: its
resident-set growth during one step (sampled every 2 ms) over what it held after building the net.
Prints one JSON line.

--keep-freed-memory raises glibc's mmap and trim thresholds to 1 GiB (mallopt) in this process and the
children: freed feature maps then stay in the heap for the next allocation, instead of going back to
the kernel and being faulted in again page by page. That is most of what makes the whole-image step
slow per pixel (docs/results.md, 2026-12-05). The default leaves the allocator as every command has it.

    python -m benchmarks.sr_scaling [--runs 5] [--threads 1] [--stream-rows 64] [--skip-dalle2] [--keep-freed-memory]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import interleaved_times
from cascade.process_defaults import set_process_defaults
from cascade.registry import get_stage
from cascade.training.config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(limit: int = 1 << 30) -> None:
    """Freed blocks of up to `limit` bytes stay in this process's heap (glibc only)."""
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_THRESHOLD, limit) and libc.mallopt(M_TRIM_THRESHOLD, limit)):
        raise SystemExit("--keep-freed-memory: this C library's mallopt refused the thresholds (glibc only)")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss_growth_mb(fn: Callable[[], Any]) -> float:
    """Largest resident-set growth (MiB) while `fn()` runs, polled from a background thread."""
    start, peak, done = _rss(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], _rss()) - start) / 2**20


def interleaved_medians(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median seconds per function, calling them in turn `runs` times after one warm-up each."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, runs).items()}


def build(path: str, **overrides):
    rc = load_run_config(ROOT / path)
    cls = get_stage(rc.stage)
    config = rc.model.model_copy(update=overrides)
    return cls(config).eval()


def randomise(module: torch.nn.Module, std: float = 0.02) -> None:
    """Fill the zero-initialised output layers too, so outputs (and tiling errors) are not trivially 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def step_fn(stage, size: int) -> Callable[[], torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    x = torch.randn(1, 3, size, size, generator=g)
    low = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    t, s = torch.tensor([500]), torch.tensor([0.2])

    def run():
        with torch.no_grad():
            return stage(x, low, t, s)
    return run


def _child_peak(config: str, overrides: dict, size: int, threads: int, keep: bool, queue) -> None:
    torch.set_num_threads(threads)
    if keep:
        keep_freed_memory()
    run = step_fn(build(config, **overrides), size)
    queue.put(peak_rss_growth_mb(run))


def peak_memory_mb(config: str, overrides: dict, size: int, threads: int, keep: bool = False) -> float:
    """Peak resident growth of one step in a fresh process, the config's model section updated by `overrides`."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak, args=(config, overrides, size, threads, keep, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    set_process_defaults()  # --threads below replaces its thread count
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", default="configs/tiny/sr1024.yaml")
    parser.add_argument("--stream-rows", type=int, default=None,
                        help="band height of the streamed settings (default: the config's stream_rows, else 32)")
    parser.add_argument("--skip-dalle2", action="store_true")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="raise glibc's mmap and trim thresholds to 1 GiB (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.keep_freed_memory:
        keep_freed_memory()

    cfg = build(args.config).config
    tile = cfg.tile_size or 256
    args.stream_rows = args.stream_rows or cfg.stream_rows or 32
    settings = {"256": (256, {"tile_size": None, "stream_rows": None}),
                "1024_tiled": (1024, {"tile_size": tile, "stream_rows": None}),
                "1024_tiled_big": (1024, {"tile_size": 2 * tile, "stream_rows": None}),
                "1024_untiled": (1024, {"tile_size": None, "stream_rows": None}),
                "1024_streamed": (1024, {"tile_size": tile, "stream_rows": args.stream_rows}),
                "512_streamed": (512, {"tile_size": tile, "stream_rows": args.stream_rows})}
    stages = {name: build(args.config, **over) for name, (_, over) in settings.items()}
    randomise(stages["256"])
    for stage in stages.values():
        stage.load_state_dict(stages["256"].state_dict())
    fns = {name: step_fn(stages[name], size) for name, (size, _) in settings.items()}
    times = interleaved_times(fns, args.runs)
    med = {k: statistics.median(v) for k, v in times.items()}
    keep = args.keep_freed_memory
    mem = {name: peak_memory_mb(args.config, over, size, args.threads, keep)
           for name, (size, over) in settings.items() if name != "512_streamed"}
    whole = fns["1024_untiled"]()
    diff = (fns["1024_tiled"]() - whole).abs()
    stream_diff = (fns["1024_streamed"]() - whole).abs()
    record: dict[str, Any] = {
        "benchmark": "sr_scaling",
        "config": args.config,
        "threads": args.threads,
        "runs": args.runs,
        "keep_freed_memory": keep,
        "params": sum(p.numel() for p in stages["256"].parameters()),
        "configured": {"tile_size": cfg.tile_size, "stream_rows": cfg.stream_rows},
        "tile_size": tile,
        "tile_margin": cfg.tile_margin,
        "big_tile_size": 2 * tile,
        "stream_rows": args.stream_rows,
        "s_per_step_256": round(med["256"], 4),
        "s_per_step_1024_tiled": round(med["1024_tiled"], 4),
        "s_per_step_1024_tiled_big": round(med["1024_tiled_big"], 4),
        "s_per_step_1024_untiled": round(med["1024_untiled"], 4),
        "s_per_step_1024_streamed": round(med["1024_streamed"], 4),
        "ratio_tiled": round(med["1024_tiled"] / med["256"], 2),
        "ratio_tiled_big": round(med["1024_tiled_big"] / med["256"], 2),
        "ratio_untiled": round(med["1024_untiled"] / med["256"], 2),
        "ratio_streamed": round(med["1024_streamed"] / med["256"], 2),
        # the same ratio taken within each round and then the median: a 256^2 step that was slow in a few
        # rounds (this machine's speed drifts within minutes) moves it less
        "ratio_streamed_per_round": round(statistics.median(
            [a / b for a, b in zip(times["1024_streamed"], times["256"])]), 2),
        # streaming's own growth: the same method at 512^2 and at 1024^2 (4x the pixels; <= 4 is linear or
        # better). The ratios above divide by a *whole* 256^2 pass, so they measure streaming's per-pixel
        # premium over a whole pass as much as growth (docs/results.md, 2026-12-07)
        "s_per_step_512_streamed": round(med["512_streamed"], 4),
        "growth_streamed_512_to_1024_per_round": round(statistics.median(
            [a / b for a, b in zip(times["1024_streamed"], times["512_streamed"])]), 2),
        "s_per_step_256_min_max": [round(min(times["256"]), 4), round(max(times["256"]), 4)],
        "target_ratio": 16.0,
        "target_peak_mem_mb": 200.0,
        "peak_mem_mb_256": round(mem["256"], 1),
        "peak_mem_mb_1024_tiled": round(mem["1024_tiled"], 1),
        "peak_mem_mb_1024_tiled_big": round(mem["1024_tiled_big"], 1),
        "peak_mem_mb_1024_untiled": round(mem["1024_untiled"], 1),
        "peak_mem_mb_1024_streamed": round(mem["1024_streamed"], 1),
        "tiled_vs_untiled_max_abs": float(diff.max()),
        "tiled_vs_untiled_mean_abs": float(diff.mean()),
        "streamed_vs_untiled_max_abs": float(stream_diff.max()),
        "output_std": float(whole.std()),
    }
    if not args.skip_dalle2:
        big = build("configs/dalle2/sr1024.yaml")
        t128 = interleaved_medians({"128": step_fn(big, 128)}, max(1, args.runs // 2))["128"]
        record["dalle2_params"] = sum(p.numel() for p in big.parameters())
        record["dalle2_s_per_step_128"] = round(t128, 3)
        record["dalle2_s_per_step_1024_estimated"] = round(t128 * 64, 1)  # x64 pixels, at 128^2 per-pixel cost
    print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    main()
