"""The main job, end to end on this machine: fetch and build the data, train every tiny stage, export
one model bundle, and generate 1024x1024 images for example prompts.

    python -m cascade.demo            # the full run (budget: 90 minutes on a 2-core CPU)
    python -m cascade.demo --quick    # the same path with less data and fewer steps (target: 10 minutes)

Run again, it reuses what exists: built shards, finished stages (their exported folder), and
interrupted training runs resume from their last checkpoint.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cascade.errors import UserError

STAGES = ("clip", "prior", "decoder", "sr256", "sr1024")
PROMPTS = ("a red circle at the top left", "a big blue square below a small yellow triangle",
           "a green star in the center")


@dataclass(frozen=True)
class Plan:
    name: str
    shapes: int  # procedural shapes samples
    emoji: int  # emoji samples (an even spread over Fluent and OpenMoji; 0 = all 7,869)
    steps: dict  # max training steps per stage
    images: int  # images per prompt


FULL = Plan("tiny", shapes=4000, emoji=2000,
            steps={"clip": 300, "prior": 2000, "decoder": 3000, "sr256": 600, "sr1024": 400}, images=2)
QUICK = Plan("quick", shapes=600, emoji=300,
             steps={"clip": 60, "prior": 300, "decoder": 300, "sr256": 60, "sr1024": 40}, images=1)


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise UserError(f"step failed with exit code {done.returncode}: {' '.join(cmd)}")


def has_shards(path: Path) -> bool:
    return any((path / "train").glob("*.tar"))


def build_data(plan: Plan, root: Path) -> Path:
    """shapes + emoji, each built into its own folder, then linked side by side into one set."""
    cascade = [sys.executable, "-m", "cascade.cli"]
    shapes, emoji, mixed = root / "shapes", root / "emoji", root / "mixed"
    if not has_shards(shapes):
        run(cascade + ["data", "build", "--source", "shapes", "--out", str(shapes), "--count", str(plan.shapes),
                       "--sizes", "64,256,1024", "--seed", "0"])
    if not has_shards(emoji):
        cmd = cascade + ["data", "build", "--source", "emoji", "--out", str(emoji), "--sizes", "64,256,1024"]
        run(cmd + (["--count", str(plan.emoji)] if plan.emoji else []))
    if not has_shards(mixed):
        for split in ("train", "val"):
            (mixed / split).mkdir(parents=True, exist_ok=True)
            for source in (shapes, emoji):
                for shard in sorted((source / split).glob("*.tar")):
                    # A copy, not a link: `cascade data embed` rewrites the mixed set's shards in place.
                    shutil.copyfile(shard, mixed / split / f"{source.name}-{shard.name}")
        for extra in ("LICENSES",):
            if (emoji / extra).exists():
                shutil.copyfile(emoji / extra, mixed / extra)
    return mixed


def train(stage: str, plan: Plan, data: Path, runs: Path, bundle: Path) -> None:
    if (bundle / stage / "model.safetensors").is_file():
        print(f"= {stage}: already trained ({bundle / stage})")
        return
    run([sys.executable, "train_stage.py", "--stage", stage, "--config", f"configs/tiny/{stage}.yaml",
         "--data", str(data), "--run-dir", str(runs / stage), "--max-steps", str(plan.steps[stage]),
         "--export", str(bundle)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cascade.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="less data and fewer steps (target: 10 minutes)")
    p.add_argument("--root", default=".", help="where data/, runs/, bundles/ and out/ go (default: .)")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    root = Path(args.root)
    data_root, runs, bundle, out = (root / "data" / plan.name, root / "runs" / plan.name,
                                    root / "bundles" / plan.name, root / "out" / plan.name)
    start = time.monotonic()
    try:
        data = build_data(plan, data_root)
        train("clip", plan, data, runs, bundle)
        run([sys.executable, "-m", "cascade.cli", "data", "embed", "--data", str(data), "--clip", str(bundle / "clip")])
        for stage in STAGES[1:]:
            train(stage, plan, data, runs, bundle)
        for i, prompt in enumerate(PROMPTS):
            run([sys.executable, "-m", "cascade.cli", "generate", "--prompt", prompt, "--model", str(bundle),
                 "--num-images", str(plan.images), "--seed", str(i), "--out", str(out)])
    except UserError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    print(f"demo finished in {(time.monotonic() - start) / 60:.1f} min; images in {out}, model in {bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
