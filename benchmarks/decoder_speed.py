"""Decoder speed on this CPU: training samples/s and sampling s/image, with achieved GFLOP/s.

Three U-Nets at 64x64, fp32, batch 16 for training, run in the same process so that the ratios hold
on a noisy machine: the tiny config (configs/tiny/decoder.yaml); "ours_20m", the baseline's levels and
blocks behind our 2x2 space-to-depth stem (~24M parameters); and "baseline_adm", the usual ADM layout
the peers' ~20M U-Nets follow (64 channels at the full 64x64 resolution, 2 ResBlocks per level, mults
1-2-3-4). Sampling is DDIM with guidance 3. Prints one JSON line.

    python -m benchmarks.decoder_speed [--runs 3] [--steps 50] [--skip-baseline] [--threads 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import count_flops, emit, matmul_peak_gflops, median_seconds
from cascade.process_defaults import set_process_defaults
from decoder import Decoder, DecoderConfig

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_20M = dict(channels=64, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_resolutions=[16, 8],
                  head_dim=32, patch_size=2)
BASELINE = dict(channels=64, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_resolutions=[16, 8],
                head_dim=64, patch_size=1)


def batch_for(config: DecoderConfig, b: int, generator: torch.Generator) -> dict:
    s = config.image_size
    return {f"image_{s}": torch.rand(b, 3, s, s, generator=generator) * 2 - 1,
            "clip_image": F.normalize(torch.randn(b, config.clip_dim, generator=generator), dim=-1),
            "clip_tokens": torch.randn(b, 32, config.text_dim, generator=generator),
            "clip_mask": torch.arange(32)[None].expand(b, 32) < 12}


def measure(config: DecoderConfig, *, batch_size: int, runs: int, steps: int, sample_batch: int) -> dict:
    torch.manual_seed(0)
    stage = Decoder(config)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-4)
    batch = batch_for(config, batch_size, torch.Generator().manual_seed(0))

    def train_step():
        loss = stage.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    flops = count_flops(lambda: stage.loss(batch).backward())
    step_s = median_seconds(train_step, runs=runs)
    stage.eval()
    cond = {k: v[:sample_batch] for k, v in batch.items() if k.startswith("clip")}
    sample_s = median_seconds(lambda: stage.sample(cond, sampler="ddim", steps=steps, guidance=3.0,
                                                   generator=torch.Generator().manual_seed(0)),
                              runs=max(1, runs // 2), warmup=0)
    return {"params_m": round(sum(p.numel() for p in stage.parameters()) / 1e6, 2),
            "train_samples_per_s": round(batch_size / step_s, 3),
            "train_step_s": round(step_s, 3),
            "train_gflop_per_step": round(flops / 1e9, 1),
            "train_gflops": round(flops / step_s / 1e9, 1),
            "sample_s_per_image": round(sample_s / sample_batch, 3)}


def main() -> None:
    set_process_defaults()  # --threads below replaces its thread count
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed training steps per model (median)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per sample (guidance 3)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 is faster when other jobs oversubscribe the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = DecoderConfig(**yaml.safe_load((ROOT / "configs/tiny/decoder.yaml").read_text())["model"])
    models = {"tiny": tiny, "ours_20m": tiny.model_copy(update=LAYOUT_20M)}
    if not args.skip_baseline:
        models["baseline_adm"] = tiny.model_copy(update=BASELINE)
    kwargs = dict(batch_size=args.batch_size, runs=args.runs, steps=args.steps, sample_batch=args.sample_batch)
    peak_before = matmul_peak_gflops()
    results = {name: measure(DecoderConfig(**cfg.model_dump()), **kwargs) for name, cfg in models.items()}
    peak = max(peak_before, matmul_peak_gflops())
    for r in results.values():
        r["fraction_of_matmul_peak"] = round(r["train_gflops"] / peak, 3)
    record = {"benchmark": "decoder_speed", "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "sample_steps": args.steps, "sample_guidance": 3.0, "matmul_peak_gflops": round(peak, 1), **results}
    if "baseline_adm" in results:
        base = results["baseline_adm"]["train_samples_per_s"]
        record["train_speedup_vs_baseline"] = {k: round(r["train_samples_per_s"] / base, 2)
                                               for k, r in results.items() if k != "baseline_adm"}
    emit(record)


if __name__ == "__main__":
    main()
