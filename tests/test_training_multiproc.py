"""The engine across processes, as users launch it: `deepspeed --num_gpus 2` with ZeRO-2 and ZeRO-3
against one process, SIGKILL and resume, resume with another number of processes, and the CLIP stage.

Data parallelism is exact when every optimizer step sees the same samples: with 2 shards of 8
samples, one process at batch 16 and two at batch 8 (one shard each) both take full-batch steps,
so their weights may differ only by the order of float additions.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cascade.training.distributed import free_port
from training_helpers import ROOT, read_jsonl, write_config, write_shards

pytestmark = pytest.mark.slow

SUPPORT = str(ROOT / "tests" / "training_helpers.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def _run(argv, *, procs=1, timeout=900) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable, SUPPORT]
    else:
        cmd = [DEEPSPEED, "--master_port", str(free_port()), "--num_gpus", str(procs), SUPPORT]
    proc = subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _args(cfg, data, run, *extra):
    return ["--stage", "test_tiny_ae", "--config", cfg, "--data", data, "--run-dir", run, *extra]


def _weights(bundle):
    return load_file(str(Path(bundle) / "test_tiny_ae" / "model.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    data = write_shards(root / "data", train=16, val=4, per_shard=8)
    one = write_config(root / "one.yaml", batch_size=16, max_steps=8, log_every=2, ckpt_every=4,
                       sample_every=4, eval_every=4)
    two = write_config(root / "two.yaml", batch_size=8, max_steps=8, log_every=2, ckpt_every=4,
                       sample_every=4, eval_every=4)
    zero3 = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    # Partition even the tiny test parameters, so that the gathering paths really run.
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "zero3.json").write_text(json.dumps(zero3))
    _run(_args(one, data, root / "run1", "--export", root / "b1"))
    return root, data, two


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one(setup, zero):
    root, data, two = setup
    ds = ROOT / "configs" / "deepspeed" / "zero2.json" if zero == "zero2" else root / "zero3.json"
    _run(_args(two, data, root / f"run_{zero}", "--deepspeed_config", ds, "--export", root / f"b_{zero}"),
         procs=2)
    one, many = _weights(root / "b1"), _weights(root / f"b_{zero}")
    assert one.keys() == many.keys()
    for name in one:
        torch.testing.assert_close(many[name], one[name], rtol=1e-5, atol=1e-5)
    losses = [r["loss"] for r in read_jsonl(root / f"run_{zero}" / "metrics.jsonl")]
    reference = [r["loss"] for r in read_jsonl(root / "run1" / "metrics.jsonl")]
    assert losses == pytest.approx(reference, rel=1e-5)
    assert reference[-1] < reference[0]  # the weights compared have really trained
    optimizer_files = list((root / f"run_{zero}" / "checkpoints" / "step-000008" / "ds").glob("*optim_states.pt"))
    assert len(optimizer_files) == 2  # one partition per rank
    assert sorted(p.name for p in (root / f"run_{zero}" / "samples").iterdir()) == [
        "step-000004.png", "step-000008.png"]


def test_resume_with_another_number_of_processes(tmp_path):
    data = write_shards(tmp_path / "data", train=16, val=0, per_shard=8)
    cfg = write_config(tmp_path / "c.yaml", batch_size=4, max_steps=3, log_every=1)
    run = tmp_path / "run"
    _run(_args(cfg, data, run, "--deepspeed_config", ROOT / "configs" / "deepspeed" / "zero2.json"), procs=2)
    proc = _run(_args(cfg, data, run, "--max-steps", 6))
    out = proc.stdout + proc.stderr
    assert "written by 2 process(es) with ZeRO stage 2; now 1 with stage 0" in out
    assert "optimizer state restarts" in out
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    state = json.loads((run / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["world_size"] == 1 and state["micro_batches"] == 3 * 2 + 3  # samples seen carry over
    weights = load_file(str(run / "checkpoints" / "step-000003" / "weights.safetensors"))
    assert weights["gain"].shape == ()


def test_sigkill_resumes_from_the_last_checkpoint(tmp_path):
    data = write_shards(tmp_path / "data", train=32, val=0, per_shard=16)
    # Far more steps than the kill needs: a fast machine must not finish before it is killed.
    cfg = write_config(tmp_path / "c.yaml", max_steps=100_000, log_every=1, ckpt_every=5, batch_size=4)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SUPPORT, *map(str, _args(cfg, data, run))], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished():  # only two checkpoints are kept, so step-000010 itself may already be pruned
        root = run / "checkpoints"
        return [int(p.name.split("-")[1]) for p in root.glob("step-*")] if root.is_dir() else []

    deadline = time.time() + 600
    while max(finished(), default=0) < 10:
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = max(finished())
    assert last >= 10 and last % 5 == 0

    end = last + 7
    resumed = _run(_args(cfg, data, run, "--max-steps", end))
    assert f"resuming from step-{last:06d}" in resumed.stdout + resumed.stderr
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == list(range(1, end + 1))  # continuing, each step once
    assert json.loads((run / "checkpoints" / f"step-{end:06d}" / "state.json").read_text())["step"] == end


def test_ctrl_c_on_the_launcher_stops_both_ranks_at_one_checkpoint(tmp_path):
    # Ctrl-C in a terminal sends SIGINT to the launcher's whole process group.
    data = write_shards(tmp_path / "data", train=32, val=0, per_shard=16)
    cfg = write_config(tmp_path / "c.yaml", max_steps=5000, log_every=1, ckpt_every=1000, batch_size=4)
    run = tmp_path / "run"
    zero2 = ["--deepspeed_config", ROOT / "configs" / "deepspeed" / "zero2.json"]
    launcher = subprocess.Popen([DEEPSPEED, "--master_port", str(free_port()), "--num_gpus", "2", SUPPORT,
                                 *map(str, _args(cfg, data, run, *zero2))],
                                env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    deadline = time.time() + 600
    while not (run / "metrics.jsonl").is_file() or len(read_jsonl(run / "metrics.jsonl")) < 10:
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)
    out, _ = launcher.communicate(timeout=300)
    stopped = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
    assert len(stopped) == 1 and 10 <= stopped[0] < 1000, out[-2000:]
    assert f"interrupted at step {stopped[0]}" in out

    resumed = _run(_args(cfg, data, run, "--max-steps", stopped[0] + 3, *zero2), procs=2)
    assert f"resuming from step-{stopped[0]:06d}: weights, optimizer" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, stopped[0] + 4))


def test_clip_stage_trains_and_exports(tmp_path):
    from cascade.bundle import load_stage

    subprocess.run([sys.executable, "-m", "cascade.cli", "data", "build", "--source", "shapes", "--out",
                    str(tmp_path / "data"), "--count", "120", "--sizes", "64", "--seed", "0"],
                   check=True, capture_output=True, env=ENV, cwd=ROOT, timeout=600)
    config = yaml.safe_load((ROOT / "configs" / "tiny" / "clip.yaml").read_text())
    config["train"].update(batch_size=16, max_steps=6, warmup_steps=1, log_every=1, ckpt_every=0)
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, str(ROOT / "train_stage.py"), "--stage", "clip", "--config", str(tmp_path / "clip.yaml"),
           "--data", str(tmp_path / "data"), "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "b")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    assert "eval/i2t_r1" in records[-1]

    stage = load_stage(tmp_path / "b" / "clip")
    ema = load_file(str(tmp_path / "run" / "checkpoints" / "step-000006" / "ema.safetensors"))
    state = stage.state_dict()
    for name, value in ema.items():
        assert torch.equal(state[name], value), name
    assert json.loads((tmp_path / "b" / "cascade.json").read_text())["stages"] == ["clip"]
