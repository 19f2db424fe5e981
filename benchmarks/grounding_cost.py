"""What token grounding costs a training step: the Imagen-style decoder's loss and backward with
`grounding_loss` on and off, in one process, alternating, on the same shapes batches.

The config is configs/tiny/decoder-imagen.yaml (which trains with grounding) unless --config says otherwise;
"off" is the same decoder with `grounding_loss` 0, "explicit" the grounded one recording its attention
shares from the explicit softmax everywhere (`cascade.nn.attention`'s path before the fused CPU kernel took
the blocks of 256 positions and more). The batches are shapes scenes drawn by the renderer, so no
data set is needed; they repeat, as a training set's scenes do from the second epoch on. Prints one JSON line:
the median milliseconds per step of each, the ratio on/off, and the median over steps of each explicit step's
time over the fused step's on the same batch just before or after it (`explicit_over_fused`).

    python -m benchmarks.grounding_cost [--runs 7] [--batches 8] [--batch-size 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import emit
from cascade.errors import UserError, run_cli
from cascade.process_defaults import set_process_defaults

ROOT = Path(__file__).resolve().parents[1]


def shapes_batches(count: int, batch_size: int, size: int, seed: int = 0) -> list[dict]:
    """`count` training batches of shapes scenes: the image at `size`, the caption and the scene json."""
    import torch

    from cascade.data.reader import image_to_tensor
    from cascade.data.shapes import render, scene_for

    batches = []
    for n in range(count):
        pairs = [scene_for(seed, n * batch_size + i) for i in range(batch_size)]
        batches.append({f"image_{size}": torch.stack([image_to_tensor(render(s, size)) for _, s in pairs]),
                        "txt": [c for c, _ in pairs], "json": [s for _, s in pairs]})
    return batches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grounding_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/tiny/decoder-imagen.yaml"),
                   help="an Imagen-style decoder config with grounding_loss set (default: the tiny one)")
    p.add_argument("--runs", type=int, default=7, help="timed passes over the batches, each way (default: 7)")
    p.add_argument("--batches", type=int, default=8, help="distinct batches per pass (default: 8)")
    p.add_argument("--batch-size", type=int, default=16, help="the config's training batch (default: 16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2, a training run's)")
    args = p.parse_args(argv)

    def run() -> int:
        import torch

        import cascade.nn.attention as attention
        from cascade.registry import get_stage
        from cascade.training.config import load_run_config

        for name in ("runs", "batches", "batch_size", "threads"):
            if getattr(args, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1")
        set_process_defaults()
        torch.set_num_threads(args.threads)
        model = load_run_config(args.config, "decoder").model
        if model.conditioning != "imagen" or not model.grounding_loss:
            raise UserError(f"--config {args.config}: not an Imagen-style decoder with grounding_loss set")
        torch.manual_seed(0)
        stages = {"on": get_stage("decoder")(model),
                  "off": get_stage("decoder")(model.model_copy(update={"grounding_loss": 0.0,
                                                                      "grounding_places": False}))}
        stages["off"].load_state_dict(stages["on"].state_dict())
        batches = shapes_batches(args.batches, args.batch_size, model.image_size)

        fused_from = attention._FUSED_SHARES_FROM
        ways = {"on": (stages["on"], fused_from), "off": (stages["off"], fused_from),
                "explicit": (stages["on"], 2**62)}  # no block that large: every one records explicitly

        def one_step(name: str, batch: dict) -> float:
            stage, attention._FUSED_SHARES_FROM = ways[name]
            started = time.perf_counter()
            stage.loss(batch).backward()
            elapsed = time.perf_counter() - started
            stage.zero_grad(set_to_none=True)
            return elapsed

        try:
            for stage in stages.values():  # warm-up: the text encoder's cache, the masks' cache, allocations
                stage.train()
            for name in ways:
                for batch in batches:
                    one_step(name, batch)
            times: dict[str, list[float]] = {name: [] for name in ways}
            for i in range(args.runs):  # each batch every way in turn, so a slow minute falls on all three
                for batch in batches:
                    for name in (("on", "explicit", "off") if i % 2 else ("explicit", "on", "off")):
                        times[name].append(one_step(name, batch))
        finally:
            attention._FUSED_SHARES_FROM = fused_from
        ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
        emit({"bench": "grounding_cost", "config": Path(args.config).name, "threads": args.threads,
              "batch_size": args.batch_size, "steps_each": len(times["on"]),
              "ms_per_step_off": round(ms["off"], 1), "ms_per_step_on": round(ms["on"], 1),
              "ratio": round(ms["on"] / ms["off"], 3), "ms_per_step_explicit": round(ms["explicit"], 1),
              "explicit_over_fused": round(statistics.median(
                  e / f for e, f in zip(times["explicit"], times["on"])), 3)})
        return 0

    return run_cli("grounding_cost", run)


if __name__ == "__main__":
    raise SystemExit(main())
