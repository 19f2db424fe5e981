"""The main job, end to end on this machine: fetch and build the data, train every tiny stage, export
one model bundle, and generate 1024x1024 images for example prompts.

    python -m cascade.demo            # the full run (budget: 90 minutes on a 2-core CPU)
    python -m cascade.demo --quick    # the same path with less data and fewer steps (target: 10 minutes)
    python -m cascade.demo --unclip   # the unCLIP system: text -> CLIP -> prior -> decoder -> SR

The default is the Imagen-style system (text -> decoder -> SR, no CLIP, no prior) into bundles/<plan>-imagen:
at equal compute it bound colour, shape and place better than unCLIP (docs/results.md). The unCLIP one,
into bundles/<plan>, is the one that can vary, interpolate and textdiff. Run again, it reuses what
exists: built shards, finished stages (their exported folder), the evaluation of the same weights, and
interrupted training runs resume from their last checkpoint. The two systems share the plan's data, and
each copies the other's upsamplers when that one has them (the SR stages read no text).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cascade.errors import ArgumentParser, UserError, run_cli
from cascade.registry import STAGE_ORDER
from cascade.process_defaults import keep_hub_offline

ROOT = Path(__file__).resolve().parents[1]

STAGES = STAGE_ORDER
TRAIN_ORDER = ("clip", "prior", "sr256", "decoder", "sr1024")
IMAGEN_ORDER = ("sr256", "decoder", "sr1024")  # an Imagen-style decoder reads the captions: no clip, no prior
IMAGEN_DECODER = ROOT / "configs" / "tiny" / "decoder-imagen.yaml"
PROMPTS = ("a red circle at the top left", "a big blue square below a small yellow triangle",
           "a green star in the center")


@dataclass(frozen=True)
class Plan:
    name: str
    shapes: int  # procedural shapes samples
    emoji: int  # emoji samples (an even spread over Fluent and OpenMoji; 0 = all 7,869)
    steps: dict  # max training steps per stage
    images: int  # images per prompt
    # Changes to configs/tiny/<stage>.yaml for this plan, {stage: {"model"|"train": {key: value}}}; the
    # changed config is written to runs/<plan>/<stage>.yaml and trained from there.
    overrides: dict = field(default_factory=dict)
    generate_steps: str = ""  # `cascade generate --steps` for the example prompts ("" = its defaults)
    eval_limit: int = 64  # val samples for `cascade eval`'s text -> prior -> decoder score
    preview_minutes: float = 5.0  # while the decoder trains: a preview of PROMPTS through the cascade this often
    decoder_sources: tuple[str, ...] = ()  # the decoder trains on these parts of the mixed set only (() = all)
    shapes_source: str = "shapes"  # `cascade data build --source` of the shapes part ("shapes:single": one object)


# Every stage is evaluated once, by `cascade eval` at the end, not also at the end of its training run.
NO_END_EVAL = {stage: {"train": {"eval_at_end": False}} for stage in STAGES}

FULL = Plan("tiny", shapes=4000, emoji=2000,
            steps={"clip": 300, "prior": 2000, "decoder": 6000, "sr256": 600, "sr1024": 1200}, images=2,
            overrides=NO_END_EVAL, preview_minutes=4.0)  # the first preview ~19 min after the start (quiet)
# Ten minutes that show the models learn, not only that the path runs: most of the time goes to the decoder,
# which trains on one-object shapes scenes only, where 1,000 steps learn colour and place (measured with
# `cascade eval --one-object`; on the mixed set's 1-3 object scenes 900 steps placed nothing: README).
QUICK = Plan("quick", shapes=600, emoji=300,
             steps={"clip": 60, "prior": 300, "decoder": 1000, "sr256": 60, "sr1024": 20}, images=1,
             overrides={**NO_END_EVAL,
                        "decoder": {**NO_END_EVAL["decoder"],
                                    # guidance 3, not the Imagen-style config's 2: after 1,000 steps 3 placed
                                    # 27 of 36 one-object prompts and 2 placed 24 (docs/results.md)
                                    "model": {"eval_samples": 16, "steps": 25, "guidance": 3.0,
                                              "eval_guidance": [3.0],
                                              # token grounding off: the full demo's decoder has it, but
                                              # after these 1,000 steps it placed 9 of 36 one-object prompts
                                              # and 27 without, and the placement probe fell from 1.00 to
                                              # 0.33 (docs/results.md, session 28)
                                              "grounding_loss": 0.0, "grounding_places": False,
                                              # a full-resolution head after the 2x2 stem: half the pixel noise
                                              # over the background (0.065 against 0.128, the data 0.005), the
                                              # same speed and scores (docs/results.md, 2026-12-07)
                                              "pixel_head": 16,
                                              # the head pads with the opposite edge, not zeros: the speckled
                                              # frame went (outer ring's noise 0.095 -> 0.031, inside 0.024;
                                              # seed 1 0.110 -> 0.026), the scores within a prompt of 36,
                                              # 2-5% more training time (docs/results.md, session 40)
                                              "pixel_head_padding": "circular",
                                              # sampling ends at step 120 (sigma 0.41) with the net's x0 there:
                                              # its last steps, which min-SNR weighting leaves least trained,
                                              # doubled the pixel noise (0.030 against 0.062, colour / position
                                              # 0.83 / 0.83 against 0.78 / 0.78; docs/results.md, 2026-12-07)
                                              "t_min": 120}},
                        **{sr: {**NO_END_EVAL[sr], "model": {"eval_images": 4, "eval_steps": [2],
                                                             "eval_aug_levels": [0.0, 0.2]}}
                           for sr in ("sr256", "sr1024")}},
             generate_steps="decoder=25", eval_limit=16, preview_minutes=60.0,
             decoder_sources=("shapes",), shapes_source="shapes:single")


TIMES: dict[str, float] = {}  # wall-clock minutes of each part of this invocation, for the summary


def run(cmd: list[str], part: str | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    started = time.monotonic()
    done = subprocess.run(cmd)
    if part:
        TIMES[part] = TIMES.get(part, 0.0) + (time.monotonic() - started) / 60
    if done.returncode == 130:
        raise KeyboardInterrupt
    if done.returncode != 0:
        raise UserError(f"step failed with exit code {done.returncode}: {' '.join(cmd)}")


def has_shards(path: Path) -> bool:
    return any((path / "train").glob("*.tar"))


def build_data(plan: Plan, root: Path) -> Path:
    """shapes + emoji, each built into its own folder, then linked side by side into one set."""
    cascade = [sys.executable, "-m", "cascade.cli"]
    shapes, emoji, mixed = root / plan.shapes_source.replace(":", "-"), root / "emoji", root / "mixed"
    if not has_shards(shapes):
        run(cascade + ["data", "build", "--source", plan.shapes_source, "--out", str(shapes),
                       "--count", str(plan.shapes), "--sizes", "64,256,1024", "--seed", "0"], "data: shapes")
    if not has_shards(emoji):
        cmd = cascade + ["data", "build", "--source", "emoji", "--out", str(emoji), "--sizes", "64,256,1024"]
        run(cmd + (["--count", str(plan.emoji)] if plan.emoji else []), "data: emoji")
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


def source_view(mixed: Path, sources: tuple[str, ...]) -> Path:
    """`mixed` itself, or a folder beside it whose train/val hold links to the mixed set's shards of the
    given sources (the copies are named "<source>-shard-*.tar"), so a stage can train on a part of the set."""
    if not sources:
        return mixed
    view = mixed.with_name(f"{mixed.name}-{'-'.join(sources)}")
    for split in ("train", "val"):
        (view / split).mkdir(parents=True, exist_ok=True)
        for shard in sorted((mixed / split).glob("*.tar")):
            link = view / split / shard.name
            if shard.name.split("-")[0] in sources and not link.exists():
                link.symlink_to(shard.resolve())
    return view


def plan_config(stage: str, plan: Plan, config: Path) -> dict:
    """The stage YAML `config` as a dict, with the plan's changes to its sections."""
    data = yaml.safe_load(config.read_text())
    for section, values in plan.overrides.get(stage, {}).items():
        data[section].update(values)
    return data


def train(stage: str, plan: Plan, data: Path, runs: Path, bundle: Path, extra: tuple[str, ...] = (),
          config: Path | None = None) -> None:
    """Train `stage` from `config` (default configs/tiny/<stage>.yaml) with the plan's changes, unless
    `bundle` already has it."""
    if (bundle / stage / "model.safetensors").is_file():
        print(f"= {stage}: already trained ({bundle / stage})")
        return
    config = config or ROOT / "configs" / "tiny" / f"{stage}.yaml"
    if plan.overrides.get(stage):
        source = config
        data_ = plan_config(stage, plan, config)
        config = runs / f"{stage}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(f"# configs/tiny/{source.name} with the {plan.name} plan's changes (cascade/demo.py)\n"
                          + yaml.safe_dump(data_, sort_keys=False))
    run([sys.executable, str(ROOT / "train_stage.py"), "--stage", stage, "--config", str(config),
         "--data", str(data), "--run-dir", str(runs / stage), "--max-steps", str(plan.steps[stage]),
         "--export", str(bundle), *extra], f"train {stage}")


def main(argv: list[str] | None = None) -> int:
    # every step is a command in a child process, which sizes its own threads and inherits these
    keep_hub_offline()
    p = ArgumentParser(prog="python -m cascade.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="less data and fewer steps (target: 10 minutes)")
    p.add_argument("--root", default=".", help="where data/, runs/, bundles/ and out/ go (default: .)")
    p.add_argument("--unclip", action="store_true",
                   help="train the unCLIP system (CLIP, its embeddings, the prior and configs/tiny/decoder.yaml) "
                        "into bundles/<plan> instead of the default Imagen-style one (configs/tiny/"
                        "decoder-imagen.yaml: the frozen MiniLM's text into the decoder, no CLIP, no prior) into "
                        "bundles/<plan>-imagen; unCLIP binds less well (docs/results.md) but can vary, "
                        "interpolate and textdiff")
    p.add_argument("--imagen", action="store_true", help=argparse.SUPPRESS)  # the default; before, an option
    args = p.parse_args(argv)
    if args.unclip and args.imagen:
        p.error("--unclip and --imagen name two systems; give one (the default is Imagen-style)")
    return run_cli("demo", lambda: demo(QUICK if args.quick else FULL, Path(args.root), unclip=args.unclip),
                   interrupted="interrupted; run it again to go on from where it stopped")


def weights_stamp(bundle: Path) -> str:
    """Which weights `bundle` holds: each stage's weights file with its size and modification time, a line each."""
    lines = []
    for weights in sorted(bundle.glob("*/model.safetensors")):
        stat = weights.stat()
        lines.append(f"{weights.parent.name} {stat.st_size} {stat.st_mtime_ns}\n")
    return "".join(lines)


def share_upsamplers(other: Path, bundle: Path) -> None:
    """Copy the other system's SR stages from bundle `other` into `bundle` (the upsamplers read no text)."""
    from cascade.bundle import write_manifest

    for stage in ("sr256", "sr1024"):
        if (other / stage / "model.safetensors").is_file() and not (bundle / stage / "model.safetensors").is_file():
            print(f"= {stage}: shared with {other / stage}")
            partial = bundle / f".{stage}.partial"  # renamed when complete: a stop leaves no half stage
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(bundle / stage, ignore_errors=True)
            shutil.copytree(other / stage, partial)
            partial.rename(bundle / stage)
            write_manifest(bundle)


def bundle_name(plan: Plan, *, unclip: bool) -> str:
    """bundles/<this>: the unCLIP system's is named after the plan, the Imagen-style one's adds -imagen."""
    return plan.name + ("" if unclip else "-imagen")


def demo(plan: Plan, root: Path, *, unclip: bool = False) -> int:
    imagen = not unclip
    name = bundle_name(plan, unclip=unclip)
    data_root, runs, bundle, out = (root / "data" / plan.name, root / "runs" / name,
                                    root / "bundles" / name, root / "out" / name)
    cli = [sys.executable, "-m", "cascade.cli"]
    start = time.monotonic()
    data = build_data(plan, data_root)
    share_upsamplers(root / "bundles" / bundle_name(plan, unclip=not unclip), bundle)  # the other system's
    if unclip:
        train("clip", plan, data, runs, bundle)
        run(cli + ["data", "embed", "--data", str(data), "--clip", str(bundle / "clip")], "data: embed")
    # The decoder trains after sr256, so that its previews can go through the whole cascade to 256x256.
    for stage in IMAGEN_ORDER if imagen else TRAIN_ORDER[1:]:
        extra: tuple[str, ...] = ()
        if stage == "decoder":
            progress = out / "progress"
            print(f"= decoder: previews of the three prompts at 256x256 from its current weights go to {progress}/ "
                  f"every {plan.preview_minutes:g} minutes of its training and at its end", flush=True)
            extra = ("--preview-bundle", str(bundle), "--preview-out", str(progress),
                     "--preview-minutes", str(plan.preview_minutes),
                     *(x for prompt in PROMPTS for x in ("--preview-prompt", prompt)))
        train(stage, plan, source_view(data, plan.decoder_sources) if stage == "decoder" else data, runs, bundle,
              extra, IMAGEN_DECODER if imagen and stage == "decoder" else None)
    for i, prompt in enumerate(PROMPTS):  # a demo run again (to go on after a stop) replaces its images
        steps = ["--steps", plan.generate_steps] if plan.generate_steps else []
        run(cli + ["generate", "--prompt", prompt, "--model", str(bundle), "--num-images", str(plan.images),
                   "--seed", str(i), "--out", str(out), "--overwrite", *steps], "generate")
    # eval.json is written after every stage, so it may be partial: `.complete` names the weights it evaluated,
    # and a stage trained again since (its folder removed, a run resumed to its end) is evaluated again
    done, stamp = out / "eval" / ".complete", weights_stamp(bundle)
    if not done.is_file() or done.read_text() != stamp:
        run(cli + ["eval", "--model", str(bundle), "--data", str(data), "--out", str(out / "eval"),
                   "--limit", str(plan.eval_limit)], "eval")
        done.write_text(stamp)
    total = (time.monotonic() - start) / 60
    TIMES["total"] = total
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.json").write_text(json.dumps({k: round(v, 2) for k, v in TIMES.items()}, indent=2) + "\n")
    print("\n".join(f"  {k:<14} {v:6.1f} min" for k, v in TIMES.items()))
    print(f"demo finished in {total:.1f} min; images in {out}, evaluation in {out / 'eval'}, model in {bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
