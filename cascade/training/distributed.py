"""The process group: the `deepspeed` launcher's environment, or one process under plain `python`.

DeepSpeed reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (or asks mpi4py); a plain
`python train_stage.py` has none, so they get one-process defaults with a free port. On CPU the
backend is gloo; each process gets its share of the cores for its torch threads.
"""
from __future__ import annotations

import atexit
import os
import socket
from dataclasses import dataclass

import torch


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
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // max(1, local_size))))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        atexit.register(_leave_process_group)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _leave_process_group() -> None:
    """At exit, while the interpreter is still whole, leave the process group.

    Left to interpreter teardown, gloo's worker threads can still be joinable when their owner is
    destroyed, and the C++ runtime aborts the finished process ("terminate called without an active
    exception", exit -6) now and then, failing a run that had exported its weights. It runs at exit,
    not when training returns, because DeepSpeed keeps its own groups and cannot set up again in a
    process that left (tests and benchmarks train several times in one process). No barrier: after
    an error the other ranks may never reach it.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any (so all ranks stop at the same step)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
