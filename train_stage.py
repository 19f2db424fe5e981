"""Train one stage of the cascade with DeepSpeed.

    deepspeed [--num_gpus N] train_stage.py --stage NAME --config configs/tiny/NAME.yaml \\
        --data DIR --run-dir RUN [--max-steps N] [--deepspeed_config configs/deepspeed/zero2.json] \\
        [--export BUNDLE]

or the same with `python train_stage.py ...` in one process. Running it again with the same
--run-dir resumes from the latest checkpoint. Mistakes in the input exit with code 2 and one line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cascade.errors import run_cli
from cascade.process_defaults import set_process_defaults
from cascade.registry import stage_names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_stage.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, help=f"stage to train: {', '.join(stage_names())}")
    p.add_argument("--config", required=True, type=Path, help="stage YAML with keys stage, model, train")
    p.add_argument("--data", required=True, type=Path,
                   help="shard directory with train/*.tar (and val/*.tar for evaluation)")
    p.add_argument("--run-dir", required=True, type=Path,
                   help="where checkpoints, metrics.jsonl, TensorBoard logs and sample grids go")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--deepspeed_config", "--deepspeed-config", type=Path,
                   help="DeepSpeed JSON (ZeRO stage, precision); default: ZeRO stage 0, fp32")
    p.add_argument("--export", type=Path, metavar="BUNDLE",
                   help="after training, write the EMA weights to BUNDLE/<stage>/ and list the stage "
                        "in BUNDLE/cascade.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _train(args: argparse.Namespace) -> int:
    from cascade.training.engine import TrainArgs, train

    result = train(TrainArgs(stage=args.stage, config=args.config, data=args.data, run_dir=args.run_dir,
                             max_steps=args.max_steps, deepspeed_config=args.deepspeed_config, export=args.export))
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    args = build_parser().parse_args(argv)
    # a second Ctrl-C stops without the checkpoint the first one asked for: "aborted", not "interrupted"
    return run_cli("train_stage.py", lambda: _train(args), interrupted="aborted")


if __name__ == "__main__":
    from cascade.training.distributed import exit_process

    exit_process(main())
