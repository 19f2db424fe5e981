"""What a command sets for its whole process: no model-hub access, a thread count for CPU runs, OpenMP's
threads told to wait for work briefly, and DeepSpeed told that a machine without a GPU runs it on the CPU.

Importing any cascade module changes neither os.environ nor torch's threads; each entry point
(`cascade`, `train_stage.py`, the benchmarks) calls `set_process_defaults()` first, and what the
user set in the environment wins.
"""
from __future__ import annotations

import os

# huggingface_hub reads these once, when it is imported: set them before anything imports it
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
MAX_CPU_THREADS = 2  # per process, unless OMP_NUM_THREADS says otherwise
# how many times an idle OpenMP thread of torch's libgomp polls for work before it sleeps (its default, with no
# OMP_WAIT_POLICY: 300,000). A one-image `generate` beside one busy process: 6.20 s quiet, 16.57 loaded by
# default; 6.40 / 12.48 at 3,000; 6.77 / 10.60 at 1,000 (docs/results.md, 2026-12-07)
GOMP_SPIN_COUNT = "3000"
# ... and for a short command that starts with a core free for each of its threads: 4.77 s quiet against 5.21 at
# 3,000 (9 runs each); spinning longer gains nothing more (docs/results.md, 2026-12-07, session 36)
GOMP_SPIN_COUNT_IDLE = "10000"
# the same for Intel's and LLVM's OpenMP (libiomp5 / libomp: conda builds, macOS wheels): milliseconds an idle
# thread waits before it sleeps (their default: 200). A one-image `generate` under libiomp5 beside one busy
# process: 4.66 s quiet, 10.94 loaded by default; 4.77 / 7.82 at 1; 6.45 / 6.91 at 0 (docs/results.md, 2026-12-07)
KMP_BLOCK_TIME = "1"


def set_process_defaults(*, short: bool = False) -> None:
    """Call before torch is imported where possible: libgomp reads its settings once, when torch loads it.
    `short`: a command that runs for seconds (`cascade generate`), so the load when it starts is the load it
    runs under (see `wait_briefly_for_work`)."""
    keep_hub_offline()
    wait_briefly_for_work(short=short)
    limit_cpu_threads()
    name_cpu_accelerator()


def keep_hub_offline() -> None:
    """Nothing may reach a model hub at run time: every pretrained part ships in a package."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")


def wait_briefly_for_work(*, short: bool = False) -> None:
    """GOMP_SPINCOUNT=3000 (GNU OpenMP) and KMP_BLOCKTIME=1 (Intel's and LLVM's): idle OpenMP threads sleep
    after a short spin instead of a long one. Spinning threads take the cores from any other process that
    wants them, which is what made a command 2.5-2.7x slower beside one busy process. On a quiet machine the
    short spin costs a command of many small operations ~8% (a one-image `generate`), so a `short` command
    that finds a core free for each of its threads (`idle_cores`) spins 10,000 times: a spinning thread then
    takes no core another process is using. Each is untouched where the user set it or OMP_WAIT_POLICY.
    Effective in this process only if torch is not yet imported, and in every child process it starts."""
    if "OMP_WAIT_POLICY" not in os.environ:
        if "GOMP_SPINCOUNT" not in os.environ:
            idle = short and idle_cores() >= cpu_threads()
            os.environ["GOMP_SPINCOUNT"] = GOMP_SPIN_COUNT_IDLE if idle else GOMP_SPIN_COUNT
        os.environ.setdefault("KMP_BLOCKTIME", KMP_BLOCK_TIME)


def idle_cores(samples: int = 3, loadavg: str = "/proc/loadavg") -> int:
    """Cores this process may run on that nothing else is running on now, from the kernel's count of runnable
    threads (/proc/loadavg, this one included); the fewest busy over `samples` reads 1 ms apart, so one
    thread waking for a moment does not count. 0 where the kernel does not say (not Linux)."""
    import time

    runnable = []
    try:
        for i in range(samples):
            if i:
                time.sleep(0.001)
            with open(loadavg) as f:
                runnable.append(int(f.read().split()[3].split("/")[0]))
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, usable_cores() - (min(runnable) - 1))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def cpu_threads() -> int:
    """The torch threads `limit_cpu_threads` leaves this process on a CPU-only machine (OMP_NUM_THREADS wins)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, min(MAX_CPU_THREADS, (os.cpu_count() or 1) // local_processes()))


def local_processes() -> int:
    """How many processes of this run share the machine (the launcher's count; 1 under plain python)."""
    return max(1, int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def limit_cpu_threads() -> None:
    """On a CPU-only machine, give each local process its share of the cores, at most MAX_CPU_THREADS.

    Untouched when OMP_NUM_THREADS is set (the user's or the launcher's choice, which torch has
    already applied) and when CUDA is available (the CPU threads then only feed the GPU).
    """
    import torch

    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return
    torch.set_num_threads(cpu_threads())


def name_cpu_accelerator() -> None:
    """Without a GPU, tell DeepSpeed it runs on the CPU (DS_ACCELERATOR=cpu) before it is imported; left
    to detect that itself, it warns "Setting accelerator to CPU ..." at the start of every stage's run,
    which a CPU user can do nothing about. Untouched when DS_ACCELERATOR is set or CUDA is available."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
