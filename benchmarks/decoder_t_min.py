"""Where should the decoder's sampling stop? Its pictures of the one-object prompts `cascade eval` scores,
sampled down to each --t-min (the config key `t_min`: the last step returns the network's x0 estimate from
that timestep), scored for pixel noise, mean |x - its 3x3 box blur| over the 64x64 images (the shapes
data's own: ~0.005) and over their outermost ring of pixels (`edge_noise`), and by the shapes scorer
(colour / position accuracy, second copies). The same prompts, prior draws and x_T for every setting. Prints
one JSON line.

    python -m benchmarks.decoder_t_min --model bundles/quick-imagen [--t-min 0,60,120,240] [--prompts 36]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import emit, parse_times
from cascade.errors import UserError, run_cli
from cascade.process_defaults import set_process_defaults


def noise_map(images: torch.Tensor) -> torch.Tensor:
    """(H, W): |x - its 3x3 box blur| of (B, 3, H, W) images in [-1, 1] (edges replicated), averaged over the
    images and channels: what is left of single-pixel noise; a picture of flat shapes has little else at this
    scale."""
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (images - blur).abs().mean(dim=(0, 1))


def pixel_noise(images: torch.Tensor) -> float:
    """`noise_map` over the whole image."""
    return float(noise_map(images).mean())


def edge_noise(images: torch.Tensor) -> float:
    """`noise_map` over the outermost ring of pixels (a decoder whose convolutions pad with zeros draws a
    speckled frame there)."""
    noise = noise_map(images)
    inner = noise[1:-1, 1:-1]
    return float((noise.sum() - inner.sum()) / (noise.numel() - inner.numel()))


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoder_t_min", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model bundle with a decoder trained on shapes")
    p.add_argument("--t-min", default="0,60,120,240", metavar="T[,T...]",
                   help="lowest timesteps to sample down to (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=36, help="one-object prompts (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=None, help="decoder guidance (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def run() -> int:
        from cascade.evaluation import one_object_decodes
        from cascade.pipeline import Cascade
        from decoder.evaluation import shapes_accuracy

        if args.prompts < 1:
            raise UserError(f"--prompts {args.prompts}: at least 1")
        cascade = Cascade.from_bundle(args.model, ("prior", "decoder"))
        decoder = cascade.stages["decoder"]
        config = decoder.config
        t_mins = parse_times(args.t_min, config.timesteps, "--t-min")
        guidance = config.guidance if args.guidance is None else args.guidance
        rows = {}
        for t_min in t_mins:
            started = time.monotonic()
            decoder.config = config.model_copy(update={"t_min": t_min})
            try:
                images, prompts = one_object_decodes(cascade.clip, cascade.stages.get("prior"), decoder,
                                                     count=args.prompts, guidance=guidance, seed=args.seed)
            finally:
                decoder.config = config
            scores = shapes_accuracy(images, [scene for _, scene in prompts])
            rows[str(t_min)] = {"pixel_noise": round(pixel_noise(images), 4),
                                "edge_noise": round(edge_noise(images), 4),
                                **{k: round(scores[k], 4) for k in ("colour_acc", "position_acc", "too_many")},
                                "seconds": round(time.monotonic() - started, 2)}
        emit({"bench": "decoder_t_min", "model": str(args.model), "prompts": args.prompts, "guidance": guidance,
              "sampler": config.sampler, "steps": config.steps, "config_t_min": config.t_min, "seed": args.seed,
              "t_min": rows})
        return 0

    return run_cli("decoder_t_min", run)


if __name__ == "__main__":
    sys.exit(main())
