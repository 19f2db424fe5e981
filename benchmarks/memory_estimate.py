"""The --dry-run memory estimate against what a real run holds, on this CPU. Prints one JSON line.

A scaled-down decoder (configs/tiny/decoder.yaml with --channels and --batch-size; fp32, since DeepSpeed's
bf16 is "auto" = off on a CPU) is estimated by `cascade.memory_estimate` and then measured three ways:

- direct: fp32 training steps in this process (torch's AdamW and an fp32 EMA copy, what the engine does
  with ZeRO-0 in fp32) under torch's memory profiler, which records every allocation of torch's CPU
  allocator: its peak of live bytes against the estimate's ZeRO-0 fp32 total, and that peak less the
  weights, Adam's state and the EMA against the activations measured on meta;
- engine, ZeRO-0: `train_stage.py --max-steps N` in a child process: its peak RSS during the training
  steps over its RSS before the stage was built, against the same ZeRO-0 fp32 total;
- engine, ZeRO-3 with CPU offload of optimizer and parameters (the dalle2 decoder's set-up for one
  GPU): the same, against that row's GPU + CPU total (one process on a CPU holds both).

What this cannot check: how ZeRO-3 splits the states over several GPUs (one process here; the split is
the closed form the tests check), the CUDA caching allocator's overhead and fragmentation, the CUDA
context, DeepSpeed's GPU-side buckets, and the bf16 byte counts (bf16 runs 30-200x slower here). The
child's peak RSS also counts what the C allocator keeps and the libraries it loads after the baseline.

    python -m benchmarks.memory_estimate [--channels 96] [--batch-size 16] [--steps 3] [--skip-engine]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import emit
from cascade.process_defaults import set_process_defaults
from prior.synthetic import write_scene_shards

ROOT = Path(__file__).resolve().parents[1]
TEXT_LEN = 77  # what the estimate assumes for the decoder's caption tokens (cascade.memory_estimate)
# fp32 (no bf16 section): what runs on a CPU
ZERO0 = {"zero_optimization": {"stage": 0}}
# a reduce bucket smaller than the gradients, so all of it is touched: RSS counts only the pages written
ZERO3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}, "reduce_bucket_size": 4_000_000},
                 "zero_force_ds_cpu_optimizer": False}  # the engine brings torch's AdamW, not DeepSpeedCPUAdam


def write_config(path: Path, *, channels: int, batch_size: int, steps: int) -> Path:
    data = yaml.safe_load((ROOT / "configs/tiny/decoder.yaml").read_text())
    data["model"]["channels"] = channels
    data["train"].update(batch_size=batch_size, max_steps=steps, log_every=1, ckpt_every=0, sample_every=0,
                         eval_every=0, eval_at_end=False, num_workers=0, warmup_steps=1)
    path.write_text(yaml.safe_dump(data))
    return path


def direct(config: Path, steps: int) -> dict:
    """Peak bytes torch's CPU allocator holds over `steps` fp32 training steps (torch's memory profiler),
    and that peak less the weights, Adam's state and the EMA (what activations and gradients took)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    from cascade.memory_estimate import example_batch
    from cascade.registry import get_stage
    from cascade.training.config import load_run_config

    run = load_run_config(config)
    torch.manual_seed(0)
    stage = get_stage("decoder")(run.model).train()
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in stage.parameters()]
    batch = example_batch(stage, run.train.batch_size, "cpu", torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for _ in range(steps):
            loss = stage.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in stage.parameters()], 0.001)
    timeline = MemoryProfileTimeline(prof._memory_profile())
    _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    sizes = np.array(sizes)  # (times, 1 + categories), in the profiler's own column order
    total = sizes.sum(axis=1)
    at = int(total.argmax())
    names = {i + 1: "uncategorised" if c is None else c.name.lower() for c, i in _CATEGORY_TO_INDEX.items()}
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    held = nbytes(stage.parameters()) + nbytes(ema) + nbytes(t for s in optimizer.state.values() for t in s.values()
                                                           if torch.is_tensor(t) and t.dim())
    return {"peak": int(total[at]), "beyond_states": int(total[at] - held),
            "profiler_categories": {names[i]: int(v) for i, v in enumerate(sizes[at]) if v and i in names}}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(argv: list[str]) -> int:
    """train_stage.main(argv), reporting its RSS before the stage is built and its peak RSS over the training
    steps (the kernel's high-water mark, reset once the engine is set up, read at the final checkpoint)."""
    from cascade.training import engine
    from train_stage import main

    build, save = engine.Trainer._build, engine.Trainer._save
    marks: dict[str, int] = {}

    def measured_build(self):
        marks["before_build"] = _status("VmRSS")
        build(self)
        marks["after_build"] = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def measured_save(self):
        marks.setdefault("peak_steps", _status("VmHWM"))
        save(self)

    engine.Trainer._build, engine.Trainer._save = measured_build, measured_save
    code = main(argv)
    print("MARKS " + json.dumps(marks), file=sys.stderr)
    return code


def engine_run(config: Path, data: Path, run_dir: Path, deepspeed_config: Path | None) -> dict:
    args = ["--stage", "decoder", "--config", str(config), "--data", str(data), "--run-dir", str(run_dir)]
    if deepspeed_config is not None:
        args += ["--deepspeed_config", str(deepspeed_config)]
    # Large blocks straight from mmap, so freed tensors leave the RSS (glibc otherwise raises its mmap
    # threshold after the first free and keeps freed blocks in its heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_estimate", "--child", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train_stage.py failed:\n{proc.stderr[-3000:]}")
    marks = json.loads(next(line for line in proc.stderr.splitlines() if line.startswith("MARKS "))[6:])
    return {**marks, "growth": marks["peak_steps"] - marks["before_build"], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    set_process_defaults()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skip-engine", action="store_true", help="only the direct, in-process measurement")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        from cascade.training.distributed import exit_process

        exit_process(child(args.child))

    from cascade.memory_estimate import estimate_training

    record: dict = {"benchmark": "memory_estimate", "channels": args.channels, "batch_size": args.batch_size,
                    "steps": args.steps, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = write_config(tmp / "decoder.yaml", channels=args.channels, batch_size=args.batch_size,
                              steps=args.steps)
        (tmp / "zero0.json").write_text(json.dumps(ZERO0))
        (tmp / "zero3_offload.json").write_text(json.dumps(ZERO3_OFFLOAD))
        zero0 = estimate_training(config, "decoder", deepspeed_config=tmp / "zero0.json")
        zero3 = estimate_training(config, "decoder", deepspeed_config=tmp / "zero3_offload.json")
        row0 = next(r for r in zero0.rows if (r.zero_stage, r.offload) == (0, "none"))
        row3 = next(r for r in zero3.rows if (r.zero_stage, r.offload) == (3, "optimizer+params"))
        record["params"] = zero0.params.total
        record["estimate"] = {"activations": zero0.activations, "zero0_total": row0.gpu,
                              "zero3_offload_total": row3.gpu + row3.cpu}

        measured = direct(config, steps=2)
        # the peak comes at the start of backward, before the gradients exist: beyond the states it is
        # the activations alone, while the estimate's total counts the gradients beside them
        record["direct"] = {**measured, "ratio_total": round(row0.gpu / measured["peak"], 3),
                            "ratio_activations": round(zero0.activations / measured["beyond_states"], 3)}
        if not args.skip_engine:
            data = write_scene_shards(tmp / "data", train=args.batch_size * args.steps,
                                      clip_dim=run_model(config, "clip_dim"), text_dim=run_model(config, "text_dim"),
                                      text_len=TEXT_LEN, visible=12, shard_size=64)
            for name, ds, estimate in (("engine_zero0", tmp / "zero0.json", row0.gpu),
                                       ("engine_zero3_offload", tmp / "zero3_offload.json", row3.gpu + row3.cpu)):
                result = engine_run(config, data, tmp / f"run-{name}", ds)
                record[name] = {**result, "ratio": round(estimate / result["growth"], 3)}
    emit(record)


def run_model(config: Path, key: str):
    return yaml.safe_load(config.read_text())["model"][key]


if __name__ == "__main__":
    main()
