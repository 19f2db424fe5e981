"""`cascade.nn.Upsample` as four 2x2 phase convolutions against the convolution of the nearest-upsampled map
it replaces, at the shapes the tiny U-Nets run it: sr1024's two upsamplers on a 1024^2 output, and the tiny
decoder's (configs/tiny/decoder.yaml: 64^2 behind its 2x2 stem, a training batch of 16). Forward only,
channels-last (both nets' layout), fp32; the two interleaved in one process, medians and the median of
per-round ratios. Also the largest difference between the two (float rounding). Prints one JSON line.

    python -m benchmarks.upsample_phases [--runs 9] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.common import emit, interleaved_times
from cascade.nn import Upsample
from cascade.process_defaults import set_process_defaults

# name: (batch, in_ch, out_ch, input side)
SHAPES = {"sr1024_512_to_1024": (1, 32, 16, 512), "sr1024_256_to_512": (1, 64, 32, 256),
          "decoder_16_to_32": (16, 64, 64, 16), "decoder_8_to_16": (16, 128, 128, 8)}


def main() -> None:
    set_process_defaults()  # --threads below replaces its thread count
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    record: dict = {"benchmark": "upsample_phases", "threads": args.threads, "runs": args.runs}
    for name, (batch, cin, cout, side) in SHAPES.items():
        up = Upsample(cin, cout).eval()
        x = torch.randn(batch, cin, side, side).contiguous(memory_format=torch.channels_last)
        weight = up.conv.weight.contiguous(memory_format=torch.channels_last)

        def upsampled_conv():
            return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, up.conv.bias, padding=1)

        fns = {"upsampled_conv": upsampled_conv, "phases": lambda: up(x)}
        with torch.no_grad():
            diff = (fns["phases"]() - upsampled_conv()).abs().max().item()
            times = interleaved_times(fns, args.runs)
        record[name] = {"ms_upsampled_conv": round(1e3 * statistics.median(times["upsampled_conv"]), 2),
                        "ms_phases": round(1e3 * statistics.median(times["phases"]), 2),
                        "phases_over_upsampled_conv": round(statistics.median(
                            p / u for p, u in zip(times["phases"], times["upsampled_conv"])), 3),
                        "max_abs_diff": diff}
    emit(record)


if __name__ == "__main__":
    main()
