"""`--dry-run` memory estimates: parameters and memory per GPU, from the configs alone.

Every stage is built on the meta device (shapes, no storage), so nothing the size of the model is
allocated, no weights are read and DeepSpeed does not start.

Training, per GPU, for P parameters of which T train, on N GPUs (the ZeRO paper's accounting, Rajbhandari
et al. 2020, section 3.1, with K = 12, checked against what DeepSpeed 0.19's optimizers allocate):

    params     2P      bf16 weights                          ZeRO-3: 2P/N
    grads      2T      bf16 gradients                        ZeRO-2, ZeRO-3: 2T/N
    optimizer  12T     fp32 master weights, Adam's m and v   ZeRO-2, ZeRO-3: 12T/N
    gathered   ZeRO-3 only: the largest module's weights and gradients whole while it runs (4 bytes per
               parameter), as DeepSpeed's own `estimate_zero3_model_states_mem_needs` counts
    buckets    ZeRO-2 and 3: the gradient reduction bucket DeepSpeed allocates on the GPU whatever the model's
               size, reduce_bucket_size elements (default 5e8: 0.93 GiB in bf16) of the gradients' dtype, two
               of them with ZeRO-2's overlap_comm; from --deepspeed_config when given
    EMA        4T: the engine's fp32 EMA copy lives on rank 0's GPU (`cascade.training.ema`)
    activations  measured (below) at train.batch_size per GPU, the batch included

so ZeRO-0 is 2 + 2 + 12 = 16 bytes per parameter, plus the EMA's 4 and the activations. CPU offload moves
the optimizer partition to host memory together with an fp32 gradient partition that the CPU optimizer
steps with and DeepSpeed keeps between steps (ZeRO-2 reduces the gradients straight into it: 16T/N per
rank; ZeRO-3 also keeps its bf16 gradient partition there: 18T/N, the figures of DeepSpeed's own
estimators); ZeRO-3's parameter offload moves the weights' partitions (2P/N) too. In fp32 (a DeepSpeed
config without bf16) weights and gradients take 4 bytes each, and the optimizer 8 without ZeRO (torch's
AdamW steps the weights) or 12 with it (ZeRO keeps an fp32 copy of its partition all the same).

Not counted: the gradients are counted whole beside the activations, though at the peak (the start of
backward) most do not exist yet; the parameters ZeRO-3 prefetches beyond the running module; the fp32
gradient copy DeepSpeed's optimizers make at the step without offload (after the activations are freed);
the CUDA context (~0.5 GiB) and the caching allocator's fragmentation.

Activations are measured, not modelled: the stage's `loss` and its backward run on meta tensors of the
config's batch shapes while a dispatch mode records when each storage is allocated and freed; the
estimate is the peak of the live bytes that are neither weights nor weight gradients: what autograd keeps
for backward (saved tensors, gradient-checkpointed blocks' inputs) and the backward's own temporaries.
Attention is counted as the fused kernels a GPU runs (flash / memory-efficient attention keep q, k, v,
the output and a log-sum-exp), not as the meta device's math fallback, which would keep the (L, L)
attention weights.

Inference: each stage's weights (fp32 or bf16; the CLIP towers stay fp32) plus the peak of one sampling
step at the pipeline's batch (guidance doubles it, the prior's candidates multiply it). Without offload
every stage is resident; with model offload (`--offload model`) only the CLIP and the stage that samples,
so the peak is the CLIP plus the largest stage with its activations.
"""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from cascade.errors import UserError
from cascade.stage import reads_clip, text_only

# bytes per parameter: weights and gradients; the optimizer holds Adam's m and v in fp32 and, except in
# fp32 without ZeRO (torch's AdamW stepping the weights themselves), an fp32 master copy
STATE_BYTES = {"bf16": (2, 2), "fp32": (4, 4)}
ADAM_BYTES, MASTER_BYTES, EMA_BYTES = 8, 4, 4
FP32_BYTES = 4  # a frozen encoder's weights, which stay fp32
FP32_GRAD_BYTES = 4  # the fp32 gradient partition an offloaded optimizer steps with, kept on the host
# (ZeRO stage, what is offloaded): the set-ups DeepSpeed offers (offload needs ZeRO >= 1)
TRAIN_SETUPS = ((0, "none"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "optimizer+params"))
REDUCE_BUCKET_SIZE = 500_000_000  # DeepSpeed's default, in elements
DEFAULT_TEXT_LEN = 77  # CLIP's context length, for stages whose config does not say how long captions are
MAX_MATERIALISED = 1 << 24  # elements: a data-dependent op on a larger meta tensor is an error, not zeros


# ---------------------------------------------------------------------------- counting
@dataclass
class ParamCounts:
    total: int  # every parameter, shared ones once
    trainable: int  # those with requires_grad (the optimizer's)
    largest_module: int  # the most parameters one module holds directly (what ZeRO-3 gathers at once)


def count_params(module: nn.Module) -> ParamCounts:
    params = list(module.parameters())  # each shared parameter once
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return ParamCounts(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), largest)


@dataclass
class TrainRow:
    """One DeepSpeed set-up's memory in bytes: per GPU (rank 0, which also holds the EMA) and host."""

    zero_stage: int
    offload: str  # "none", "optimizer" or "optimizer+params"
    params: int
    grads: int
    optimizer: int
    gathered: int
    buckets: int
    ema: int
    activations: int
    cpu: int  # host memory the offloaded states take, summed over the ranks
    frozen: int = 0  # a frozen encoder outside the stage (the Imagen-style decoder's MiniLM), fp32, on every GPU

    @property
    def gpu(self) -> int:
        return (self.params + self.grads + self.optimizer + self.gathered + self.buckets + self.ema
                + self.activations + self.frozen)


def optimizer_bytes(precision: str, zero_stage: int) -> int:
    """Optimizer bytes per trainable parameter: DeepSpeed keeps an fp32 master copy beside Adam's m and v
    whenever it wraps the optimizer (bf16, or any ZeRO stage); fp32 without ZeRO steps the weights."""
    return ADAM_BYTES + (0 if precision == "fp32" and zero_stage == 0 else MASTER_BYTES)


def training_rows(counts: ParamCounts, activations: int, *, gpus: int = 1, precision: str = "bf16",
                  reduce_bucket_size: int = REDUCE_BUCKET_SIZE, overlap_comm: bool | None = None,
                  contiguous_gradients: bool = True, frozen: int = 0) -> list[TrainRow]:
    """The closed form of the module docstring for every set-up of `TRAIN_SETUPS`; the bucket settings are
    DeepSpeed's zero_optimization keys (overlap_comm None: DeepSpeed's default, on for ZeRO-3 only)."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    w, g = STATE_BYTES[precision]
    p, t = counts.total, counts.trainable
    rows = []
    for stage, offload in TRAIN_SETUPS:
        o = optimizer_bytes(precision, stage)
        params = w * p if stage < 3 else math.ceil(w * p / gpus)
        grads = g * t if stage < 2 else math.ceil(g * t / gpus)
        optimizer = o * t if stage < 1 else math.ceil(o * t / gpus)
        cpu = 0
        if offload != "none":
            host = FP32_GRAD_BYTES * t + (g * t if stage == 3 else 0)
            cpu += (math.ceil(host / gpus) + optimizer) * gpus
            grads = optimizer = 0
        if offload == "optimizer+params":
            cpu += params * gpus
            params = 0
        gathered = (w + g) * counts.largest_module if stage == 3 else 0
        # ZeRO-3 allocates one bucket whether or not it overlaps communication; ZeRO-2 a second to overlap
        overlap = (stage == 3) if overlap_comm is None else overlap_comm
        buckets = 0 if stage == 0 or not contiguous_gradients else \
            g * reduce_bucket_size * (2 if stage == 2 and overlap else 1)
        rows.append(TrainRow(stage, offload, params, grads, optimizer, gathered, buckets, EMA_BYTES * t,
                             activations, cpu, FP32_BYTES * frozen))
    return rows


# ---------------------------------------------------------------------------- measuring activations
class StorageTimeline(TorchDispatchMode):
    """Records every storage an op allocates (views and in-place results are not new) with the op count at
    which it appeared and was freed, to find the peak of live bytes afterwards. Works on meta tensors as
    on real ones; on meta, an op that needs values (`.item()`, `.cpu()`, `nonzero`) runs on zeros."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.records: list[list[int]] = []  # [bytes, first op, last op (None while alive)]
        self._alive: dict[int, int] = {}  # id(storage) -> index in records

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.step += 1
        out = _run_on_zeros_if_needed(func, args, kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                key = id(storage)
                if key in inputs or key in self._alive:
                    continue
                self._alive[key] = len(self.records)
                self.records.append([storage.nbytes(), self.step, None])
                weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        index = self._alive.pop(key, None)
        if index is not None:
            self.records[index][2] = self.step

    def alive_index(self, tensor: torch.Tensor) -> int | None:
        return self._alive.get(id(tensor.untyped_storage()))

    def peak(self, exclude: set[int] = frozenset()) -> int:
        """The most bytes alive at once, leaving out the records at the indices in `exclude`."""
        events = []
        for i, (nbytes, first, last) in enumerate(self.records):
            if i not in exclude:
                events.append((first, 1, nbytes))
                if last is not None:
                    events.append((last + 1, 0, -nbytes))  # frees before allocations of the same op count
        live = peak = 0
        for _, _, delta in sorted(events):
            live += delta
            peak = max(peak, live)
        return peak


def _run_on_zeros_if_needed(func, args, kwargs):
    try:
        return func(*args, **kwargs)
    except (NotImplementedError, RuntimeError) as err:
        metas = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_meta]
        if not metas or "meta" not in str(err).lower():
            raise
    # A value the meta device does not have (a level read on the CPU, `.item()`): zeros stand in, which
    # changes values and nothing the estimate counts (shapes), except data-dependent sizes like nonzero's.
    for t in metas:
        if t.numel() > MAX_MATERIALISED:
            raise RuntimeError(f"{func} needs the values of a meta tensor of shape {tuple(t.shape)}")
    real = tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) and t.is_meta
                    else t, (args, kwargs))
    out = func(*real[0], **real[1])
    all_meta = len(metas) == sum(isinstance(t, torch.Tensor) for t in tree_flatten((args, kwargs))[0])
    if all_meta and "device" not in kwargs:  # the op's result belongs where its inputs were
        out = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, out)
    return out


def _attention_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # (B, heads, Lq, Dv) laid out as (B, Lq, heads, Dv), as the fused kernels write it: merging the heads
    # afterwards is then a view, not a copy
    return q.new_empty(*q.shape[:-3], q.shape[-2], q.shape[-3], v.shape[-1]).transpose(-2, -3)


class _FusedAttentionOnMeta(torch.autograd.Function):
    """F.scaled_dot_product_attention as a GPU's flash / memory-efficient kernel holds it for backward:
    q, k, v, the output and the (B, heads, Lq) fp32 log-sum-exp, never the (Lq, Lk) weights."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = _attention_output(q, v)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedAttentionOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].is_meta:
            q, k, v = args[:3]
            if not torch.is_grad_enabled():
                return _attention_output(q, v)
            return _FusedAttentionOnMeta.apply(q, k, v)
        return func(*args, **kwargs)


def _batch_bytes(batch: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))


def training_activation_bytes(stage: nn.Module, batch: dict[str, Any]) -> int:
    """Peak bytes a training step of `stage` holds beyond its weights and their gradients: `loss(batch)`
    and its backward, measured by `StorageTimeline` (meta or real tensors), plus the batch itself."""
    stage.train()
    params = [p for p in stage.parameters() if p.requires_grad]
    timeline = StorageTimeline()
    with FusedAttentionOnMeta(), timeline, torch.random.fork_rng(devices=[]):
        loss = stage.loss(batch)
        if loss.requires_grad:
            loss.backward()
    grads = {timeline.alive_index(p.grad) for p in params if p.grad is not None}
    for p in params:
        p.grad = None
    return timeline.peak(exclude=grads - {None}) + _batch_bytes(batch)


def sampling_activation_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes `run()` (one sampling step of a stage, under no_grad) allocates."""
    timeline = StorageTimeline()
    with torch.no_grad(), FusedAttentionOnMeta(), timeline, torch.random.fork_rng(devices=[]):
        run()
    return timeline.peak()


# ---------------------------------------------------------------------------- stages on meta
def build_on_meta(name: str, config) -> nn.Module:
    """Stage `name` with shapes and no storage. Weights a config would load (pretrained CLIP towers) are
    not: the same architecture is built with random initialisation instead, as a bundle's loader does."""
    from cascade.registry import get_stage

    skip_loading = {"pretrained_towers": False, "open_clip_pretrained": None}
    config = config.model_copy(update={k: v for k, v in skip_loading.items() if k in type(config).model_fields})
    with torch.device("meta"):
        return get_stage(name)(config)


def _embedding_shapes(config) -> dict[str, tuple[int, ...]]:
    """The reader's per-sample CLIP fields for a stage config: D and Dt by whichever name the stage uses."""
    dim = next((getattr(config, k) for k in ("clip_dim", "embed_dim", "text_dim") if hasattr(config, k)), 1)
    token_dim = next((getattr(config, k) for k in ("token_dim", "text_dim") if hasattr(config, k)), 1)
    length = getattr(config, "max_text_len", DEFAULT_TEXT_LEN)
    return {"clip_image": (dim,), "clip_text": (dim,), "clip_tokens": (length, token_dim), "clip_mask": (length,)}


def example_batch(stage: nn.Module, batch_size: int, device: str | torch.device = "meta",
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    """A batch shaped as the training reader collates it for `stage` (after its `preprocess`), on
    `device`; on a real device the images are uniform in [-1, 1] and the embeddings Gaussian."""
    sample: dict[str, Any] = {f"image_{s}": torch.zeros(3, s, s) for s in stage.image_sizes}
    if stage.needs_embeddings:
        for key, shape in _embedding_shapes(stage.config).items():
            sample[key] = torch.ones(shape, dtype=torch.bool) if key == "clip_mask" else torch.zeros(shape)
    sample.update(key="sample", txt="a red circle above a blue square", json={}, source="dry-run")
    sample = stage.preprocess(sample, torch.Generator().manual_seed(0))
    batch = {}
    for key, value in sample.items():
        if not isinstance(value, torch.Tensor):
            batch[key] = [value] * batch_size
        elif torch.device(device).type == "meta":
            batch[key] = torch.empty((batch_size, *value.shape), dtype=value.dtype, device=device)
        elif value.dtype == torch.bool:
            batch[key] = value.expand(batch_size, *value.shape).clone().to(device)
        elif key.startswith(("image_", "sr_")):
            batch[key] = torch.rand((batch_size, *value.shape), generator=generator).mul(2).sub(1).to(device)
        else:
            batch[key] = torch.randn((batch_size, *value.shape), generator=generator).to(device)
    return batch


# ---------------------------------------------------------------------------- training estimate
@dataclass
class TrainingEstimate:
    stage: str
    config: str
    params: ParamCounts
    batch_size: int
    gpus: int
    precision: str
    activations: int
    rows: list[TrainRow]
    gpu_memory: float  # GiB per GPU, for the largest batch that fits
    selected: tuple[int, str] | None = None  # the --deepspeed_config's (ZeRO stage, offload), if given
    notes: list[str] = field(default_factory=list)
    frozen: int = 0  # parameters of a frozen encoder the stage runs but does not hold (counted in every row)

    def max_batch(self, row: TrainRow) -> int:
        """The largest batch per GPU whose estimate fits in `gpu_memory`, activations taken as linear in it."""
        room = self.gpu_memory * 2**30 - (row.gpu - row.activations)
        return max(0, int(room * self.batch_size // max(self.activations, 1)))

    def as_json(self) -> dict[str, Any]:
        return {"kind": "training", "stage": self.stage, "config": self.config, "params": asdict(self.params),
                "batch_size": self.batch_size, "gpus": self.gpus, "precision": self.precision,
                "activation_bytes": self.activations, "gpu_memory_gib": self.gpu_memory,
                "frozen_encoder_params": self.frozen,
                "deepspeed_config": None if self.selected is None else
                {"zero_stage": self.selected[0], "offload": self.selected[1]},
                "rows": [{**asdict(r), "gpu": r.gpu, "max_batch": self.max_batch(r)} for r in self.rows],
                "notes": self.notes}


def _deepspeed_setup(path: Path | None) -> tuple[str, tuple[int, str] | None, dict[str, Any]]:
    """(precision, (ZeRO stage, offload), bucket settings for `training_rows`) a DeepSpeed JSON asks for;
    bf16 and DeepSpeed's defaults without one (the GPU case)."""
    from cascade.training.engine import read_deepspeed_json

    if path is None:
        return "bf16", None, {}
    config = read_deepspeed_json(path)
    if config.get("fp16", {}).get("enabled"):
        raise UserError(f"{path}: the estimate covers bf16 and fp32 training, not fp16")
    precision = "bf16" if config.get("bf16", {}).get("enabled", False) else "fp32"
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = "none"
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        offload = "optimizer"
        if zero.get("offload_param", {}).get("device", "none") != "none":
            offload = "optimizer+params"
    buckets = {key: zero[key] for key in ("overlap_comm", "contiguous_gradients") if key in zero}
    if "reduce_bucket_size" in zero:
        buckets["reduce_bucket_size"] = int(float(zero["reduce_bucket_size"]))
    return precision, (stage, offload) if (stage, offload) in TRAIN_SETUPS else None, buckets


def estimate_training(config_path: str | Path, stage: str | None = None, *, gpus: int = 1,
                      deepspeed_config: str | Path | None = None, gpu_memory: float = 80.0) -> TrainingEstimate:
    """The training table for a stage YAML. Precision and the marked row come from `deepspeed_config`
    ("auto" bf16 counts as bf16: the table is for GPUs); without one, bf16."""
    from cascade.training.config import load_run_config

    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if not gpu_memory > 0:
        raise UserError(f"--gpu-memory must be positive, got {gpu_memory}")
    run = load_run_config(config_path, stage)
    precision, selected, buckets = _deepspeed_setup(deepspeed_config)
    model = build_on_meta(run.stage, run.model)
    counts = count_params(model)
    batch = example_batch(model, run.train.batch_size)
    notes = []
    try:
        activations = training_activation_bytes(model.to(torch.bfloat16 if precision == "bf16" else torch.float32),
                                                batch)
    except RuntimeError as err:
        if precision != "bf16":
            raise
        # e.g. an open_clip tower fed fp32 images by bf16 weights: the real run fails the same way
        notes.append(f"{run.stage}'s loss fails with bf16 weights ({str(err).splitlines()[0]}); its "
                     f"activations are measured in fp32")
        activations = training_activation_bytes(model.float(), batch)
    frozen = frozen_params(run.model)
    return TrainingEstimate(run.stage, str(config_path), counts, run.train.batch_size, gpus, precision,
                            activations, training_rows(counts, activations, gpus=gpus, precision=precision,
                                                       frozen=frozen, **buckets),
                            gpu_memory, selected, notes, frozen)


def frozen_params(config) -> int:
    """Parameters of the frozen text encoder an Imagen-style decoder config runs (not in the stage's
    state_dict, so not in its count), else 0."""
    if not text_only(config):
        return 0
    from cascade.encoders.frozen_text import frozen_encoder_params

    return frozen_encoder_params(config.text_encoder)


# ---------------------------------------------------------------------------- inference estimate
@dataclass
class StageInference:
    name: str
    params: int
    source: str
    batch: int = 0  # rows the network sees per sampling step
    activations: dict[str, int] = field(default_factory=dict)  # dtype -> peak bytes of one sampling step
    frozen: int = 0  # parameters of a frozen encoder it runs beside its own (fp32 in every dtype)


def _conditioning(stage: nn.Module, rows: int, low_size: int | None) -> dict[str, torch.Tensor]:
    """What the pipeline hands `stage.sample` for `rows` images, on meta."""
    if text_only(stage.config):  # captions, through the frozen encoder
        return {"txt": ["a red circle above a blue square"] * rows}
    shapes = _embedding_shapes(stage.config)
    cond = {k: torch.empty((rows, *s), device="meta") for k, s in shapes.items() if k != "clip_mask"}
    cond["clip_mask"] = torch.ones((rows, *shapes["clip_mask"]), dtype=torch.bool, device="meta")
    if hasattr(stage, "low_size"):  # an upsampler: the previous stage's images (and text, if it reads it)
        size = low_size or stage.low_size
        cond = {"low_res": torch.empty(rows, 3, size, size, device="meta"),
                **({k: cond[k] for k in ("clip_tokens", "clip_mask")} if stage.config.text else {})}
    return cond


def estimate_inference(stages: dict[str, tuple[Any, str]], *, num_images: int, settings=None) -> dict[str, Any]:
    """Inference memory for `stages` {name: (config, source)} in cascade order, the clip's included, at
    `num_images` images with `settings` (a `cascade.pipeline.Settings`; None: each config's defaults)."""
    from cascade.pipeline import Settings

    settings = settings or Settings()
    infos: list[StageInference] = []
    low_size = None
    for name, (config, source) in stages.items():
        model = build_on_meta(name, config).eval()
        info = StageInference(name, count_params(model).total, source, frozen=frozen_params(config))
        if name == "clip":  # a few captions through the text tower: nothing beside the weights
            info.batch, info.activations = num_images, {"float32": 0, "bfloat16": 0}
        else:
            kwargs = {**settings.for_stage(name, model), "steps": 1}
            guided = kwargs["guidance"] not in (None, 1)
            if text_only(config):  # its frozen encoder is built on first use: not inside the measured step
                model.encode_text(["warm-up"])
            info.batch = num_images * (2 if guided else 1) * getattr(config, "candidates", 1)
            for dtype in (torch.float32, torch.bfloat16):
                staged = model.to(dtype)
                cond = _conditioning(staged, num_images, low_size)
                generator = torch.Generator().manual_seed(0)
                info.activations[str(dtype).removeprefix("torch.")] = sampling_activation_bytes(
                    lambda: staged.sample(cond, generator=generator, **kwargs))
            if hasattr(model, "high_size"):
                low_size = model.high_size
            elif hasattr(config, "image_size"):
                low_size = config.image_size
        infos.append(info)
    rows = []
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        weights = {i.name: i.params * (4 if i.name == "clip" else size) + FP32_BYTES * i.frozen for i in infos}
        clip = weights.get("clip", 0)
        step = max((i.activations[dtype] for i in infos), default=0)
        largest = max((weights[i.name] + i.activations[dtype] for i in infos if i.name != "clip"), default=0)
        rows.append({"dtype": dtype, "offload": "none", "gpu": sum(weights.values()) + step, "cpu": 0})
        rows.append({"dtype": dtype, "offload": "model", "gpu": clip + largest, "cpu": sum(weights.values()) - clip})
    return {"kind": "inference", "num_images": num_images, "stages": [asdict(i) for i in infos], "rows": rows}


def inference_stage_configs(*, bundle: str | Path | None = None, configs: list[str | Path] | None = None,
                            until: str = "sr1024") -> dict[str, tuple[Any, str]]:
    """{name: (config, source)} for the stages `cascade generate --until` runs, in cascade order: from a
    bundle's config.json files (no weights read), or from stage YAMLs (all of them must be given)."""
    from cascade.bundle import read_manifest, saved_config
    from cascade.registry import IMAGE_STAGES, STAGE_ORDER

    if until not in IMAGE_STAGES:
        raise UserError(f"--until must be one of {', '.join(IMAGE_STAGES)}, not '{until}'")
    wanted = STAGE_ORDER[: STAGE_ORDER.index(until) + 1]
    found: dict[str, tuple[Any, str]] = {}
    if configs:
        from cascade.training.config import load_run_config

        for path in configs:
            run = load_run_config(path)
            if run.stage in found:
                raise UserError(f"--config: two configs for stage '{run.stage}': {found[run.stage][1]} and {path}")
            found[run.stage] = (run.model, str(path))
        origin = "--config gave"
    else:
        root = Path(bundle)
        for name in read_manifest(root).get("stages", []):
            if name in wanted:
                found[name] = (saved_config(root / name), str(root / name / "config.json"))
        origin = f"the bundle {root} has"
    if "decoder" in found and text_only(found["decoder"][0]):
        wanted = tuple(name for name in wanted if name != "prior")  # text -> decoder: no prior runs
        found.pop("prior", None)
        if not any(reads_clip(name, found[name][0]) for name in wanted if name in found):
            wanted = tuple(name for name in wanted if name != "clip" or name in found)  # nothing reads CLIP
    missing = [name for name in wanted if name not in found]
    if missing:
        raise UserError(f"generate --until {until} runs {', '.join(wanted)}; {origin} no {', '.join(missing)}")
    return {name: found[name] for name in wanted}


# ---------------------------------------------------------------------------- the commands
def train_dry_run(args) -> int:
    """`train_stage.py --dry-run`: the training table (or with --json one JSON line) on stdout."""
    est = estimate_training(args.config, args.stage, gpus=args.gpus, deepspeed_config=args.deepspeed_config,
                            gpu_memory=args.gpu_memory)
    print(json.dumps(est.as_json()) if args.json else format_training(est))
    return 0


def generate_dry_run(args, settings) -> int:
    """`cascade generate --dry-run`: the inference table for --config files, else for --model's bundle."""
    stages = inference_stage_configs(bundle=args.model, configs=args.config, until=args.until)
    est = estimate_inference(stages, num_images=args.num_images, settings=settings)
    print(json.dumps(est) if args.json else format_inference(est))
    return 0


# ---------------------------------------------------------------------------- reports
def _size(nbytes: int) -> str:
    if nbytes == 0:
        return "0"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale or unit == "MiB":
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"
    return ""


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _table(rows: list[tuple[str, ...]], left: int) -> list[str]:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in rows]


def format_training(est: TrainingEstimate) -> str:
    p = est.params
    weights, grads = STATE_BYTES[est.precision]
    frozen = (f"; plus the frozen text encoder's {est.frozen:,} ({_count(est.frozen)}), fp32 on every GPU, "
              f"never trained or saved (column 'frozen')" if est.frozen else "")
    lines = [f"{est.stage} ({est.config}): {p.total:,} parameters ({_count(p.total)}), {p.trainable:,} trainable, "
             f"largest module {p.largest_module:,}{frozen}",
             f"training memory per GPU, {est.precision}, batch {est.batch_size} per GPU, {est.gpus} GPU(s); "
             f"activations {_size(est.activations)} ({_size(est.activations // est.batch_size)} per sample)", ""]
    extra = ("frozen",) if est.frozen else ()
    rows = [("ZeRO", "offload", "params", "grads", "optimizer", "gathered", "buckets", "EMA", "activations", *extra,
             "GPU total", "CPU (all ranks)", f"max batch ({est.gpu_memory:g} GiB)", "")]
    for r in est.rows:
        sizes = (r.params, r.grads, r.optimizer, r.gathered, r.buckets, r.ema, r.activations,
                 *((r.frozen,) if est.frozen else ()), r.gpu, r.cpu)
        mark = "<- --deepspeed_config" if (r.zero_stage, r.offload) == est.selected else ""
        rows.append((str(r.zero_stage), r.offload, *map(_size, sizes), str(est.max_batch(r)), mark))
    lines += _table(rows, left=2)
    lines += ["", f"bytes per parameter: weights {weights}, grads {grads}, optimizer (fp32 master, Adam m and v) "
                  f"{optimizer_bytes(est.precision, 2)}; ZeRO-2 partitions grads and optimizer over the GPUs, "
                  f"ZeRO-3 the weights too, offload moves the partitions to the CPU.",
              "gathered: ZeRO-3's largest module, whole while it runs. buckets: DeepSpeed's gradient reduction "
              "buffer (reduce_bucket_size). EMA: the fp32 copy on rank 0's GPU. "
              "max batch: the largest batch per GPU that fits, activations taken as linear in the batch.",
              "Not counted: parameters ZeRO-3 prefetches, the CUDA context and the allocator's overhead; leave "
              "10-20% free."]
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def format_inference(est: dict[str, Any]) -> str:
    lines = [f"inference memory for {est['num_images']} image(s):", ""]
    rows = [("stage", "parameters", "rows/step", "step fp32", "step bf16", "config")]
    for s in est["stages"]:
        params = f"{s['params']:,}" + (f" + {s['frozen']:,} frozen" if s.get("frozen") else "")
        rows.append((s["name"], params, str(s["batch"]), _size(s["activations"]["float32"]),
                     _size(s["activations"]["bfloat16"]), s["source"]))
    lines += _table(rows, left=1) + [""]
    rows = [("dtype", "offload", "GPU", "CPU")] + [(r["dtype"], r["offload"], _size(r["gpu"]), _size(r["cpu"]))
                                                 for r in est["rows"]]
    lines += _table(rows, left=2)
    lines += ["", "GPU: the weights resident at once (every stage; with --offload model the CLIP and the stage "
                  "that samples) plus the largest sampling step's activations. The CLIP and a frozen text encoder "
                  "stay fp32."]
    return "\n".join(lines)
