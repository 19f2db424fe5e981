"""What a command sets for its whole process: no model-hub access, a thread count for CPU runs, and
DeepSpeed told that a machine without a GPU runs it on the CPU.

Importing any cascade module changes neither os.environ nor torch's threads; each entry point
(`cascade`, `train_stage.py`, the benchmarks) calls `set_process_defaults()` first, and what the
user set in the environment wins.
"""
from __future__ import annotations

import os

# huggingface_hub reads these once, when it is imported: set them before anything imports it
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
MAX_CPU_THREADS = 2  # per process, unless OMP_NUM_THREADS says otherwise


def set_process_defaults() -> None:
    keep_hub_offline()
    limit_cpu_threads()
    name_cpu_accelerator()


def keep_hub_offline() -> None:
    """Nothing may reach a model hub at run time: every pretrained part ships in a package."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")


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
    torch.set_num_threads(max(1, min(MAX_CPU_THREADS, (os.cpu_count() or 1) // local_processes())))


def name_cpu_accelerator() -> None:
    """Without a GPU, tell DeepSpeed it runs on the CPU (DS_ACCELERATOR=cpu) before it is imported; left
    to detect that itself, it warns "Setting accelerator to CPU ..." at the start of every stage's run,
    which a CPU user can do nothing about. Untouched when DS_ACCELERATOR is set or CUDA is available."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
