"""The binding comparison at equal compute (#25): each system gets the same minutes of training on the same
shapes set, from nothing, then `benchmarks.binding` scores them all on its fixed prompt set. Prints one JSON
line (the binding scores per system, with the steps and minutes each stage got) and writes the figure.

    python -m benchmarks.binding_hour --data data/binding --out runs/binding-hour --minutes 60 --parallel \\
        [--system unclip] [--system imagen=configs/tiny/decoder-imagen.yaml] [--images 4]

A system is `unclip` (its minutes cover everything it trains: the tiny CLIP, `cascade data embed`, the
prior, then the decoder of configs/tiny/decoder.yaml until the minutes are spent) or NAME=DECODER_YAML, an
Imagen-style decoder (conditioning: imagen), which trains for all the minutes; a lever is such a config.
--parallel trains the systems at the same time with the cores split evenly (OMP_NUM_THREADS), so each gets
the same share of the machine; without it they run one after another. The decoder's max_steps (its
learning-rate schedule) is --steps-per-minute times its minutes; the time budget ends the run, unless
max_steps comes first (each part's "ended_by" says which: set the rate high enough for "minutes").
Run again with the same --out, finished stages are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import emit
from cascade.errors import UserError, run_cli
from cascade.process_defaults import keep_hub_offline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"


def parse_systems(specs: list[str]) -> dict[str, Path | None]:
    """["unclip", "NAME=DECODER_YAML", ...] -> {name: decoder config, or None for unclip}."""
    systems: dict[str, Path | None] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep and name != "unclip":
            raise UserError(f"--system {spec}: give 'unclip' or NAME=DECODER_YAML (an Imagen-style decoder)")
        if sep and not Path(path).is_file():
            raise UserError(f"--system {spec}: no such config file {path}")
        if name in systems:
            raise UserError(f"--system {spec}: the name '{name}' is given twice")
        systems[name] = Path(path) if sep else None
    return systems


def last_step(run_dir: Path) -> int:
    """The step of the run's last checkpoint (a run saves one when it ends), 0 without one."""
    from cascade.training.checkpoints import latest

    found = latest(run_dir)
    return 0 if found is None else found[1].step


class System:
    """One system's training, as a chain of commands with a shared time budget; each part's output goes to
    OUT/NAME/PART.log, and what each part got to OUT/NAME/training.json."""

    def __init__(self, name: str, decoder: Path | None, args: argparse.Namespace, threads: int):
        self.name, self.decoder, self.args = name, decoder, args
        self.out = Path(args.out) / name
        self.bundle = self.out / "bundle"
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1"}
        self.out.mkdir(parents=True, exist_ok=True)
        # what each part got (minutes, steps), kept in the system's folder so that a rerun reports it too
        self.record = self.out / "training.json"
        self.parts: dict[str, dict] = json.loads(self.record.read_text()) if self.record.is_file() else {}

    def _run(self, part: str, cmd: list[str]) -> None:
        started = time.monotonic()
        with open(self.out / f"{part}.log", "a") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        if done.returncode != 0:
            raise UserError(f"{self.name}: {part} failed (exit {done.returncode}); see {self.out / f'{part}.log'}")
        self.parts.setdefault(part, {"minutes": 0.0})["minutes"] += (time.monotonic() - started) / 60
        self._save()

    def _save(self) -> None:
        self.record.write_text(json.dumps(self.parts) + "\n")

    def _config(self, stage: str, config: Path) -> Path:
        """`config` without the end-of-run eval and sample grids: what a system trains is all it is timed on."""
        import yaml

        data = yaml.safe_load(config.read_text())
        data.setdefault("train", {}).update(eval_at_end=False, eval_every=0, sample_every=0)
        path = self.out / f"{stage}.yaml"
        path.write_text(f"# {config} without end-of-run eval or grids (benchmarks/binding_hour.py)\n"
                        + yaml.safe_dump(data, sort_keys=False))
        return path

    def _train(self, stage: str, config: Path, data: Path, minutes: float, max_steps: int | None) -> None:
        if (self.bundle / stage / "model.safetensors").is_file():
            return
        config = self._config(stage, config)
        cmd = [sys.executable, str(ROOT / "train_stage.py"), "--stage", stage, "--config", str(config),
               "--data", str(data), "--run-dir", str(self.out / "runs" / stage), "--export", str(self.bundle),
               "--max-minutes", f"{max(minutes, 0.05):.3f}"]
        self._run(stage, cmd + ([] if max_steps is None else ["--max-steps", str(max_steps)]))
        steps = last_step(self.out / "runs" / stage)
        # a run whose max_steps came first ended before its minutes: say so, it got less than its share
        self.parts[stage].update(steps=steps, ended_by="max_steps" if max_steps is not None and steps >= max_steps
                                 else "minutes")
        self._save()

    def train(self) -> None:
        started = time.monotonic()

        def left() -> float:
            return self.args.minutes - (time.monotonic() - started) / 60

        data = Path(self.args.data)
        if self.decoder is None:  # unCLIP: clip -> embed -> prior -> decoder, all inside the minutes
            self._train("clip", TINY / "clip.yaml", data, left(), None)
            embedded = self.out / "data"  # `cascade data embed` rewrites shards in place: a copy
            if not (embedded / "binding-hour-embedded").is_file():
                shutil.rmtree(embedded, ignore_errors=True)
                shutil.copytree(data, embedded)
                self._run("embed", [sys.executable, "-m", "cascade.cli", "data", "embed", "--data", str(embedded),
                                    "--clip", str(self.bundle / "clip")])
                (embedded / "binding-hour-embedded").write_text("{}\n")
            self._train("prior", TINY / "prior.yaml", embedded, left(), self.args.prior_steps)
            decoder, data = TINY / "decoder.yaml", embedded
        else:
            decoder = self.decoder
        minutes = left()
        self._train("decoder", decoder, data, minutes, max(1, round(self.args.steps_per_minute * minutes)))


def main(argv: list[str] | None = None) -> int:
    keep_hub_offline()
    p = argparse.ArgumentParser(prog="python -m benchmarks.binding_hour", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a shapes set with held-out pairs (cascade data build "
                                                 "--source shapes --holdout-pairs ...), not yet embedded")
    p.add_argument("--out", required=True, help="runs, bundles, logs and the figure go here")
    p.add_argument("--system", action="append", default=[], metavar="unclip|NAME=DECODER_YAML",
                   help="a system to train (repeatable; default: unclip and imagen=configs/tiny/decoder-imagen.yaml)")
    p.add_argument("--minutes", type=float, default=60.0, help="training minutes per system (default: %(default)s)")
    p.add_argument("--parallel", action="store_true", help="train the systems at once, the cores split evenly")
    p.add_argument("--steps-per-minute", type=float, default=120.0,
                   help="sets each decoder's max_steps (its learning-rate schedule) to this times its minutes "
                        "(default: %(default)s, the tiny decoders at one thread on this machine)")
    p.add_argument("--prior-steps", type=int, default=2000, help="unclip: the prior's steps (default: %(default)s, "
                                                                 "the demo's)")
    p.add_argument("--images", type=int, default=4, help="images per benchmark prompt (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def run() -> int:
        from concurrent.futures import ThreadPoolExecutor

        from cascade.binding import binding_figure, evaluate_binding, holdout_of
        from cascade.data.shapes import format_pairs

        if not args.minutes > 0 or args.images < 1 or not args.steps_per_minute > 0:
            raise UserError("--minutes and --steps-per-minute must be > 0 and --images >= 1")
        if not any(Path(args.data, "train").glob("*.tar")):
            raise UserError(f"--data {args.data}: no train/*.tar shards")
        systems = parse_systems(args.system or ["unclip", f"imagen={TINY / 'decoder-imagen.yaml'}"])
        cores = os.cpu_count() or 1
        threads = max(1, cores // len(systems)) if args.parallel else cores
        chains = [System(name, cfg, args, threads) for name, cfg in systems.items()]
        started = time.monotonic()
        with ThreadPoolExecutor(len(chains) if args.parallel else 1) as pool:
            for future in [pool.submit(chain.train) for chain in chains]:
                future.result()
        train_minutes = (time.monotonic() - started) / 60
        holdout = holdout_of(args.data)
        out = {"bench": "binding_hour", "minutes": args.minutes, "parallel": args.parallel, "threads": threads,
               "holdout_pairs": format_pairs(holdout), "images_per_prompt": args.images,
               "train_minutes_wall": round(train_minutes, 1), "systems": {}}
        images = {}
        cases = None
        for chain in chains:
            scores, images[chain.name], cases = evaluate_binding(chain.bundle, holdout=holdout, seed=args.seed,
                                                                 repeats=args.images)
            out["systems"][chain.name] = {"scores": {k: round(v, 4) for k, v in scores.items()},
                                          "training": {k: {kk: round(vv, 2) if isinstance(vv, float) else vv
                                                           for kk, vv in v.items()}
                                                       for k, v in chain.parts.items()}}
        out["figure"] = str(binding_figure(images, cases, Path(args.out) / "binding.png"))
        (Path(args.out) / "result.json").write_text(json.dumps(out, indent=1) + "\n")
        emit(out)
        return 0

    return run_cli("binding_hour", run)


if __name__ == "__main__":
    sys.exit(main())
