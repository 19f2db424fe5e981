"""The training engine in one process: schedule and EMA maths, a run whose loss falls, logs and
grids, resume after a signal reproducing an uninterrupted run, export -> load, and user errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from cascade.bundle import FORMAT_VERSION
from cascade.errors import ConfigError, UserError
from cascade.training.config import TrainConfig, load_run_config
from cascade.training.ema import EMA, ema_decay_at
from cascade.training.lr_schedule import learning_rate
from training_helpers import ROOT, read_jsonl, write_config, write_shards

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------- maths
def test_learning_rate_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [learning_rate(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, **kw) == pytest.approx(1.0)
    assert learning_rate(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert learning_rate(14, **kw) == pytest.approx(0.1)
    assert learning_rate(100, **kw) == pytest.approx(0.1)  # past the end: stays at the floor
    cosine = [learning_rate(s, **kw) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


def test_ema_follows_its_closed_form_and_skips_frozen_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    net[1].requires_grad_(False)
    w0 = net[0].weight.detach().clone()
    ema = EMA(net, decay=0.5)
    assert set(ema.state_dict()) == {"0.weight", "0.bias"}
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update()  # d1 = min(0.5, 2/11)
    d1 = ema_decay_at(0.5, 1)
    assert d1 == pytest.approx(2 / 11)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update()  # d2 = min(0.5, 3/12)
    d2 = ema_decay_at(0.5, 2)
    expected = d2 * (d1 * w0 + (1 - d1) * (w0 + 1)) + (1 - d2) * (w0 + 2)
    torch.testing.assert_close(ema.state_dict()["0.weight"], expected)
    assert ema_decay_at(0.5, 10**6) == 0.5


# ---------------------------------------------------------------------------------------------- config
def _yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_stage_configs_validate():
    paths = sorted((ROOT / "configs").glob("*/*.yaml"))
    assert paths
    for path in paths:
        run = load_run_config(path)
        # <stage>.yaml, or <stage>-<variant>.yaml (decoder-inpaint, decoder-imagen)
        assert isinstance(run.train, TrainConfig) and run.stage == path.stem.partition("-")[0]


def test_config_errors_name_the_key_and_the_file(tmp_path):
    good = yaml.safe_load(write_config(tmp_path / "good.yaml").read_text())
    cases = {
        "model.widht": {**good, "model": {"widht": 3}},
        "train.lr": {**good, "train": {**good["train"], "lr": "fast"}},
        "train.learning_rate": {**good, "train": {**good["train"], "learning_rate": 1.0}},
        "train.betas": {**good, "train": {**good["train"], "betas": [0.9, 1.5]}},
        "'extra'": {**good, "extra": 1},
    }
    for key, data in cases.items():
        path = _yaml(tmp_path / "bad.yaml", data)
        with pytest.raises(ConfigError) as err:
            load_run_config(path)
        assert key in str(err.value) and str(path) in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="--stage is 'prior'"):
        load_run_config(tmp_path / "good.yaml", stage="prior")
    with pytest.raises(UserError, match="unknown stage 'nope'"):
        load_run_config(_yaml(tmp_path / "s.yaml", {**good, "stage": "nope"}))


def _main(argv):
    from train_stage import main

    return main([str(a) for a in argv])


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    data = write_shards(tmp_path / "data", train=8, val=0)
    cfg = write_config(tmp_path / "c.yaml")
    base = ["--stage", "test_tiny_ae", "--config", cfg, "--data", data, "--run-dir", tmp_path / "run"]

    def error_of(argv):
        code = _main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "unknown stage 'nope'" in error_of(["--stage", "nope", *base[2:]])
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert "no shards" in error_of([*base[:4], "--data", tmp_path / "empty", *base[6:]])
    bad = _yaml(tmp_path / "bad.yaml", {"stage": "test_tiny_ae", "model": {"depth": 2}, "train": {}})
    assert "unknown key 'model.depth'" in error_of([*base[:3], bad, *base[4:]])
    (tmp_path / "ds.json").write_text('{"optimizer": {"type": "Adam"}}')
    assert "'optimizer'" in error_of([*base, "--deepspeed_config", tmp_path / "ds.json"])

    # A run dir that belongs to another config or stage.
    (tmp_path / "run").mkdir()
    recorded = load_run_config(cfg).as_dict()
    recorded["model"]["width"] = 4
    (tmp_path / "run" / "run.json").write_text(json.dumps(recorded))
    assert "model.width: 4 -> 8" in error_of(base)
    (tmp_path / "run" / "run.json").write_text('{"stage": "prior", "model": {}, "train": {}}')
    assert "belongs to stage 'prior'" in error_of(base)


def test_a_run_recorded_before_an_option_existed_resumes_while_the_option_keeps_its_default(tmp_path):
    from cascade.errors import UserError
    from cascade.training import run_dir as run_dirs
    from decoder import DecoderConfig
    from cascade.training.config import RunConfig, TrainConfig

    run = RunConfig("decoder", DecoderConfig(), TrainConfig(batch_size=4, lr=1e-3, max_steps=10), "new.yaml")
    defaults = run.defaults()
    assert defaults["model"]["attention_positions"] is False and defaults["train"]["betas"] == [0.9, 0.999]
    assert "lr" not in defaults["train"]  # required: no default to stand in
    old = run.as_dict()
    del old["model"]["attention_positions"], old["train"]["eval_at_end"]  # as a run from an older cascade
    (tmp_path / "run.json").write_text(json.dumps({**old, "source": "old.yaml"}))
    run_dirs.claim(tmp_path, run.as_dict(), "new.yaml", write=False, defaults=run.defaults())
    changed = run.as_dict()
    changed["model"]["attention_positions"] = True  # not what the old run trained with
    with pytest.raises(UserError, match="model.attention_positions: false -> true"):
        run_dirs.claim(tmp_path, changed, "new.yaml", write=False, defaults=run.defaults())
    with pytest.raises(UserError, match="attention_positions: null -> false"):  # without defaults: strict
        run_dirs.claim(tmp_path, run.as_dict(), "new.yaml", write=False)


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    import cascade.training.engine as engine

    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "train", interrupt)
    assert _main(["--stage", "test_tiny_ae", "--config", "c.yaml", "--data", tmp_path, "--run-dir", tmp_path]) == 130
    assert capsys.readouterr().err == "train_stage.py: aborted\n"


def test_cli_exit_code_is_2_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_stage.py"), "--stage", "nope", "--config", "x.yaml",
                           "--data", str(tmp_path), "--run-dir", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "nope" in proc.stderr


def test_a_finished_distributed_run_exits_without_interpreter_teardown(tmp_path):
    """Left to interpreter teardown, gloo can abort a finished 2-process run (exit -6, seen in CI).

    So the CLI ends such a process with os._exit, after Python's exit handlers and a flush: the
    handlers' output arrives, the code is kept, and no object is finalised.
    """
    data = write_shards(tmp_path / "data", train=8, val=0)
    cfg = write_config(tmp_path / "c.yaml", max_steps=2, log_every=1)
    probe = (
        "import atexit, sys, torch.distributed as dist\n"
        "from train_stage import main\n"
        "import training_helpers\n"
        "from cascade.training.distributed import exit_process\n"
        "class Finalised:\n"
        "    def __del__(self): print('interpreter teardown ran', flush=True)\n"
        "kept = Finalised()\n"
        # no newline and no flush: to a pipe it stays in the buffer unless exit_process flushes
        "atexit.register(lambda: sys.stdout.write('exit handlers ran'))\n"
        "code = main(sys.argv[1:])\n"
        "assert code == 0 and dist.is_initialized()\n"
        "exit_process(code + 7)\n"
    )
    argv = ["--stage", "test_tiny_ae", "--config", cfg, "--data", data, "--run-dir", tmp_path / "run"]
    # not this process's launcher variables: an in-process run earlier in the session set them, port included
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**env, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"})
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert proc.stdout.endswith("exit handlers ran")
    assert "interpreter teardown ran" not in proc.stdout


def test_runs_leave_no_shared_memory_segment_behind(tmp_path):
    """DeepSpeed's CPU shared-memory all-reduce is kept off: each run used to leave 66 MB in /dev/shm."""
    from deepspeed.comm import comm

    data = write_shards(tmp_path / "data", train=8, val=0)
    cfg = write_config(tmp_path / "c.yaml", max_steps=1, log_every=1)
    _train(tmp_path, "run", data, cfg)
    assert comm.cdb is not None and comm.cdb.shm_comm_op is None
    port = os.environ["MASTER_PORT"]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_exit_process_without_a_process_group_is_an_ordinary_exit():
    probe = (
        "from cascade.training.distributed import exit_process\n"
        "class Finalised:\n"
        "    def __del__(self): print('interpreter teardown ran', flush=True)\n"
        "kept = Finalised()\n"
        "exit_process(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "interpreter teardown ran" in proc.stdout


# ---------------------------------------------------------------------------------------------- runs
def _train(tmp_path, name, data, cfg, **kw):
    from cascade.training.engine import TrainArgs, train

    return train(TrainArgs(stage="test_tiny_ae", config=cfg, data=data, run_dir=tmp_path / name, **kw))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shapes"), train=48, val=8, per_shard=16)


def test_eval_at_end_false_skips_the_last_evaluation(tmp_path, data):
    cfg = write_config(tmp_path / "c.yaml", max_steps=4, log_every=2, eval_at_end=False)
    _train(tmp_path, "run", data, cfg)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4]
    assert not any(k.startswith("eval/") for r in records for k in r)


def test_checkpoint_and_export_files_follow_the_umask(tmp_path, data):
    """safetensors writes 0600; the checkpoint's and the export's weights get the mode DeepSpeed's files and
    every other file get, 0666 less the umask."""
    import stat

    cfg = write_config(tmp_path / "c.yaml", max_steps=2, log_every=1, eval_at_end=False)
    old = os.umask(0o027)
    try:
        _train(tmp_path, "run", data, cfg, export=tmp_path / "bundle")
    finally:
        os.umask(old)
    files = [p for root in (tmp_path / "run" / "checkpoints", tmp_path / "bundle") for p in root.rglob("*")
             if p.is_file()]
    assert {"weights.safetensors", "ema.safetensors", "rng-rank0.safetensors", "model.safetensors"} <= \
        {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o640" for p in files}


def test_loss_falls_over_30_steps_with_logs_grids_eval_and_export(tmp_path, data):
    from cascade.bundle import load_stage

    cfg = write_config(tmp_path / "c.yaml", max_steps=30, log_every=5, sample_every=15, eval_every=15,
                       ckpt_every=10)
    result = _train(tmp_path, "run", data, cfg, export=tmp_path / "bundle")
    run = tmp_path / "run"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert all({"loss", "lr", "samples_per_s"} <= set(r) for r in records)
    assert records[-1]["loss"] < 0.6 * records[0]["loss"], records
    assert records[-1]["eval/mse"] < records[2]["eval/mse"]  # eval at 15 and at the end
    assert records[2]["eval/count"] == 8
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000015.png", "step-000030.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000020", "step-000030"]
    assert any((run / "tensorboard").iterdir())
    assert result.step == 30 and not result.interrupted

    # The export holds the EMA weights, with the 0-d parameter back in its own shape.
    stage = load_stage(tmp_path / "bundle" / "test_tiny_ae")
    ema = load_file(str(run / "checkpoints" / "step-000030" / "ema.safetensors"))
    assert ema["gain"].shape == ()
    for name, value in ema.items():
        torch.testing.assert_close(stage.state_dict()[name], value, rtol=0, atol=0)
    assert not stage.training
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    again = load_stage(tmp_path / "bundle" / "test_tiny_ae")
    assert torch.equal(stage(x), again(x))
    manifest = yaml.safe_load((tmp_path / "bundle" / "cascade.json").read_text())
    assert manifest["stages"] == ["test_tiny_ae"] and manifest["format_version"] == FORMAT_VERSION


def test_a_time_budget_ends_the_run_like_max_steps_and_a_rerun_resumes(tmp_path, data):
    """--max-minutes: the step that crosses the budget is the last (checkpoint, export, not 'interrupted');
    the same run directory then resumes from it."""
    from cascade.bundle import load_stage

    cfg = write_config(tmp_path / "c.yaml", max_steps=30, log_every=1, ckpt_every=0, eval_at_end=False)
    first = _train(tmp_path, "run", data, cfg, max_minutes=1e-9, export=tmp_path / "bundle")
    assert (first.step, first.interrupted) == (1, False)
    assert first.export_dir is not None and load_stage(first.export_dir) is not None
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000001"]
    again = _train(tmp_path, "run", data, write_config(tmp_path / "c3.yaml", max_steps=3, log_every=1,
                                                         ckpt_every=0, eval_at_end=False))
    assert (again.start_step, again.step) == (1, 3)
    with pytest.raises(UserError, match="--max-minutes must be > 0"):
        _train(tmp_path, "other", data, cfg, max_minutes=0)


def test_export_of_a_run_trained_past_max_steps_is_refused_not_mislabelled(tmp_path, data):
    """A two-phase run (3 steps, then resumed to 5) asked again for its 3-step export: the step-3
    checkpoint is gone, so --export would write the 5-step weights; it is refused before any work, and the
    bundle exported at step 3 stays as it was. The same command without --export, or at max_steps 5, works."""
    cfg = lambda steps: write_config(tmp_path / f"c{steps}.yaml", max_steps=steps, log_every=1, ckpt_every=1,
                                     eval_at_end=False)
    bundle = tmp_path / "bundle"
    _train(tmp_path, "run", data, cfg(3), export=bundle)
    weights = sorted(bundle.rglob("*.safetensors"))
    before = {p: p.read_bytes() for p in weights}
    assert before and _train(tmp_path, "run", data, cfg(5)).step == 5
    with pytest.raises(UserError, match="trained to step 5, past max_steps 3: --export would write the step-5"):
        _train(tmp_path, "run", data, cfg(3), export=bundle)
    assert {p: p.read_bytes() for p in weights} == before
    assert _train(tmp_path, "run", data, cfg(3)).step == 5  # no export asked: "nothing to do", as before
    again = _train(tmp_path, "run", data, cfg(5), export=bundle)
    assert (again.start_step, again.step) == (5, 5) and again.export_dir is not None
    assert {p: p.read_bytes() for p in weights} != before


def test_sigterm_checkpoints_and_resume_reproduces_an_uninterrupted_run(tmp_path, data, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", max_steps=12, log_every=1, ckpt_every=5)
    straight = _train(tmp_path, "straight", data, cfg)
    assert straight.step == 12

    monkeypatch.setenv("CASCADE_TEST_SIGTERM_AT_CALL", "8")
    first = _train(tmp_path, "resumed", data, cfg)
    assert first.interrupted and first.step == 8 and first.start_step == 0
    monkeypatch.delenv("CASCADE_TEST_SIGTERM_AT_CALL")
    assert (tmp_path / "resumed" / "checkpoints" / "step-000008").is_dir()
    second = _train(tmp_path, "resumed", data, cfg)
    assert second.step == 12 and not second.interrupted and second.start_step == 8

    steps = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == list(range(1, 13))
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000012" / "weights.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-000012" / "weights.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    ea = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000012" / "ema.safetensors"))
    eb = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-000012" / "ema.safetensors"))
    for name in ea:
        torch.testing.assert_close(ea[name], eb[name], rtol=0, atol=1e-6)
    losses = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "straight" / "metrics.jsonl")}
    resumed = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")}
    assert all(math.isclose(losses[s], resumed[s], rel_tol=1e-5) for s in losses)


def test_grad_accumulation_equals_the_larger_batch(tmp_path, data):
    # The reader deals the same samples in the same order, so 2 x 8 and 1 x 16 make the same steps.
    big = write_config(tmp_path / "big.yaml", batch_size=16, grad_accum=1, max_steps=4, log_every=1)
    accum = write_config(tmp_path / "accum.yaml", batch_size=8, grad_accum=2, max_steps=4, log_every=1)
    _train(tmp_path, "big", data, big)
    _train(tmp_path, "accum", data, accum)
    a = load_file(str(tmp_path / "big" / "checkpoints" / "step-000004" / "weights.safetensors"))
    b = load_file(str(tmp_path / "accum" / "checkpoints" / "step-000004" / "weights.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    la = [r["loss"] for r in read_jsonl(tmp_path / "big" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_jsonl(tmp_path / "accum" / "metrics.jsonl")]
    assert lb == pytest.approx(la, rel=1e-5)
    state = json.loads((tmp_path / "accum" / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["micro_batches"] == 8


def test_a_non_finite_loss_skips_its_batch_and_too_many_in_a_row_stop_the_run(tmp_path, data, monkeypatch, capsys):
    cfg = write_config(tmp_path / "c.yaml", max_steps=6, log_every=3, max_nonfinite=3)
    monkeypatch.setenv("CASCADE_TEST_NAN_AT_CALLS", "2,3")
    result = _train(tmp_path, "run", data, cfg)
    assert result.step == 6 and not result.interrupted
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [3, 6] and all(math.isfinite(r["loss"]) for r in records)
    said = "".join(capsys.readouterr())
    assert "step 2: loss is nan" in said and "(2 in a row, the run stops at 3)" in said

    monkeypatch.setenv("CASCADE_TEST_NAN_AT_CALLS", "2-")
    with pytest.raises(UserError, match="3 non-finite losses in a row at step 2: the run diverged"):
        _train(tmp_path, "diverged", data, cfg)


def test_a_bf16_deepspeed_config_trains_a_real_stage_from_fp32_data(tmp_path):
    """DeepSpeed's bf16 casts the weights to bf16 while the data stay fp32 (the defect: every stage
    crashed on its first batch); three steps of the prior train, log finite losses and export."""
    from cascade.bundle import load_stage
    from cascade.training.engine import TrainArgs, train
    from prior.synthetic import write_shards as write_embedded

    dims = dict(embed_dim=16, token_dim=8, max_text_len=6)
    data = tmp_path / "data"
    write_embedded(data, 64, 8, shard_size=32, **dims)
    cfg = _yaml(tmp_path / "prior.yaml", {"stage": "prior", "model": {**dims, "width": 32, "depth": 1, "heads": 2},
                                          "train": {"batch_size": 8, "lr": 1e-3, "max_steps": 3, "log_every": 1,
                                                    "ckpt_every": 0, "sample_every": 0, "eval_at_end": False}})
    (tmp_path / "bf16.json").write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    result = train(TrainArgs(stage="prior", config=cfg, data=data, run_dir=tmp_path / "run",
                             deepspeed_config=tmp_path / "bf16.json", export=tmp_path / "bundle"))
    assert result.step == 3
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)
    stage = load_stage(tmp_path / "bundle" / "prior")
    assert all(p.dtype == torch.float32 for p in stage.parameters())  # the EMA copy is fp32
