"""Resumable checkpoints in `RUN/checkpoints/step-NNNNNN/`, written atomically by all ranks together.

    ds/                      DeepSpeed's own checkpoint: module, optimizer partitions (per rank)
    weights.safetensors      the full live weights, gathered from the ZeRO partitions
    ema.safetensors          the EMA of the trainable weights
    rng-rank<R>.safetensors  each rank's torch RNG states (CPU, and CUDA on a GPU)
    state.json               step, data position, world size, ZeRO stage (written last)

Everything is written into `.tmp-step-NNNNNN/` and renamed once every rank has finished, so a
killed run leaves either a whole checkpoint or none. Resuming with the same number of processes and
ZeRO stage restores everything through DeepSpeed; with another, DeepSpeed's optimizer partitions do
not fit, so the full weights and the EMA are loaded into the module before `deepspeed.initialize`
and the optimizer starts afresh. Only `state.json` and the safetensors files are read outside
DeepSpeed, so nothing of ours unpickles.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cascade.atomic_files import replace_dir, use_umask_mode, write_text_atomic
from cascade.training import distributed
from cascade.training.ema import EMA
from cascade.training.zero_params import GATHER_CHUNK, gathered, saved_form

KEEP = 2  # finished checkpoints kept; older ones are deleted to bound disk use
DS_TAG = "ds"
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class CheckpointState:
    step: int  # optimizer steps done
    micro_batches: int  # batches each rank has consumed (the reader's skip_batches on resume)
    world_size: int
    zero_stage: int
    ema_updates: int


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> tuple[Path, CheckpointState] | None:
    """The newest complete checkpoint of `run_dir`, or None."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))
                   and (p / "state.json").is_file())
    if not found:
        return None
    path = found[-1][1]
    return path, CheckpointState(**json.loads((path / "state.json").read_text()))


def full_state_dict(module: nn.Module, *, is_main: bool) -> dict[str, torch.Tensor]:
    """Every tensor of `module.state_dict()`, gathered from ZeRO-3 partitions (a collective), on rank 0.

    Other ranks get an empty dict. Tied weights come out as separate copies, as safetensors wants.
    """
    entries = list(module.state_dict(keep_vars=True).items())
    out: dict[str, torch.Tensor] = {}
    for start in range(0, len(entries), GATHER_CHUNK):
        chunk = entries[start:start + GATHER_CHUNK]
        with gathered([t for _, t in chunk if isinstance(t, nn.Parameter)]):
            if is_main:
                for name, t in chunk:
                    out[name] = saved_form(t, t.detach().to("cpu", copy=True).contiguous())
    return out


def save(run_dir: Path, engine, stage: nn.Module, ema: EMA, state: CheckpointState, *, is_main: bool) -> Path:
    """Write a checkpoint at `state.step` (every rank must call this); returns its final path.

    `stage` is the module inside `engine`, whose full weights go to weights.safetensors."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
    weights = full_state_dict(stage, is_main=is_main)
    rank = torch.distributed.get_rank()
    _save_file(rng_state(), tmp / f"rng-rank{rank}.safetensors")
    if is_main:
        _save_file(weights, tmp / "weights.safetensors")
        _save_file(ema.state_dict(), tmp / "ema.safetensors")
    distributed.barrier()
    if is_main:
        write_text_atomic(tmp / "state.json", json.dumps(asdict(state), indent=2) + "\n")
        replace_dir(tmp, final)
        _prune(root)
    distributed.barrier()
    return final


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))
    use_umask_mode(path)  # safetensors makes its files 0600; the rest of the checkpoint follows the umask


def remove_unfinished(run_dir: Path) -> None:
    """Delete the temporary directories of saves that a killed run never finished."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for path in root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)))
    for _, path in done[:-KEEP]:
        shutil.rmtree(path, ignore_errors=True)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "weights.safetensors"))


def load_ema(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "ema.safetensors"))


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states: the CPU's and, on a GPU, this rank's CUDA device's (dropout and
    the stages' noise draw from it there), so a resume on a GPU is as exact as on the CPU."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng(path: Path, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for it."""
    file = path / f"rng-rank{rank}.safetensors"
    if not file.is_file():
        return False
    set_rng_state(load_file(str(file)))
    return True


def load_deepspeed(path: Path, engine) -> None:
    """Module, optimizer and DeepSpeed's counters, for a resume with the same processes and ZeRO stage."""
    loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DS_TAG}")

