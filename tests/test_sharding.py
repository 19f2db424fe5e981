"""Sharded inference (ZeRO-3 across 2 processes) gives the unsharded images."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_helpers import seeded_stage
from cascade.bundle import save_stage, write_manifest

ARGS = ["generate", "--prompt", "a red circle", "--until", "sr256", "--steps", "prior=3,decoder=3,sr256=2",
        "--num-images", "2", "--quiet"]


def _perturbed(stage):
    # Untrained stages zero-initialise their output layers; perturb every weight so images vary.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return stage


@pytest.mark.slow
def test_two_process_sharded_generate_matches_one_process(tmp_path):
    if shutil.which("deepspeed") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "deepspeed")):
        pytest.fail("the deepspeed launcher is not installed")
    bundle = tmp_path / "bundle"
    save_stage(seeded_stage("clip", embed_dim=32, head="linear", image_size=64, max_text_len=16), bundle / "clip")
    save_stage(_perturbed(seeded_stage("prior", embed_dim=32, token_dim=384, max_text_len=16, width=64, depth=2,
                                       heads=2)), bundle / "prior")
    save_stage(_perturbed(seeded_stage("decoder", clip_dim=32, text_dim=384, channels=32, channel_mult=[1, 2],
                                       num_res_blocks=1, attention_resolutions=[16], head_dim=8, patch_size=2)),
               bundle / "decoder")
    save_stage(_perturbed(seeded_stage("sr256", base_channels=16, channel_mults=[1, 2], num_res_blocks=[1, 1])),
               bundle / "sr256")
    write_manifest(bundle)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "cascade.cli", *ARGS, "--model", str(bundle),
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    two = subprocess.run([launcher, "--num_gpus", "2", "--master_port", "29613", "--module", "cascade.cli", *ARGS,
                          "--model", str(bundle), "--out", str(tmp_path / "two"), "--shard"],
                         capture_output=True, text=True, env=env, timeout=1500, cwd=tmp_path)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert "sharded across 2 ranks" in two.stderr + two.stdout
    held = (two.stderr + two.stdout).split("rank 0 holds ")[1].split(" of the weights")[0]
    assert all(int(part.split()[-1].rstrip("%")) < 100 for part in held.split(", ")), held
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 3
    for name in names:
        a = np.asarray(Image.open(tmp_path / "one" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "two" / name)).astype(int)
        assert a.shape == (256, 256, 3) or "grid" in name
        assert a.std() > 5  # real content, not a flat image
        assert np.abs(a - b).max() <= 2  # float tolerance, after 8-bit rounding
