"""One GPU check of the whole cascade: training speed against the chip's peak and against diffusers,
every stage trained through train_stage.py, a 1024x1024 generation, and the device tests.

Parts (each timed; a part that fails records its error and the rest still run; exit code 1 if any
failed):

- `speed`: training samples/s, achieved TFLOP/s and the fraction of the chip's dense bf16 peak (a
  table by GPU name; null for an unknown GPU) of the tiny decoder (configs/tiny/decoder.yaml's
  model) and of a ~145M-parameter decoder (the tiny layout, wider: DECODER_140M), each eager and
  `torch.compile`d. FLOPs: torch's FlopCounterMode over one eager step (forward + backward).
- `diffusers`: diffusers' UNet2DConditionModel sized to the 140M decoder's parameter count (within
  5%; both counts printed), same batch, 64x64, cross-attention over as many tokens as wide as ours,
  the CLIP image embedding projected into the timestep embedding as ours, attention at the same
  feature sizes (16 and 8); trained the same way in this process; ours/diffusers speed ratios.
- `train`: `cascade data build --source shapes` + `cascade data embed` on a small set, then N steps
  of each stage (clip, prior, decoder, sr256, sr1024) through `train_stage.py` in a subprocess with a
  bf16 ZeRO-0 DeepSpeed config (fp32 with --smoke), exporting a tiny bundle; s/step from the run's
  metrics.jsonl (`samples_per_s`, the first logged window left out when there are more).
- `generate`: 4 images to 1024x1024 with that bundle in this process (`Cascade.from_bundle(device=,
  dtype=)`, `generate`): seconds and peak GPU memory (torch.cuda.max_memory_allocated).
- `tests`: `CASCADE_TEST_DEVICE=cuda pytest -m "not slow" tests/test_devices.py
  tests/test_stage_contract.py` in a subprocess: passed / failed counts.

Precision (`--precision`): `bf16-weights` (default on a GPU: the networks' weights in bf16, AdamW on
them, the diffusion maths in fp32, as a bf16 DeepSpeed run trains), `bf16-autocast` (fp32 weights
under torch.autocast) or `fp32` (--smoke's). Prints a readable table, then one JSON line.

    python benchmarks/gpu_check.py          # on one GPU; parts not started by --budget (420 s) fail
    python benchmarks/gpu_check.py --smoke  # every part on the CPU at tiny sizes, in three lanes at once
        [--out FILE] [--parts speed,diffusers,train,generate,tests] [--keep DIR] [--precision P]

Without a GPU and without --smoke it exits 2 and says so in one line.

On a lent GPU machine whose Python lacks this project's packages: `python benchmarks/gpu_carry.py pack`
here, carry `.cache/gpu_check`, and there `python3 benchmarks/gpu_carry.py unpack /tmp/site &&
PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py --out ...` (see benchmarks/gpu_carry.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python benchmarks/gpu_check.py`: the repo root on the path
    sys.path.insert(0, str(ROOT))

PARTS = ("speed", "diffusers", "train", "generate", "tests")
GPU_ORDER = ("tests", "speed", "diffusers", "train", "generate")  # the order they run in on a GPU
STAGES = ("clip", "prior", "decoder", "sr256", "sr1024")
PROMPTS = ("a red circle at the top left", "a big blue square below a small yellow triangle",
           "a green star in the center", "two small purple circles at the bottom")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendor's datasheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first. None: a
# chip whose peak we do not know (the A10G is not the A10), reported as null like any unknown name.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", None), ("A10", 125.0), ("RTX 4090", 165.0),
)

# The ~140M decoder: the tiny config's layout (2x2 space-to-depth stem, coordinate channels, attention
# positions, 4 image tokens, attention at 16 and 8) at width 160 with 4 levels: 145.2M parameters.
DECODER_140M = dict(channels=160, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_resolutions=[16, 8],
                    head_dim=80)
# --smoke's ~1M stand-in for it (the same layout at width 12: 0.94M; diffusers' match, 0.96M).
DECODER_SMOKE = dict(channels=12, channel_mult=[1, 2, 3, 4], num_res_blocks=2, attention_resolutions=[16, 8],
                     head_dim=12)


class Plan:
    """Sizes of one run: the GPU's, or --smoke's tiny ones for the CPU."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.batch = {"tiny": 2, "140m": 2} if smoke else {"tiny": 128, "140m": 128}
        self.warmup, self.steps = (1, 1) if smoke else (3, 15)
        self.large = DECODER_SMOKE if smoke else DECODER_140M
        self.compile_backend = "eager" if smoke else "inductor"  # smoke: dynamo tracing only
        self.data_count = 24 if smoke else 256
        self.train_steps = 2 if smoke else 200
        self.log_every = 1 if smoke else 50
        # smoke: small batches for the CPU; GPU: the tiny configs' own
        self.train_batch = {s: 2 for s in STAGES} if smoke else {}
        self.generate_steps = {"prior": 1, "decoder": 1, "sr256": 1, "sr1024": 1} if smoke else {}
        self.generate_runs = 1 if smoke else 2
        self.generate_until = "sr256" if smoke else "sr1024"
        # smoke: the tests that run a whole stage or the pipeline on the device, in both dtypes
        self.test_filter = "generate_runs_every_stage or bf16_weights_trains" if smoke else None
        self.subprocess_timeout = 300 if smoke else 240


# ---------------------------------------------------------------------------- small helpers
def peak_tflops(device_name: str | None) -> float | None:
    """The chip's dense bf16 peak from PEAK_BF16_TFLOPS, or None when the name is not in the table."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def sig(x: float | None, digits: int = 4) -> float | None:
    """`x` to `digits` significant digits (small CPU throughputs must not round to 0)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:500] if text else type(err).__name__


class Run:
    """The device, dtype policy and plan of this invocation, shared by the parts."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.torch = torch
        self.args = args
        self.plan = Plan(args.smoke)
        self.cuda = torch.cuda.is_available() and not args.smoke
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        self.device_name = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        self.peak = peak_tflops(self.device_name) if self.cuda else None
        self.precision = args.precision or ("bf16-weights" if self.cuda else "fp32")
        self.work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.bundle = self.work / "bundle"  # the train part writes it, the generate part reads it
        self.given_bundle = Path(args.bundle) if args.bundle else None
        self.results: dict[str, Any] = {}
        self.deadline: float | None = None  # perf_counter time after which no part starts

    def timeout(self) -> float:
        """A child's time limit: the plan's, cut to the budget left plus a minute's grace."""
        limit = float(self.plan.subprocess_timeout)
        if self.deadline is not None:
            limit = min(limit, max(30.0, self.deadline + 60.0 - time.perf_counter()))
        return limit

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    @property
    def weights_dtype(self):
        return self.torch.bfloat16 if self.precision == "bf16-weights" else self.torch.float32

    def autocast(self):
        import contextlib

        if self.precision == "bf16-autocast":
            return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def env(self, **extra: str) -> dict[str, str]:
        """The children's environment: the repo importable without an install, the hub offline, and none
        of this process's process-group variables (a parent that trained in-process, as a test session
        may have, leaves MASTER_PORT pointing at a port it still holds)."""
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        if self.plan.smoke:  # three lanes share two cores: one thread each, no OpenMP spinning over another's
            env["OMP_NUM_THREADS"] = "1"
        env.update(extra)
        return env


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


# ---------------------------------------------------------------------------- timing one training step
def measure_training(run: Run, step: Callable[[], Any], *, flops: int, batch: int, compiled: bool,
                     warmup: int) -> dict[str, Any]:
    """Seconds per training step over `plan.steps` steps after `warmup` untimed ones (the first of which
    compiles, for a compiled model), and what follows from them."""
    plan = run.plan
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    run.sync()
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(plan.steps):
        step()
    run.sync()
    step_s = (time.perf_counter() - started) / plan.steps
    tflops = flops / step_s / 1e12
    out = {"step_s": sig(step_s), "samples_per_s": sig(batch / step_s), "tflops": sig(tflops),
           "fraction_of_peak": sig(tflops / run.peak, 3) if run.peak else None,
           # compiled: the first warm-up step compiles the forward and backward graphs
           ("compile_s" if compiled else "warmup_s"): round(warm_s, 2)}
    return out


def make_optimizer(run: Run, params):
    torch = run.torch
    kwargs = {"fused": True} if run.cuda else {}
    return torch.optim.AdamW(params, lr=1e-4, **kwargs)


def train_both_ways(run: Run, module, loss_fn: Callable[[], Any], compile_target, batch: int) -> dict[str, Any]:
    """Eager, then `torch.compile`d (compile_target compiled in place), steps of `loss_fn` with AdamW.
    FLOPs: FlopCounterMode over the first eager step, the first warm-up step (it counts the forward and
    backward matmuls, convolutions and attention; AdamW's element-wise updates count 0)."""
    from benchmarks.common import count_flops

    torch = run.torch
    opt = make_optimizer(run, [p for p in module.parameters() if p.requires_grad])

    def step():
        with run.autocast():
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    started = time.perf_counter()
    flops = count_flops(step)
    run.sync()
    first_s = time.perf_counter() - started
    out: dict[str, Any] = {"params": n_params(module), "batch": batch, "gflop_per_step": sig(flops / 1e9),
                           "gflop_per_sample": sig(flops / batch / 1e9)}
    out["eager"] = measure_training(run, step, flops=flops, batch=batch, compiled=False,
                                    warmup=run.plan.warmup - 1)
    out["eager"]["first_step_s"] = round(first_s, 3)
    torch._dynamo.reset()
    compile_target.compile(backend=run.plan.compile_backend)
    out["compiled"] = measure_training(run, step, flops=flops, batch=batch, compiled=True, warmup=run.plan.warmup)
    out["compiled"]["backend"] = run.plan.compile_backend
    return out


def decoder_config(overrides: dict[str, Any]):
    import yaml

    from decoder import DecoderConfig

    tiny = yaml.safe_load((ROOT / "configs/tiny/decoder.yaml").read_text())["model"]
    return DecoderConfig(**{**tiny, **overrides})


def decoder_batch(run: Run, config, b: int) -> dict[str, Any]:
    from benchmarks.decoder_speed import batch_for

    torch = run.torch
    batch = batch_for(config, b, torch.Generator().manual_seed(0))
    return {k: v.to(run.device) for k, v in batch.items()}


def measure_ours(run: Run, overrides: dict[str, Any], b: int) -> dict[str, Any]:
    from decoder import Decoder

    torch = run.torch
    config = decoder_config(overrides)
    torch.manual_seed(0)
    stage = Decoder(config).to(run.device, run.weights_dtype).train()
    batch = decoder_batch(run, config, b)
    out = train_both_ways(run, stage, lambda: stage.loss(batch), stage.unet, b)
    del stage
    return out


# ---------------------------------------------------------------------------- part: speed
def part_speed(run: Run) -> dict[str, Any]:
    plan = run.plan
    models = {}
    for name, overrides in (("tiny", {}), ("140m", plan.large)):
        models[name] = measure_ours(run, overrides, plan.batch[name])
        if plan.smoke and name == "140m":
            models[name]["smoke_stand_in"] = True  # DECODER_SMOKE, not DECODER_140M
        release(run)
    return {"models": models}


def release(run: Run) -> None:
    import gc

    gc.collect()
    run.torch._dynamo.reset()
    if run.cuda:
        run.torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- part: diffusers
def import_diffusers():
    """diffusers' UNet2DConditionModel (the test extra's; imported here only). Its import pulls in
    transformers' image code, hence torchvision and the shim for this machine's CPU torch."""
    from cascade._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its advice on casting with .to() concerns loading pretrained weights
    return UNet2DConditionModel


def diffusers_head_dim(width: int, config) -> int | None:
    """The attention head size for base width `width`: 64 (diffusers' usual) where it divides both attention
    levels' widths (3 and 4 times the base), else ours' head_dim where that does; None: neither."""
    for head in (64, config.head_dim):
        if (3 * width) % head == 0 and (4 * width) % head == 0:
            return head
    return None


def diffusers_kwargs(width: int, layers: tuple[int, ...], config) -> dict[str, Any]:
    """A 4-level UNet2DConditionModel at 64x64 (levels 64/32/16/8, widths 1-2-3-4 times `width`) with
    cross-attention at 16 and 8 (the feature sizes ours attends at), ours' context width and CLIP
    embedding size (projected into the timestep embedding, as ours does)."""
    widths = tuple(width * m for m in (1, 2, 3, 4))
    groups = max(g for g in range(1, 33) if width % g == 0)
    head = diffusers_head_dim(width, config)
    return dict(sample_size=config.image_size, in_channels=3, out_channels=3, block_out_channels=widths,
                layers_per_block=layers, norm_num_groups=groups,
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                cross_attention_dim=config.context_width,
                # diffusers' attention_head_dim of this class is the number of heads
                attention_head_dim=tuple(max(1, w // head) for w in widths),
                class_embed_type="projection", projection_class_embeddings_input_dim=config.clip_dim)


LAYER_CHOICES = ((2, 2, 2, 2), (2, 2, 3, 2), (3, 3, 2, 2), (2, 3, 3, 2), (2, 2, 2, 3), (3, 3, 3, 2),
                 (2, 2, 2, 1), (2, 2, 1, 1), (1, 2, 2, 2), (1, 1, 2, 2), (3, 3, 3, 3))


def match_diffusers(target: int, config) -> tuple[dict[str, Any], int]:
    """The UNet2DConditionModel configuration (base width, blocks per level) whose parameter count is
    nearest `target`, counted on the meta device. Widths step by 32 (GroupNorm's 32 groups) for large
    models, by 4 for --smoke's small ones (see diffusers_head_dim for the heads)."""
    import torch

    UNet2DConditionModel = import_diffusers()
    step = 32 if config.channels >= 64 else 4
    widths = [w for w in range(step, 3 * config.channels, step) if diffusers_head_dim(w, config)]
    best = None
    for width in widths:
        for layers in LAYER_CHOICES:
            kwargs = diffusers_kwargs(width, layers, config)
            with torch.device("meta"):
                count = n_params(UNet2DConditionModel(**kwargs))
            if best is None or abs(count - target) < abs(best[1] - target):
                best = (kwargs, count)
        if best and best[1] > 1.3 * target:
            break
    return best


def part_diffusers(run: Run) -> dict[str, Any]:
    import torch.nn.functional as F

    from cascade import diffusion
    from decoder import Decoder

    torch = run.torch
    plan = run.plan
    UNet2DConditionModel = import_diffusers()
    config = decoder_config(plan.large)
    with torch.device("meta"):
        ours_params = n_params(Decoder(config))
    kwargs, _ = match_diffusers(ours_params, config)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**kwargs).to(run.device, run.weights_dtype).train()
    params = n_params(unet)

    b = plan.batch["140m"]
    g = torch.Generator().manual_seed(0)
    dtype = run.weights_dtype
    tokens = 32 + config.image_tokens  # ours attends to the text tokens and the image tokens
    x0 = (torch.rand(b, 3, config.image_size, config.image_size, generator=g) * 2 - 1).to(run.device)
    context = torch.randn(b, tokens, config.context_width, generator=g).to(run.device, dtype)
    mask = (torch.arange(tokens)[None].expand(b, tokens) < 12 + config.image_tokens).to(run.device)
    clip_image = F.normalize(torch.randn(b, config.clip_dim, generator=g), dim=-1).to(run.device, dtype)
    schedule = diffusion.NoiseSchedule.from_name(config.schedule, config.timesteps)
    alpha_bar = schedule.alphas_cumprod.to(run.device, torch.float32)

    def loss_fn():
        # eps prediction on the same cosine schedule; the diffusion maths in fp32, as ours
        t = torch.randint(0, config.timesteps, (b,), device=run.device)
        noise = torch.randn_like(x0)
        a = alpha_bar[t].view(b, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = unet(x_t.to(dtype), t, context, class_labels=clip_image, encoder_attention_mask=mask).sample
        return F.mse_loss(out.float(), noise)

    out = train_both_ways(run, unet, loss_fn, unet, b)
    out.update(ours_params=ours_params, param_ratio=sig(params / ours_params, 4),
               within_5pct=abs(params / ours_params - 1) <= 0.05,
               config={k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})
    ours = run.results.get("speed", {}).get("models", {}).get("140m")
    if ours:
        out["ours_over_diffusers"] = {
            mode: sig(ours[mode]["samples_per_s"] / out[mode]["samples_per_s"], 3) for mode in ("eager", "compiled")}
    del unet
    release(run)
    if not out["within_5pct"]:
        raise CheckFailed(out, f"diffusers has {params} parameters, ours {ours_params}: not within 5%")
    return out


class CheckFailed(Exception):
    """A part ran but its result misses what it checks; `result` is still recorded."""

    def __init__(self, result: dict[str, Any], message: str):
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------------------- part: train
def stage_config(run: Run, stage: str) -> Path:
    """configs/tiny/<stage>.yaml for this run: no sample grids, evaluations or intermediate checkpoints,
    logging every plan.log_every steps; --smoke's small batches."""
    import yaml

    plan = run.plan
    data = yaml.safe_load((ROOT / "configs" / "tiny" / f"{stage}.yaml").read_text())
    train = data["train"]
    train.update(log_every=plan.log_every, sample_every=0, eval_every=0, eval_at_end=False, ckpt_every=0)
    if stage in plan.train_batch:
        train["batch_size"] = plan.train_batch[stage]
    if "warmup_steps" in train:
        train["warmup_steps"] = min(train["warmup_steps"], plan.train_steps)
    path = run.work / "configs" / f"{stage}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def deepspeed_json(run: Run) -> Path:
    config: dict[str, Any] = {"zero_optimization": {"stage": 0}}
    if run.cuda:
        config["bf16"] = {"enabled": True}
    path = run.work / "deepspeed.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def child(run: Run, cmd: list[str], log: Path) -> float:
    """Run `cmd` from the repo root with its output in `log`; seconds taken. A failure raises with the
    log's last line."""
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=run.env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=run.timeout())
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        raise RuntimeError(f"exit {done.returncode} after {seconds:.0f}s: {tail[0][:300]} (log: {log})")
    return seconds


def stage_speed(run_dir: Path, batch: int) -> dict[str, Any]:
    """Samples/s of a finished run from its metrics.jsonl: the median of the logged windows, the first
    (start-up, compilation of kernels) left out when there are more."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    if not speeds:
        raise RuntimeError(f"{run_dir / 'metrics.jsonl'} has no samples_per_s")
    steady = speeds[1:] or speeds
    sps = statistics.median(steady)
    return {"samples_per_s": sig(sps), "s_per_step": sig(batch / sps), "windows": len(speeds),
            "final_loss": sig(rows[-1].get("loss")), "steps": rows[-1]["step"]}


def part_train(run: Run) -> dict[str, Any]:
    import yaml

    plan = run.plan
    cli = [sys.executable, "-m", "cascade.cli"]
    data, logs = run.work / "data", run.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in (run.bundle, data):  # a fresh set: `data build --overwrite` keeps embeddings.json, whose
        if old.exists():            # record would make `data embed` skip the rebuilt shards
            shutil.rmtree(old)
    out: dict[str, Any] = {"steps": plan.train_steps, "data_count": plan.data_count,
                           "precision": "bf16 (DeepSpeed)" if run.cuda else "fp32", "stages": {}}
    out["data_build_s"] = round(child(run, cli + ["data", "build", "--source", "shapes", "--out", str(data),
                                                  "--count", str(plan.data_count), "--sizes", "64,256,1024",
                                                  "--seed", "0"], logs / "data-build.log"), 2)
    ds = deepspeed_json(run)
    failed = []
    for stage in STAGES:
        if run.deadline is not None and time.perf_counter() > run.deadline:
            out["stages"][stage] = {"ok": False, "error": f"not started: past the --budget of {run.args.budget:.0f}s"}
            failed.append(stage)
            continue
        if stage == "prior":  # the stages after the CLIP read its embeddings
            try:
                out["embed_s"] = round(child(run, cli + ["data", "embed", "--data", str(data), "--clip",
                                                         str(run.bundle / "clip"), "--device", run.device.type],
                                             logs / "data-embed.log"), 2)
            except Exception as err:  # noqa: BLE001 - recorded; the SR stages need no embeddings
                out["embed_error"] = one_line(err)
                failed.append("embed")
        config = stage_config(run, stage)
        batch = yaml.safe_load(config.read_text())["train"]["batch_size"]
        run_dir = run.work / "runs" / stage
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cmd = [sys.executable, str(ROOT / "train_stage.py"), "--stage", stage, "--config", str(config),
               "--data", str(data), "--run-dir", str(run_dir), "--max-steps", str(plan.train_steps),
               "--deepspeed_config", str(ds), "--export", str(run.bundle)]
        try:
            seconds = child(run, cmd, logs / f"train-{stage}.log")
            out["stages"][stage] = {"ok": True, "seconds": round(seconds, 2), "batch_size": batch,
                                    **stage_speed(run_dir, batch)}
        except Exception as err:  # noqa: BLE001 - one stage's failure is recorded, the next ones run
            out["stages"][stage] = {"ok": False, "error": one_line(err)}
            failed.append(stage)
    if failed:
        raise CheckFailed(out, f"failed: {', '.join(failed)}")
    return out


# ---------------------------------------------------------------------------- part: generate
def part_generate(run: Run) -> dict[str, Any]:
    from cascade.pipeline import Cascade, Settings

    torch = run.torch
    bundle = run.bundle if "train" in run.args.parts or not run.given_bundle else run.given_bundle
    if not (bundle / "cascade.json").is_file():
        raise RuntimeError(f"no bundle at {bundle}: the train part makes it (run it too, or pass --bundle)")
    dtype = "bfloat16" if run.cuda else "float32"
    started = time.perf_counter()
    cascade = Cascade.from_bundle(bundle, device=run.device, dtype=dtype)
    load_s = time.perf_counter() - started
    settings = Settings(steps=dict(run.plan.generate_steps))
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    result = None
    for i in range(run.plan.generate_runs):
        run.sync()
        started = time.perf_counter()
        result = cascade.generate(list(PROMPTS), seed=i, until=run.plan.generate_until, settings=settings)
        run.sync()
        times.append(time.perf_counter() - started)
    final = result.final
    out = {"bundle": str(bundle), "until": run.plan.generate_until, "images": final.shape[0], "size": final.shape[-1], "dtype": dtype, "load_s": round(load_s, 2),
           # the generation alone (this part's "seconds" also counts loading the bundle); the first run
           # includes cuDNN's autotuning, the later ones are warm
           "generate_s": round(times[0], 3), "generate_s_per_run": [round(t, 3) for t in times],
           "steps": {name: Settings(steps=dict(run.plan.generate_steps)).for_stage(name, stage)["steps"]
                     for name, stage in cascade.stages.items()},
           "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if run.cuda else None}
    if not torch.isfinite(final).all():
        raise CheckFailed(out, "the generated images hold non-finite values")
    return out


# ---------------------------------------------------------------------------- part: tests
def part_tests(run: Run) -> dict[str, Any]:
    device = "cuda" if run.cuda else "cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
           "tests/test_devices.py", "tests/test_stage_contract.py"]
    if run.plan.test_filter:
        cmd += ["-k", run.plan.test_filter]
    log = run.work / "logs" / "pytest.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=run.env(CASCADE_TEST_DEVICE=device), stdout=f,
                              stderr=subprocess.STDOUT, timeout=run.timeout())
    text = log.read_text(errors="replace")
    counts = {key: 0 for key in ("passed", "failed", "errors", "skipped")}
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", ln)]
    for count, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary[-1] if summary else ""):
        counts["errors" if word.startswith("error") else word] = int(count)
    out = {"device": device, "k": run.plan.test_filter, "returncode": done.returncode, "pytest_s": round(time.perf_counter() - started, 2),
           **counts}
    if done.returncode != 0 or counts["passed"] == 0:
        failing = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:5]
        out["failing"] = failing
        raise CheckFailed(out, f"pytest exit {done.returncode}: {counts['failed']} failed, "
                               f"{counts['errors']} errors (log: {log})")
    return out


# ---------------------------------------------------------------------------- the report
def table(record: dict[str, Any]) -> str:
    lines = [f"gpu_check on {record['device']} ({record['precision']}; peak bf16 "
             f"{record['peak_bf16_tflops'] or 'unknown'} TFLOP/s; torch {record['torch']})"]
    parts = record["parts"]

    def speed_rows(name, r):
        for mode in ("eager", "compiled"):
            m = r.get(mode)
            if m:
                frac = "-" if m.get("fraction_of_peak") is None else f"{100 * m['fraction_of_peak']:.1f}%"
                lines.append(f"  {name:<14} {mode:<9} {r['params'] / 1e6:8.2f}M  batch {r['batch']:<4} "
                             f"{m['samples_per_s']:>10.2f} samples/s  {m['tflops']:>9.4g} TFLOP/s  {frac:>6} of peak")

    for name, part in parts.items():
        status = "ok" if part["ok"] else f"FAILED: {part.get('error', '')}"
        lines.append(f"[{name}] {part['seconds']:.1f}s {status}")
        if name == "speed":
            for model, r in part.get("models", {}).items():
                speed_rows(f"ours {model}", r)
        elif name == "diffusers" and "params" in part:
            speed_rows("diffusers", part)
            lines.append(f"  parameters: diffusers {part['params']:,} / ours {part['ours_params']:,} "
                         f"= {part['param_ratio']}")
            if "ours_over_diffusers" in part:
                lines.append(f"  ours / diffusers samples/s: {part['ours_over_diffusers']} (target >= 1.3)")
        elif name == "train":
            for stage, r in part.get("stages", {}).items():
                if r.get("ok"):
                    lines.append(f"  {stage:<8} {r['steps']:>4} steps  batch {r['batch_size']:<3} "
                                 f"{r['s_per_step']:.4g} s/step  {r['samples_per_s']:.4g} samples/s  "
                                 f"(run {r['seconds']:.1f}s)")
                else:
                    lines.append(f"  {stage:<8} FAILED: {r.get('error')}")
        elif name == "generate" and "generate_s_per_run" in part:
            mem = part.get("peak_memory_gib")
            lines.append(f"  {part['images']} images to {part['size']}^2: {part['generate_s_per_run']} s"
                         + (f", peak memory {mem} GiB" if mem is not None else ""))
        elif name == "tests" and "passed" in part:
            lines.append(f"  {part['passed']} passed, {part['failed']} failed, {part['errors']} errors, "
                         f"{part['skipped']} skipped on {part['device']}")
    lines.append(f"total {record['total_seconds']:.1f}s; {'all parts ok' if record['ok'] else 'SOME PARTS FAILED'}")
    return "\n".join(lines)


RUNNERS = {"speed": part_speed, "diffusers": part_diffusers, "train": part_train, "generate": part_generate,
           "tests": part_tests}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes (< ~1 min)")
    p.add_argument("--out", type=Path, help="append the JSON line to this file")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--precision", choices=("bf16-weights", "bf16-autocast", "fp32"),
                   help="the speed parts' precision (default: bf16-weights on a GPU, fp32 with --smoke)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which parts not yet started are skipped (and fail); default 420 on a "
                        "GPU, none with --smoke")
    p.add_argument("--bundle", metavar="DIR", help="the generate part's bundle when the train part does not "
                                                   "run (default: the one the train part exports)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (data, runs, bundle, logs); "
                                                 "default: a temporary folder, removed at the end")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if args.budget is None and not args.smoke:
        args.budget = 420.0
    unknown = [s for s in args.parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def run_part(run: Run, name: str) -> dict[str, Any]:
    """One part, timed and caught: its result with ok, seconds and, when it failed, error."""
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if run.deadline is not None and t0 > run.deadline:
        result, error = {}, f"not started: the run passed its --budget of {run.args.budget:.0f}s"
    else:
        try:
            result, error = RUNNERS[name](run), None
        except CheckFailed as err:
            result, error = err.result, str(err)
        except Exception as err:  # noqa: BLE001 - every part's failure is recorded and the next runs
            traceback.print_exc()
            result, error = {}, one_line(err)
    run.results[name] = result
    part = {**result, "ok": error is None, "seconds": round(time.perf_counter() - t0, 2)}
    if error is not None:
        part["error"] = error
    print(f"gpu_check: {name} {'ok' if error is None else 'FAILED: ' + error} ({part['seconds']:.1f}s)",
          file=sys.stderr, flush=True)
    return part


def run_parts(run: Run, names: list[str]) -> dict[str, Any]:
    """On a GPU, the parts one after another (so that no part's timing disturbs another's), the short
    tests first so that --budget never cuts them; with --smoke, to fit its minute on two cores, three
    lanes at once: the tests (a subprocess), the train then generate parts, and the speed then diffusers
    parts."""
    if not run.plan.smoke:
        done = {name: run_part(run, name) for name in GPU_ORDER if name in names}
        return {name: done[name] for name in PARTS if name in done}
    import threading

    lanes = [[n for n in ("tests",) if n in names], [n for n in ("train", "generate") if n in names],
             [n for n in ("speed", "diffusers") if n in names]]
    parts: dict[str, Any] = {}

    def lane(ordered: list[str]) -> None:
        for name in ordered:
            parts[name] = run_part(run, name)

    threads = [threading.Thread(target=lane, args=(ordered,)) for ordered in lanes[:-1] if ordered]
    for t in threads:
        t.start()
    lane(lanes[-1])
    for t in threads:
        t.join()
    return {name: parts[name] for name in PARTS if name in parts}


def main(argv: list[str] | None = None) -> int:
    from cascade.process_defaults import set_process_defaults

    set_process_defaults()
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch sees none); pass --smoke to run every part on the CPU "
              "at tiny sizes", file=sys.stderr)
        return 2
    run = Run(args)
    if args.smoke:
        torch.set_num_threads(1)  # see Run.env
    if run.cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    run.deadline = started + args.budget if args.budget else None
    parts = run_parts(run, args.parts)
    record = {"benchmark": "gpu_check", "mode": "smoke" if args.smoke else "gpu", "device": run.device_name,
              "torch": torch.__version__, "precision": run.precision, "peak_bf16_tflops": run.peak,
              "parts": parts, "ok": all(p["ok"] for p in parts.values()),
              "total_seconds": round(time.perf_counter() - started, 2)}
    if not args.keep:
        shutil.rmtree(run.work, ignore_errors=True)
    print(table(record), flush=True)
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
