"""benchmarks/gpu_check.py: --smoke runs every part on the CPU and reports numbers for each; the ~145M
decoder has a diffusers U-Net of its size to race; without a GPU or --smoke it stops with one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_the_peak_table_knows_the_usual_chips_and_says_null_for_the_rest():
    from benchmarks.gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA L4") == 121.0 and peak_tflops("NVIDIA L40S") == 362.0
    assert peak_tflops("NVIDIA A10G") is None and peak_tflops("Tesla V100-SXM2-16GB") is None
    assert peak_tflops(None) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_or_smoke_it_exits_2_with_one_line():
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0 and "--smoke" in done.stderr


def test_the_diffusers_unet_matches_the_140m_decoder_within_5_percent():
    from benchmarks.gpu_check import DECODER_140M, decoder_config, match_diffusers, n_params
    from decoder import Decoder

    config = decoder_config(DECODER_140M)
    with torch.device("meta"):
        ours = n_params(Decoder(config))
    kwargs, theirs = match_diffusers(ours, config)
    assert 135e6 <= ours <= 150e6
    assert abs(theirs / ours - 1) <= 0.05
    assert kwargs["sample_size"] == 64 and kwargs["cross_attention_dim"] == config.context_width


@pytest.mark.slow
def test_smoke_runs_every_part_on_the_cpu_and_reports_numbers(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=850)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert lines, done.stderr[-3000:]
    record = json.loads(lines[-1])
    assert json.loads(out.read_text().splitlines()[-1]) == record  # --out appends the same line
    parts = record["parts"]
    assert set(parts) == {"speed", "diffusers", "train", "generate", "tests"}
    failed = {name: part.get("error") for name, part in parts.items() if not part["ok"]}
    assert not failed and record["ok"] and done.returncode == 0, (failed, done.stderr[-3000:])
    assert all(part["seconds"] > 0 for part in parts.values())

    def fast(r):
        for mode in ("eager", "compiled"):
            assert r[mode]["samples_per_s"] > 0 and r[mode]["tflops"] > 0, r

    for name in ("tiny", "140m"):
        fast(parts["speed"]["models"][name])
    diffusers = parts["diffusers"]
    fast(diffusers)
    assert abs(diffusers["params"] / diffusers["ours_params"] - 1) <= 0.05
    assert diffusers["ours_params"] == parts["speed"]["models"]["140m"]["params"]
    assert all(v > 0 for v in diffusers["ours_over_diffusers"].values())
    stages = parts["train"]["stages"]
    assert set(stages) == {"clip", "prior", "decoder", "sr256", "sr1024"}
    for stage in stages.values():
        assert stage["ok"] and stage["samples_per_s"] > 0 and stage["s_per_step"] > 0, stage
    assert parts["generate"]["generate_s"] > 0 and parts["generate"]["images"] == 4
    assert parts["tests"]["passed"] > 0 and parts["tests"]["failed"] == 0
