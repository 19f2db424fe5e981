"""The speed levers for sr1024 on this CPU, side by side (#21 part 4): one sampling step (one network
forward) at 1024x1024 for the config as it is and for each lever, timed as medians of interleaved runs in
one process, so load from other processes hits every lever alike. Prints one JSON line: per lever the
median seconds, its ratio to the config's, the parameter count, and the largest difference of its output
from the config's (random weights; the same network for the numerical levers, so ~0 means "the same
model, only faster").

Levers: channels-last memory format; bf16 weights and inputs; torch.compile (inductor; its compile time is
reported apart); blended tiles (128, 256 and 384 px; the config streams rows, `superres.streaming`) and
the whole image in one pass; and a cheaper network per
pixel in the spirit of Imagen's Efficient U-Net (fewer channels at full resolution, more blocks at the low
ones: a different model, so its difference is not comparable and it would need training).

    python -m benchmarks.sr_levers [--runs 5] [--threads 2] [--size 1024] [--levers config,channels_last,...]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import torch

from benchmarks.common import emit
from benchmarks.sr_scaling import build, interleaved_medians, randomise
from cascade.errors import UserError, run_cli
from cascade.process_defaults import set_process_defaults

CONFIG = "configs/tiny/sr1024.yaml"
CHEAP = dict(base_channels=8, channel_mults=[1, 3, 6], num_res_blocks=[1, 2, 3])
LEVERS = ("config", "channels_last", "bf16", "compile", "tile128", "tile256", "tile384", "untiled", "cheap_net")


def _inputs(size: int, dtype=torch.float32, channels_last: bool = False):
    g = torch.Generator().manual_seed(size)
    x = torch.randn(1, 3, size, size, generator=g)
    low = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    if channels_last:
        x, low = (v.contiguous(memory_format=torch.channels_last) for v in (x, low))
    return x.to(dtype), low.to(dtype), torch.tensor([500]), torch.tensor([0.2], dtype=dtype)


def lever(name: str, size: int) -> tuple[Callable[[], torch.Tensor], int, float]:
    """(one step, parameter count, seconds spent preparing it: compile time) for lever `name`."""
    overrides: dict[str, Any] = {}
    if name.startswith("tile"):
        overrides.update(tile_size=int(name[4:]), stream_rows=None)
    elif name == "untiled":
        overrides.update(tile_size=None, stream_rows=None)
    elif name == "cheap_net":
        overrides.update(CHEAP)
    torch.manual_seed(0)  # the same initial weights for every lever of the same network
    stage = build(CONFIG, **overrides)
    randomise(stage)
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    if name == "bf16":
        stage = stage.to(torch.bfloat16)
    if name == "channels_last":
        stage = stage.to(memory_format=torch.channels_last)
    x, low, t, s = _inputs(size, dtype, channels_last=name == "channels_last")
    prepared = 0.0
    if name == "compile":
        stage.net = torch.compile(stage.net, dynamic=False)
        started = time.perf_counter()
        with torch.no_grad():
            stage(x, low, t, s)  # every tile shape compiles here
        prepared = time.perf_counter() - started
    params = sum(p.numel() for p in stage.parameters())

    def run() -> torch.Tensor:
        with torch.no_grad():
            return stage(x, low, t, s).float()
    return run, params, prepared


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.sr_levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the process default)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, from: {', '.join(LEVERS)}")
    args = p.parse_args(argv)

    def run() -> int:
        names = [n for n in args.levers.split(",") if n]
        unknown = [n for n in names if n not in LEVERS]
        if unknown or "config" not in names:
            raise UserError(f"--levers: give 'config' and any of {', '.join(LEVERS[1:])}; unknown: {unknown}")
        if args.runs < 1 or args.size % 64:
            raise UserError("--runs must be >= 1 and --size a multiple of 64")
        if args.threads:
            torch.set_num_threads(args.threads)
        steps, params, prepared = {}, {}, {}
        for name in names:
            steps[name], params[name], prepared[name] = lever(name, args.size)
        reference = steps["config"]()
        medians = interleaved_medians(steps, args.runs)
        out: dict[str, Any] = {"bench": "sr_levers", "size": args.size, "runs": args.runs,
                               "threads": torch.get_num_threads(), "levers": {}}
        for name in names:
            diff = None if name == "cheap_net" else float((steps[name]() - reference).abs().max())
            out["levers"][name] = {"seconds": round(medians[name], 4),
                                   "speedup": round(medians["config"] / medians[name], 3),
                                   "params": params[name], "max_abs_diff": diff,
                                   **({"compile_seconds": round(prepared[name], 1)} if name == "compile" else {})}
        emit(out)
        return 0

    return run_cli("sr_levers", run)


if __name__ == "__main__":
    sys.exit(main())
