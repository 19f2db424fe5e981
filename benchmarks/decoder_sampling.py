"""Whether sampling settings change what a trained decoder draws: the shapes scorer's colour / shape /
position / object count on the same val scenes, from the same x_T, decoded with each sampler, number of
steps, guidance scale and DDIM eta of a sweep. The first setting is the decoder eval's own.

    python -m benchmarks.decoder_sampling --decoder runs/decoder-learning/bundle/decoder --data data/shapes

A setting is SAMPLER:STEPS:GUIDANCE[:ETA], e.g. ddim:50:3 or ddpm:100:3; stochastic samplers draw their
noise from one seeded generator per setting. With 64 scenes (~110 objects) a difference below ~0.05 is
within the noise. Prints one JSON line, a row per setting with its seconds per image.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import emit
from cascade.process_defaults import set_process_defaults

DEFAULT_SETTINGS = ("ddim:50:3", "ddim:50:2", "ddim:50:4", "ddim:50:5", "ddim:50:3:1", "ddpm:100:3",
                    "dpmpp:25:3")


def parse_setting(text: str) -> dict:
    """'ddim:50:3[:1]' -> {"sampler": "ddim", "steps": 50, "guidance": 3.0, "eta": 1.0}."""
    from cascade.diffusion.sampling import SAMPLERS

    parts = text.split(":")
    try:
        if len(parts) not in (3, 4) or parts[0] not in SAMPLERS:
            raise ValueError
        steps, guidance = int(parts[1]), float(parts[2])
        eta = float(parts[3]) if len(parts) == 4 else 0.0
        if steps < 1 or guidance < 0 or eta < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not SAMPLER:STEPS:GUIDANCE[:ETA] with SAMPLER one of {', '.join(SAMPLERS)}, "
            "STEPS >= 1, GUIDANCE and ETA >= 0") from None
    return {"sampler": parts[0], "steps": steps, "guidance": guidance, "eta": eta}


def main(argv: list[str] | None = None) -> None:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoder_sampling", description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", required=True, type=Path, help="an exported decoder (BUNDLE/decoder)")
    p.add_argument("--data", required=True, type=Path, help="a shapes set embedded by `cascade data embed`")
    p.add_argument("--setting", action="append", type=parse_setting, metavar="SAMPLER:STEPS:GUIDANCE[:ETA]",
                   help=f"repeatable; default: {' '.join(DEFAULT_SETTINGS)}")
    p.add_argument("--eval-samples", type=int, default=64, help="val scenes decoded per setting")
    p.add_argument("--seed", type=int, default=0, help="x_T is torch.randn from this seed, as in the decoder eval")
    args = p.parse_args(argv)
    if not (args.decoder / "config.json").is_file():
        p.error(f"no exported stage at {args.decoder} (expected config.json and model.safetensors)")
    if not (args.data / "val").is_dir():
        p.error(f"no val split in {args.data}")
    settings = args.setting or [parse_setting(s) for s in DEFAULT_SETTINGS]

    from cascade.bundle import load_stage
    from cascade.data.reader import make_val_batches
    from decoder.evaluation import CONDITIONING_KEYS, collect, decode_all, shapes_accuracy

    decoder = load_stage(args.decoder).eval()
    image_key = f"image_{decoder.config.image_size}"
    batches = make_val_batches(args.data, image_sizes=decoder.image_sizes, with_embeddings=True, batch_size=16)
    real = collect(batches, image_key, args.eval_samples)
    conditioning = {k: real[k] for k in CONDITIONING_KEYS if k in real}
    n = real[image_key].shape[0]
    noise = torch.randn(real[image_key].shape, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for s in settings:
        started = time.perf_counter()
        # a stochastic sampler's noise: the same seed for every setting
        images = decode_all(decoder, conditioning, noise, s["guidance"], sampler=s["sampler"], steps=s["steps"],
                            eta=s["eta"], generator=torch.Generator().manual_seed(args.seed + 1))
        seconds = time.perf_counter() - started
        scores = shapes_accuracy(images, real["json"])
        rows.append({**s, "s_per_image": round(seconds / n, 3), **{k: round(v, 3) for k, v in scores.items()}})
    emit({"decoder": str(args.decoder), "eval_scenes": n, "settings": rows,
          "real_images": {k: round(v, 3) for k, v in shapes_accuracy(real[image_key], real["json"]).items()}})


if __name__ == "__main__":
    main()
