"""Train one stage of the cascade with DeepSpeed.

    deepspeed [--num_gpus N] train_stage.py --stage NAME --config configs/tiny/NAME.yaml \\
        --data DIR --run-dir RUN [--max-steps N] [--deepspeed_config configs/deepspeed/zero2.json] \\
        [--export BUNDLE] [--init-from BUNDLE/NAME]

or the same with `python train_stage.py ...` in one process. Running it again with the same
--run-dir resumes from the latest checkpoint. Mistakes in the input exit with code 2 and one line.

    python train_stage.py --stage NAME --config CONFIG --dry-run [--gpus N] [--deepspeed_config JSON] [--json]

prints the parameter count and the estimated memory per GPU for ZeRO 0, 2 and 3 with and without CPU
offload (`cascade.memory_estimate`), without allocating the model or starting DeepSpeed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cascade.errors import ArgumentParser, run_cli
from cascade.process_defaults import set_process_defaults
from cascade.registry import stage_names


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="train_stage.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, help=f"stage to train: {', '.join(stage_names())}")
    p.add_argument("--config", required=True, type=Path, help="stage YAML with keys stage, model, train")
    p.add_argument("--data", type=Path,
                   help="shard directory with train/*.tar (and val/*.tar for evaluation); required unless --dry-run")
    p.add_argument("--run-dir", type=Path,
                   help="where checkpoints, metrics.jsonl, TensorBoard logs and sample grids go; required "
                        "unless --dry-run")
    p.add_argument("--max-steps", type=int, help="override train.max_steps")
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="a time budget: after M minutes of this invocation, finish the current step, save a "
                        "checkpoint and end as if max_steps were reached (end-of-run eval, --export). The "
                        "learning rate still follows max_steps: set it near the steps M minutes reach")
    p.add_argument("--deepspeed_config", "--deepspeed-config", type=Path,
                   help="DeepSpeed JSON (ZeRO stage, precision); default: ZeRO stage 0, fp32")
    p.add_argument("--export", type=Path, metavar="BUNDLE",
                   help="after training, write the EMA weights to BUNDLE/<stage>/ and list the stage "
                        "in BUNDLE/cascade.json; refused when the run is already trained past max_steps "
                        "(the weights would be the longer run's)")
    p.add_argument("--init-from", type=Path, metavar="STAGE_DIR",
                   help="start a new run from the weights of a bundle's stage folder (fine-tuning), e.g. "
                        "--init-from bundles/tiny/decoder with model.inpaint: true to make an inpainting "
                        "decoder (its new input channels start at zero); ignored when the run resumes")
    p.add_argument("--preview-bundle", type=Path, metavar="BUNDLE",
                   help="while training, every --preview-minutes write images of the preview prompts through "
                        "BUNDLE's prior, this stage's current EMA weights and BUNDLE's sr256 (256x256) into "
                        "--preview-out; BUNDLE must hold the clip, prior and sr256 stages")
    p.add_argument("--preview-minutes", type=float, default=10.0, metavar="M",
                   help="with --preview-bundle: minutes between previews, and one at the end (default: %(default)s)")
    p.add_argument("--preview-prompt", action="append", default=[], metavar="TEXT",
                   help="with --preview-bundle: a prompt to preview (repeatable; default: the demo's three)")
    p.add_argument("--preview-out", type=Path, metavar="DIR",
                   help="with --preview-bundle: where step-NNNNNN.png and previews.jsonl go "
                        "(default: RUN_DIR/progress)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the parameter count and the estimated memory per GPU (ZeRO 0/2/3, with and without "
                        "CPU offload, at train.batch_size per GPU) and exit; allocates no model, starts no DeepSpeed")
    p.add_argument("--gpus", type=int, default=1, help="with --dry-run: GPUs to estimate for (default: %(default)s)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="with --dry-run: memory per GPU for the max-batch column (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON line instead of the table")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _train(args: argparse.Namespace) -> int:
    from cascade.training.engine import TrainArgs, train

    result = train(TrainArgs(stage=args.stage, config=args.config, data=args.data, run_dir=args.run_dir,
                             max_steps=args.max_steps, max_minutes=args.max_minutes, deepspeed_config=args.deepspeed_config, export=args.export,
                             preview_bundle=args.preview_bundle, preview_minutes=args.preview_minutes,
                             preview_prompts=tuple(args.preview_prompt), preview_out=args.preview_out,
                             init_from=args.init_from))
    return 130 if result.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run:
        from cascade.memory_estimate import train_dry_run

        return run_cli("train_stage.py", lambda: train_dry_run(args))
    missing = [option for option, value in (("--data", args.data), ("--run-dir", args.run_dir)) if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    # a second Ctrl-C stops without the checkpoint the first one asked for: "aborted", not "interrupted"
    return run_cli("train_stage.py", lambda: _train(args), interrupted="aborted")


if __name__ == "__main__":
    from cascade.training.distributed import exit_process

    exit_process(main())
