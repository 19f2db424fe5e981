"""Run every benchmark in turn, each in its own process; each prints one JSON line, collected into
benchmarks/results.jsonl (with the date) so the README's numbers can be traced to a run."""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = [
    ["benchmarks.decoder_speed"],
    ["benchmarks.sr_scaling", "--runs", "3"],
    ["benchmarks.prior_train"],
]
# Needs a CUDA GPU: without one it exits 2 with one line, and is skipped here (not a failure).
GPU_BENCHMARKS = [
    ["benchmarks.gpu_check"],
]
DEMO_DATA = Path("data/tiny/mixed")  # `make demo`'s embedded set: the CLIP probe runs when it exists


def main() -> int:
    out = Path(__file__).with_name("results.jsonl")
    failed = 0
    extra = [["benchmarks.clip_probe", "--data", str(DEMO_DATA)]] if (DEMO_DATA / "val").is_dir() else []
    for cmd in BENCHMARKS + extra + GPU_BENCHMARKS:
        print(f"+ python -m {' '.join(cmd)}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
        if cmd in GPU_BENCHMARKS and done.returncode == 2:
            print(f"  skipped: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no GPU'}",
                  file=sys.stderr, flush=True)
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            failed += 1
            print(done.stderr[-2000:], file=sys.stderr)
            continue
        record = {"benchmark": cmd[0], "date": datetime.date.today().isoformat(), **json.loads(lines[-1])}
        print(json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
