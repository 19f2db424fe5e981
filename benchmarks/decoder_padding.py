"""What circular padding costs the quick demo's decoder: its U-Net (configs/tiny/decoder-imagen.yaml with the quick
plan's changes) with every convolution padded with zeros, with the pixel head's two padded with the opposite edge
(`pixel_head_padding: circular`, the quick plan's), and with every one so (`padding: circular`). Times a training
step's forward and backward (batch --batch-size at 64x64) and one sampling forward (batch 2, no autograd),
the three nets in turn in each of --runs rounds in one process; prints the medians and the medians of the
per-round ratios to zeros as one JSON line. Random weights and conditioning: the cost does not depend on them.

    python -m benchmarks.decoder_padding [--runs 9] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import torch

from benchmarks.common import emit, interleaved_times
from cascade.process_defaults import set_process_defaults

VARIANTS = {"zeros": {}, "head_circular": {"pixel_head_padding": "circular"}, "all_circular": {"padding": "circular"}}


def quick_config():
    """The quick plan's decoder config, with zero padding everywhere."""
    from cascade import demo
    from decoder import DecoderConfig

    model = demo.plan_config("decoder", demo.QUICK, demo.IMAGEN_DECODER)["model"]
    return DecoderConfig(**{**model, "padding": "zeros", "pixel_head_padding": None})


def main(argv: list[str] | None = None) -> int:
    set_process_defaults()
    p = argparse.ArgumentParser(prog="python -m benchmarks.decoder_padding", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=9, help="interleaved rounds (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch (default: %(default)s)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.batch_size < 1:
        p.error("--runs and --batch-size must be at least 1")
    from decoder import Decoder

    base = quick_config()
    nets = {}
    for name, change in VARIANTS.items():
        torch.manual_seed(0)
        nets[name] = Decoder(base.model_copy(update=change)).unet
    b, s = args.batch_size, base.image_size
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(b, 3, s, s, generator=g), torch.randint(0, base.timesteps, (b,), generator=g)
    emb = torch.randn(b, base.embedding_dim, generator=g)
    context = torch.randn(b, base.text_len, base.context_width, generator=g)
    mask = torch.ones(b, base.text_len, dtype=torch.bool)

    def train_step(net):
        net(x, t, emb, context, mask).square().mean().backward()

    def sample_step(net):
        with torch.no_grad():
            net(x[:2], t[:2], emb[:2], context[:2], mask[:2])

    steps = {"train": train_step, "sample": sample_step}
    times = interleaved_times({(name, kind): partial(step, net) for name, net in nets.items()
                               for kind, step in steps.items()}, args.runs)
    record = {"bench": "decoder_padding", "runs": args.runs, "batch_size": b, "threads": torch.get_num_threads()}
    for kind in ("train", "sample"):
        zeros = times["zeros", kind]
        record[f"{kind}_s"] = {name: round(statistics.median(times[name, kind]), 4) for name in nets}
        record[f"{kind}_ratio"] = {name: round(statistics.median(a / z for a, z in zip(times[name, kind], zeros)), 3)
                                   for name in nets}
    emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
