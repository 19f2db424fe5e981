"""The process group: the `deepspeed` launcher's environment, or one process under plain `python`.

DeepSpeed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (or asks mpi4py); a plain
`python train_stage.py` has none, so they get one-process defaults with a free port. On CPU the
backend is gloo; each process gets its share of the cores for its torch threads (unless
OMP_NUM_THREADS is set).
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch

from cascade.process_defaults import limit_cpu_threads


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_defaults() -> None:
    """Fill in the launcher's variables for a one-process run; a launcher's own values win."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def setup() -> Dist:
    """Initialise torch.distributed through DeepSpeed (once per process) and split the CPU threads."""
    import deepspeed
    import torch.distributed as dist

    single_process_defaults()
    limit_cpu_threads()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            _without_shared_memory_all_reduce()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _without_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce.

    Training never calls it (only DeepSpeed's inference_all_reduce does), yet on CPU
    init_distributed JIT-compiles it with g++ (a lock left by a killed compile hangs every later
    run) and each process maps a 66 MB /dev/shm segment that nothing removes: 318 runs had left
    21 GB of this machine's 24 GB there. DeepSpeed reads the op's compatibility from one cached
    dict, so marking the op incompatible there makes it fall back to plain gloo.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def exit_process(code: int) -> NoReturn:
    """End a command-line process with `code`; one that joined a process group skips C++ teardown.

    Left to interpreter teardown, gloo's (or DeepSpeed's) C++ threads can still be joinable when
    their owners are destroyed, and the runtime aborts a finished rank ("terminate called without an
    active exception", exit -6: seen in CI on 2-process ZeRO-3 runs that had exported their weights,
    and still seen when the group was destroyed at exit). Everything a run writes is closed before
    `train` returns (checkpoints, metrics, the bundle, behind a barrier), so such a process runs
    Python's own exit handlers (logging, multiprocessing children, users' handlers), flushes its
    streams and leaves with os._exit, which runs no destructors. Not calling destroy_process_group:
    after an error the other ranks may never reach it.
    """
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and `--help` stays quick)
    if dist is None or not dist.is_initialized():
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: NCCL reduces CUDA tensors only (this
    rank's GPU), gloo CPU ones."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any (so all ranks stop at the same step)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
