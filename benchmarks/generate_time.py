"""How long one `cascade generate --until sr1024` takes from the command's start (model loading included),
on a quiet machine and with one CPU-bound process beside it, for a few thread / OpenMP / step settings.

Each timed run is a fresh `cascade generate` process, as a user runs it; the settings are interleaved run by
run, so a change of load hits all of them alike. The load is one busy Python loop (one core's worth of
work), started before a loaded round and stopped after it. Settings (see `SETTINGS`): the defaults; one
torch thread; OpenMP's passive wait policy (idle threads sleep instead of spinning, which is what costs
most when another process wants the core); libgomp's default spin of 300,000 polls before an idle thread
sleeps, where the commands set 3,000, or 10,000 where a short command finds a free core per thread
(`cascade.process_defaults`); 3,000 whatever the load; sr1024 at 2 sampling steps instead of its config's; sr1024
in its 256-px tiles instead of streamed bands of rows, or in bands of 32 or 64 rows (a copy of the bundle with that
config key changed); and, given `--intel-openmp LIB`, Intel's OpenMP preloaded in place of libgomp, with the
commands' KMP_BLOCKTIME=1 and with its default of 200 ms.
Prints one JSON line: per setting the median seconds quiet and loaded and their ratio.

    python -m benchmarks.generate_time --model bundles/tiny [--runs 3] [--settings default,threads1,...]
    python -m benchmarks.generate_time --model bundles/tiny --settings default,iomp,iomp_blocktime200 \
        --intel-openmp .../intel_openmp-*.data/data/lib/libiomp5.so
    python -m benchmarks.generate_time --smoke        # a small untrained bundle, one run each: the plumbing
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit

ROOT = Path(__file__).resolve().parent.parent
INTEL_OPENMP = "<--intel-openmp>"  # replaced by that option's path
# name -> (extra environment, extra arguments, changes to the bundle's stage configs {stage: {key: value}})
SETTINGS = {
    "default": ({}, [], {}),
    "threads1": ({"OMP_NUM_THREADS": "1"}, [], {}),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, [], {}),
    # libgomp's own spin before an idle thread sleeps, not the commands' GOMP_SPINCOUNT (cascade.process_defaults)
    "spin_long": ({"GOMP_SPINCOUNT": "300000"}, [], {}),
    # the commands' short spin whatever the load (where they find a free core per thread they spin 10,000)
    "spin3000": ({"GOMP_SPINCOUNT": "3000"}, [], {}),
    "sr1024_steps2": ({}, ["--steps", "sr1024=2"], {}),
    "tiles": ({}, [], {"sr1024": {"stream_rows": None}}),  # the sr1024 config before streaming (session 23)
    # sr1024 streamed in bands of 32 rows (its config until session 41) or 64 (since), whatever the bundle says
    "rows32": ({}, [], {"sr1024": {"stream_rows": 32}}),
    "rows64": ({}, [], {"sr1024": {"stream_rows": 64}}),
    # Intel's OpenMP (libiomp5, --intel-openmp) preloaded in place of torch's libgomp, as conda builds ship it:
    # with the commands' KMP_BLOCKTIME=1, and with its own default of 200 ms of spinning before an idle thread sleeps
    "iomp": ({"LD_PRELOAD": INTEL_OPENMP}, [], {}),
    "iomp_blocktime200": ({"LD_PRELOAD": INTEL_OPENMP, "KMP_BLOCKTIME": "200"}, [], {}),
}
NEEDS_INTEL_OPENMP = {name for name, (env, _, _) in SETTINGS.items() if INTEL_OPENMP in env.values()}


def bundle_variant(model: str, name: str, changes: dict, tmp: Path) -> str:
    """`model` itself, or with `changes` a bundle in `tmp` of links to its files whose changed stages get
    their own config.json (the weights stay links)."""
    if not changes:
        return model
    variant = tmp / f"bundle-{name}"
    variant.mkdir()
    for item in Path(model).iterdir():
        if item.name not in changes:
            (variant / item.name).symlink_to(item.resolve())
            continue
        (variant / item.name).mkdir()
        for file in item.iterdir():
            if file.name == "config.json":
                data = json.loads(file.read_text())
                data["config"].update(changes[item.name])
                (variant / item.name / file.name).write_text(json.dumps(data, indent=2))
            else:
                (variant / item.name / file.name).symlink_to(file.resolve())
    return str(variant)


def timed_generate(model: str, out: str, env: dict[str, str], args: list[str]) -> float:
    command = [sys.executable, "-m", "cascade.cli", "generate", "--prompt", "a red circle at the top left",
               "--model", model, "--until", "sr1024", "--num-images", "1", "--seed", "0", "--out", out,
               "--overwrite", "--quiet", *args]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model bundle (required unless --smoke)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per setting and load (default: %(default)s)")
    p.add_argument("--settings", help="comma-separated names from: " + ", ".join(SETTINGS)
                   + " (default: all; the iomp ones only with --intel-openmp)")
    p.add_argument("--intel-openmp", metavar="LIB", help="path of libiomp5.so (pip's intel-openmp wheel has it) "
                   "for the iomp settings")
    p.add_argument("--loads", default="quiet,loaded", help="quiet, loaded or both (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="a small untrained bundle, one run each")
    args = p.parse_args(argv)
    if args.settings is None:
        names = [n for n in SETTINGS if args.intel_openmp or n not in NEEDS_INTEL_OPENMP]
    else:
        names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    if NEEDS_INTEL_OPENMP & set(names) and not (args.intel_openmp and Path(args.intel_openmp).is_file()):
        p.error(f"settings {sorted(NEEDS_INTEL_OPENMP & set(names))} need --intel-openmp LIB, an existing libiomp5.so")
    loads = [x for x in args.loads.split(",") if x]
    if not loads or set(loads) - {"quiet", "loaded"}:
        p.error(f"--loads takes quiet, loaded or both; got '{args.loads}'")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from bundle_helpers import small_bundle

            model, args.runs = str(small_bundle(Path(tmp) / "bundle")), 1
        if model is None:
            p.error("--model is required unless --smoke")
        times: dict[str, dict[str, list[float]]] = {n: {"quiet": [], "loaded": []} for n in names}
        models = {n: bundle_variant(model, n, SETTINGS[n][2], Path(tmp)) for n in names}
        timed_generate(model, tmp, {}, [])  # warm the file cache once, untimed
        for _ in range(args.runs):
            for load in loads:
                busy = busy_process() if load == "loaded" else None
                try:
                    for name in names:
                        env, extra, _ = SETTINGS[name]
                        env = {k: args.intel_openmp if v == INTEL_OPENMP else v for k, v in env.items()}
                        times[name][load].append(timed_generate(models[name], tmp, env, extra))
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
    result = {"bench": "generate_time", "model": args.model or "smoke", "runs": args.runs, "cpus": os.cpu_count()}
    for name in names:
        result[name] = {f"{load}_s": round(statistics.median(times[name][load]), 2) for load in loads}
        if len(loads) == 2:
            result[name]["ratio"] = round(result[name]["loaded_s"] / result[name]["quiet_s"], 2)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
