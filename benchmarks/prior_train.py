"""Train the tiny prior with the real engine and report its time, speed and eval beside the baselines.

    python -m benchmarks.prior_train [--data DIR] [--steps N] [--config configs/tiny/prior.yaml] [--in-process]

Without --data it writes the synthetic embedded shards of `prior.synthetic` at the config's sizes
(8000 train, 1000 val) into a temp dir. Prints one JSON line: the engine run's wall time and steps,
the last eval (prior / text-embedding / nearest-train-caption cosine, mean rank, R@1), and in-process
medians of a training step and of sampling 256 embeddings, with the FLOP rate against a matmul probe.
`--in-process` trains with a plain AdamW loop at the config's settings (linear warmup, no EMA, no
DeepSpeed) instead, to separate the model's cost from the engine's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import count_flops, emit, matmul_peak_gflops, median_seconds
from cascade.config import parse_config, read_yaml
from cascade.process_defaults import set_process_defaults
from prior import PriorConfig, PriorStage
from prior.synthetic import make_pairs, write_shards

ROOT = Path(__file__).resolve().parents[1]


def step_speed(cfg: PriorConfig, batch_size: int) -> dict[str, float]:
    """Median seconds of one AdamW training step and of one 256-caption sampling call."""
    torch.manual_seed(0)
    stage = PriorStage(cfg)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    pairs = make_pairs(max(batch_size, 256), embed_dim=cfg.embed_dim, token_dim=cfg.token_dim,
                       max_text_len=cfg.max_text_len)
    batch = {k: pairs[k][:batch_size] for k in ("clip_image", "clip_text", "clip_tokens", "clip_mask")}

    def train_step():
        loss = stage.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step_s = median_seconds(train_step, runs=7, warmup=2)
    flops = count_flops(train_step)
    cond = {k: pairs[k][:256] for k in ("clip_text", "clip_tokens", "clip_mask")}
    stage.eval()
    sample_s = median_seconds(lambda: stage.sample(cond, generator=torch.Generator().manual_seed(0)), runs=3)
    peak = matmul_peak_gflops()
    return {"train_step_s": step_s, "train_samples_per_s": batch_size / step_s,
            "train_gflops_per_s": flops / step_s / 1e9, "matmul_peak_gflops": peak,
            "peak_fraction": flops / step_s / 1e9 / peak,
            f"sample_256_s_{cfg.sampler}_{cfg.steps}steps_g{cfg.guidance:g}_x{cfg.candidates}": sample_s}


def train_in_process(cfg: PriorConfig, train: dict, data: str, steps: int) -> dict[str, float]:
    """Plain AdamW loop over the shard reader; returns the evaluation of the final weights."""
    from cascade.data.reader import make_loader, make_val_batches

    torch.manual_seed(int(train.get("seed", 0)))
    stage = PriorStage(cfg).train()
    opt = torch.optim.AdamW(stage.parameters(), lr=float(train["lr"]), betas=tuple(train.get("betas", (0.9, 0.999))),
                            weight_decay=float(train.get("weight_decay", 0.0)))
    warmup = max(1, int(train.get("warmup_steps", 0)))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    loader = make_loader(data, "train", image_sizes=(), with_embeddings=True, batch_size=int(train["batch_size"]))
    for step, batch in zip(range(steps), loader):
        loss = stage.loss(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), float(train.get("grad_clip", 1.0)))
        opt.step()
        schedule.step()
    stage.eval()
    val, train_pass = (make_val_batches(data, image_sizes=(), with_embeddings=True, batch_size=256, split=split)
                       for split in ("val", "train"))
    return {f"eval/{k}": v for k, v in stage.evaluate(val, torch.Generator().manual_seed(0), train_pass).items()}


def main() -> None:
    set_process_defaults()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny" / "prior.yaml"))
    parser.add_argument("--data", help="embedded shard dir (default: synthetic shards)")
    parser.add_argument("--steps", type=int, help="override train.max_steps")
    parser.add_argument("--run-dir", help="keep the run here (default: a temp dir)")
    parser.add_argument("--in-process", action="store_true", help="plain AdamW loop instead of the engine")
    args = parser.parse_args()
    raw = read_yaml(args.config)
    cfg = parse_config(PriorConfig, raw["model"], args.config)
    record: dict = {"benchmark": "prior_train", "config": str(args.config), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "data")
            write_shards(data, 8000, 1000, embed_dim=cfg.embed_dim, token_dim=cfg.token_dim,
                         max_text_len=cfg.max_text_len)
            record["data"] = "prior.synthetic (8000 train, 1000 val)"
        else:
            record["data"] = data
        steps = args.steps or int(raw["train"]["max_steps"])
        record["mode"] = "in-process" if args.in_process else "engine"
        if args.in_process:
            start = time.perf_counter()
            record.update(train_in_process(cfg, raw["train"], data, steps))
            record["wall_s"] = time.perf_counter() - start
            record["steps"] = steps
        else:
            record.update(run_engine(args, data, tmp))
    record.update(step_speed(cfg, int(raw["train"]["batch_size"])))
    emit(record)


def run_engine(args, data: str, tmp: str) -> dict:
    """`train_stage.py` in a subprocess; its wall time, steps and last eval from metrics.jsonl."""
    run_dir = args.run_dir or str(Path(tmp) / "run")
    cmd = [sys.executable, str(ROOT / "train_stage.py"), "--stage", "prior", "--config", args.config,
           "--data", data, "--run-dir", run_dir]
    if args.steps:
        cmd += ["--max-steps", str(args.steps)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    record = {"wall_s": time.perf_counter() - start}
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    record["steps"] = max(line["step"] for line in lines)
    evals = [line for line in lines if any(k.startswith("eval/") for k in line)]
    if evals:
        record.update({k: v for k, v in evals[-1].items() if k.startswith("eval/")})
    return record


if __name__ == "__main__":
    main()
