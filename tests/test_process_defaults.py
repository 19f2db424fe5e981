"""Importing changes nothing process-wide; a command's `set_process_defaults()` keeps the hub offline
and sizes CPU threads, and what the user set in the environment wins."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade import process_defaults
from cascade.process_defaults import OFFLINE_VARIABLES, limit_cpu_threads, set_process_defaults

ROOT = Path(__file__).resolve().parents[1]
USER_SETTINGS = (*OFFLINE_VARIABLES, "OMP_NUM_THREADS", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "GOMP_SPINCOUNT",
                 "KMP_BLOCKTIME", "OMP_WAIT_POLICY")

# Every module of the packages (and the training script), in a fresh process where nothing is set.
IMPORT_EVERYTHING = """
import importlib, os, pkgutil, torch
torch.set_num_threads(1)  # not what the old import-time setting chose, so a change shows
threads, env = torch.get_num_threads(), dict(os.environ)
for package in ("cascade", "prior", "decoder", "superres", "benchmarks"):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
import train_stage
changed = {k for k in env.keys() | os.environ.keys() if env.get(k) != os.environ.get(k)}
assert not changed, f"importing changed {sorted(changed)}"
assert torch.get_num_threads() == threads, f"importing set {torch.get_num_threads()} threads"
"""


def test_importing_any_module_changes_neither_the_environment_nor_the_threads():
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def clean(monkeypatch):
    """No user settings, a CPU-only machine with 8 cores; torch's thread count restored afterwards."""
    for name in (*USER_SETTINGS, "DS_ACCELERATOR"):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores whatever a test (or the code) sets
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(process_defaults.os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    torch.set_num_threads(5)
    yield monkeypatch
    torch.set_num_threads(before)


def test_a_command_keeps_the_hub_offline_and_caps_cpu_threads(clean):
    set_process_defaults()
    assert all(os.environ[name] == "1" for name in OFFLINE_VARIABLES)
    assert torch.get_num_threads() == process_defaults.MAX_CPU_THREADS


def test_openmp_threads_spin_briefly_unless_the_user_chose_how_they_wait(clean):
    set_process_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == process_defaults.GOMP_SPIN_COUNT
    assert os.environ["KMP_BLOCKTIME"] == process_defaults.KMP_BLOCK_TIME
    clean.setenv("GOMP_SPINCOUNT", "50")
    clean.setenv("KMP_BLOCKTIME", "30")
    set_process_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == "50" and os.environ["KMP_BLOCKTIME"] == "30"
    clean.delenv("GOMP_SPINCOUNT")
    clean.delenv("KMP_BLOCKTIME")
    clean.setenv("OMP_WAIT_POLICY", "ACTIVE")
    set_process_defaults()
    assert "GOMP_SPINCOUNT" not in os.environ and "KMP_BLOCKTIME" not in os.environ


@pytest.mark.parametrize("idle, expected", [(2, process_defaults.GOMP_SPIN_COUNT_IDLE), (1, process_defaults.GOMP_SPIN_COUNT)])
def test_a_short_command_spins_longer_only_with_a_free_core_for_each_thread(clean, idle, expected):
    clean.setattr(process_defaults, "idle_cores", lambda: idle)  # MAX_CPU_THREADS = 2 threads on 8 cores
    set_process_defaults(short=True)
    assert os.environ["GOMP_SPINCOUNT"] == expected
    clean.delenv("GOMP_SPINCOUNT")
    set_process_defaults()  # a long run (training, serve) keeps the short spin: its load will change
    assert os.environ["GOMP_SPINCOUNT"] == process_defaults.GOMP_SPIN_COUNT
    clean.delenv("GOMP_SPINCOUNT")
    clean.setenv("OMP_NUM_THREADS", "1")  # one thread needs one free core
    set_process_defaults(short=True)
    assert os.environ["GOMP_SPINCOUNT"] == process_defaults.GOMP_SPIN_COUNT_IDLE


@pytest.mark.parametrize("runnable, idle", [(1, 2), (2, 1), (3, 0), (9, 0)])
def test_idle_cores_counts_the_runnable_threads_but_this_one(tmp_path, monkeypatch, runnable, idle):
    monkeypatch.setattr(process_defaults, "usable_cores", lambda: 2)
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.52 0.31 0.20 {runnable}/250 12345\n")
    assert process_defaults.idle_cores(loadavg=str(loadavg)) == idle
    assert process_defaults.idle_cores(loadavg=str(tmp_path / "missing")) == 0  # no kernel count: no core free


def test_a_busy_process_beside_takes_a_core_from_idle_cores():
    if not os.path.exists("/proc/loadavg"):
        pytest.skip("Linux only")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        assert process_defaults.idle_cores() <= process_defaults.usable_cores() - 1
    finally:
        busy.kill()
        busy.wait()


def test_the_cascade_command_sets_its_defaults_before_torch_loads_openmp():
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: `cascade` must set it before importing torch."""
    code = ("import sys; from cascade import process_defaults as pd; seen = []; original = pd.set_process_defaults\n"
            "def spy(**kw):\n    seen.append('torch' in sys.modules); original(**kw)\n"
            "pd.set_process_defaults = spy; sys.argv = ['cascade', '--help']\n"
            "from cascade import cli\n"
            "try:\n    cli.entry()\nexcept SystemExit:\n    pass\n"
            "print('torch imported first' if seen[0] else 'defaults first', file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.stderr.strip().endswith("defaults first"), proc.stderr[-2000:]


def test_the_users_own_settings_win(clean):
    clean.setenv("HF_HUB_OFFLINE", "0")
    clean.setenv("OMP_NUM_THREADS", "5")
    set_process_defaults()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert torch.get_num_threads() == 5


@pytest.mark.parametrize("local_size, threads", [(1, 2), (4, 2), (8, 1), (16, 1)])
def test_local_processes_share_the_cores(clean, local_size, threads):
    clean.setenv("LOCAL_SIZE", str(local_size))
    limit_cpu_threads()
    assert torch.get_num_threads() == threads


def test_threads_are_left_alone_on_a_cuda_machine(clean):
    clean.setattr(torch.cuda, "is_available", lambda: True)
    limit_cpu_threads()
    assert torch.get_num_threads() == 5


def test_deepspeed_is_told_it_runs_on_the_cpu_unless_there_is_a_gpu_or_a_choice(clean):
    set_process_defaults()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    clean.setenv("DS_ACCELERATOR", "xpu")
    set_process_defaults()
    assert os.environ["DS_ACCELERATOR"] == "xpu"
    clean.delenv("DS_ACCELERATOR")
    clean.setattr(torch.cuda, "is_available", lambda: True)
    set_process_defaults()
    assert "DS_ACCELERATOR" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed picks CUDA on a GPU machine and says nothing")
def test_a_cpu_run_starts_without_deepspeeds_accelerator_warning():
    code = ("from cascade.process_defaults import set_process_defaults; set_process_defaults(); "
            "from deepspeed.accelerator import get_accelerator; print(get_accelerator().device_name())")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "cpu" and "Setting accelerator to CPU" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("argv, short", [(["generate", "--prompt", "a cat"], True), (["vary", "--image", "x.png"], True),
                                         (["serve"], False), (["eval", "--data", "d"], False), (["--help"], False), ([], False)])
def test_the_cli_knows_its_short_commands(argv, short):
    from cascade.cli import _is_short

    assert _is_short(argv) is short
