"""What the tiny decoder learns in a given training time: train it on an embedded set (the shapes set is
the one the scorer can judge) for --steps, timed, then decode the val scenes from their true CLIP
image embeddings and text and score colour / shape / position with the shapes scorer, beside the
same scorer on the real val images (the ceiling) and chance. Given the CLIP the set was embedded with
(--clip), also the placement probe (`decoder.evaluation.placement_probe`): is one object put in the
cell the text names, when the image embedding is that of the object at the centre? And, SDEdit-style
(`decoder.evaluation.denoise_from`), the same scores when the val images are decoded from themselves
noised to 0.5 and 0.7 of the schedule ("layout_given"): whether the decoder can draw what it does not
yet decide from pure noise.

    cascade data build --source shapes --out data/shapes --count 4000 --sizes 64 --seed 0
    cascade data embed --data data/shapes --clip bundles/tiny/clip
    python -m benchmarks.decoder_learning --data data/shapes --steps 8500 --run-dir runs/decoder-learning \
        --clip bundles/tiny/clip

Prints one JSON line. The run directory keeps checkpoints, metrics.jsonl and sample grids; run again
with the same --run-dir and training resumes (the reported minutes, steps_timed and s_per_step are then
this invocation's only).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import emit
from cascade.data.shapes import COLORS, SHAPES
from cascade.process_defaults import set_process_defaults

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoder_learning", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a set embedded by `cascade data embed`")
    p.add_argument("--steps", type=int, default=8500, help="training steps (default 8500: ~50 min measured here)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny" / "decoder.yaml")
    p.add_argument("--run-dir", type=Path, default=Path("runs/decoder-learning"))
    p.add_argument("--eval-samples", type=int, default=64, help="val scenes decoded at each guidance scale")
    p.add_argument("--clip", type=Path, help="the CLIP stage the set was embedded with: adds the placement probe")
    args = p.parse_args(argv)

    from cascade.bundle import load_stage
    from cascade.data.reader import make_val_batches
    from cascade.training.engine import TrainArgs, train
    from cascade.encoders import load_encoder
    from decoder.evaluation import CONDITIONING_KEYS, collect, denoise_from, placement_report, shapes_accuracy

    clip = load_encoder(args.clip) if args.clip else None  # a bad path fails now, not after an hour
    config = yaml.safe_load(args.config.read_text())
    # --eval-samples sizes the evaluation below only, so that a finished run dir can be scored again
    # with another size (a changed run config would be refused on resume)
    config["train"]["eval_at_end"] = False  # evaluated below, outside the timed training
    bundle = args.run_dir / "bundle"
    with tempfile.TemporaryDirectory() as tmp:  # the run directory keeps its own copy (run.json)
        run_config = Path(tmp) / "decoder.yaml"
        run_config.write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.monotonic()
        result = train(TrainArgs(stage="decoder", config=run_config, data=args.data, run_dir=args.run_dir,
                                 max_steps=args.steps, export=bundle))
        train_minutes = (time.monotonic() - started) / 60
    if result.interrupted:
        raise SystemExit("interrupted; run again with the same --run-dir to resume")

    decoder = load_stage(bundle / "decoder").eval()
    decoder.config.eval_samples = args.eval_samples  # decoder.evaluate below scores this many scenes
    batches = make_val_batches(args.data, image_sizes=decoder.image_sizes, with_embeddings=True, batch_size=16)
    image_key = f"image_{decoder.config.image_size}"
    real = collect(batches, image_key, args.eval_samples)  # one pass over val
    started = time.monotonic()
    metrics = decoder.evaluate([real], torch.Generator().manual_seed(0))  # the same scenes, as one batch
    placement = {} if clip is None else placement_report(decoder, clip, args.run_dir)  # + grids there
    conditioning = {k: real[k] for k in CONDITIONING_KEYS if k in real}
    noise = torch.randn(real[image_key].shape, generator=torch.Generator().manual_seed(0))
    layout_given = {f"from_{start:g}@g3": shapes_accuracy(
        denoise_from(decoder, conditioning, real[image_key], start, 3.0, noise), real["json"]) for start in (0.5, 0.7)}
    eval_minutes = (time.monotonic() - started) / 60
    ceiling = shapes_accuracy(real[image_key], real["json"])
    batch = config["train"]["batch_size"] * config["train"].get("grad_accum", 1)
    timed = result.step - result.start_step  # steps this invocation ran: fewer than steps when it resumed
    emit({"steps": result.step, "batch": batch, "samples_seen": result.step * batch, "steps_timed": timed,
          "train_minutes": round(train_minutes, 1), "s_per_step": round(train_minutes * 60 / timed, 2) if timed else None,
          "eval_minutes": round(eval_minutes, 1), "eval_scenes": len(real["json"]),
          "decoded": {k: round(v, 3) for k, v in metrics.items()},
          "placement": {k: round(v, 3) for k, v in placement.items()},
          "layout_given": {name: {k: round(v, 3) for k, v in m.items()} for name, m in layout_given.items()},
          "real_images": {k: round(v, 3) for k, v in ceiling.items()},
          "chance": {"colour_acc": round(1 / len(COLORS), 3), "shape_acc": round(1 / len(SHAPES), 3),
                     "position_acc": round(1 / 9, 3)},
          "config": {k: config["model"].get(k) for k in ("channels", "prediction", "snr_gamma", "snr_plus_one",
                                                          "t_logit_normal", "t_logit_mean", "p_drop_text", "coord_channels",
                                                          "attention_positions")}})


if __name__ == "__main__":
    from cascade.errors import run_cli

    raise SystemExit(run_cli("benchmarks.decoder_learning", main, interrupted="interrupted; run again to resume"))
