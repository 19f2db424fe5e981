"""The training loop: one registered stage, DeepSpeed data parallelism (ZeRO 0-3), resumable.

Per optimizer step every rank draws `grad_accum` batches of `batch_size` from its own part of the
shards, DeepSpeed averages the gradients over ranks and micro-batches, clips their global norm and
steps a client AdamW at the warmup + cosine learning rate; then the EMA follows. Checkpoints, logs,
sample grids, evaluation and the bundle export happen around that (see the sibling modules).

A DeepSpeed-built optimizer would compile fused_adam (minutes on CPU), hence the client AdamW with
`zero_allow_untested_optimizer`.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from cascade.errors import UserError
from cascade.training import checkpoints, distributed, run_dir as run_dirs
from cascade.training.config import RunConfig, TrainConfig, load_run_config
from cascade.training.ema import EMA
from cascade.training.lr_schedule import learning_rate
from cascade.training.run_log import RunLog, truncate_metrics
from cascade.images import save_png
from cascade.stage import text_only
from cascade.training.zero_params import params_read_outside_forward, promote_scalars

PREVIEW_COUNT = 16  # images in a sample grid


@dataclass
class TrainArgs:
    stage: str
    config: Path
    data: Path
    run_dir: Path
    max_steps: int | None = None
    # A time budget for this invocation (minutes): the step that crosses it ends the run like max_steps does.
    max_minutes: float | None = None
    deepspeed_config: Path | None = None
    export: Path | None = None  # bundle directory: the stage folder goes to export/<stage>
    # Pictures while training (`cascade.training.cascade_preview`): the bundle that provides the other
    # stages, how often (minutes of this invocation), what, and where (default: RUN_DIR/progress).
    preview_bundle: Path | None = None
    preview_minutes: float = 10.0
    preview_prompts: tuple[str, ...] = ()
    preview_out: Path | None = None
    # A bundle stage folder whose weights a fresh run starts from (fine-tuning; `cascade.bundle.init_from`).
    init_from: Path | None = None


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    export_dir: Path | None
    start_step: int = 0  # where this invocation began: > 0 when it resumed a run


class _LossOf(nn.Module):
    """`engine(batch)` -> `stage.loss(batch)`: going through a module call lets DeepSpeed's hooks
    (ZeRO-3 gathering, gradient reduction) run around the stage's own loss."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.stage.loss(batch)


def read_deepspeed_json(path: Path) -> dict[str, Any]:
    """A DeepSpeed config file as a dict; one-line UserErrors for a missing or malformed file."""
    if not Path(path).is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def deepspeed_config(path: Path | None, train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config file (ZeRO stage, precision), with batch sizes and clipping from `train`.

    `"bf16": {"enabled": "auto"}` turns bf16 on only on a GPU that supports it (on this CPU it is
    30-200x slower than fp32).
    """
    if path is None:
        config: dict[str, Any] = {"zero_optimization": {"stage": 0}}
    else:
        config = read_deepspeed_json(path)
        for section in ("optimizer", "scheduler"):
            if section in config:
                raise UserError(f"{path}: remove the '{section}' section; the engine brings its own "
                                f"AdamW and warmup + cosine schedule from the stage config")
    bf16 = config.get("bf16", {}).get("enabled", False)
    if bf16 == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    config["bf16"] = {"enabled": bool(bf16)}
    if config.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise UserError(f"{path}: fp16 needs a GPU; use fp32 (no fp16/bf16 section) on CPU")
    config.update(train_micro_batch_size_per_gpu=train.batch_size,
                  gradient_accumulation_steps=train.grad_accum,
                  train_batch_size=train.batch_size * train.grad_accum * world_size,
                  gradient_clipping=train.grad_clip,
                  zero_allow_untested_optimizer=True,
                  steps_per_print=10**9)
    return config


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; biases and norm gains (1-d) get no weight decay (as in AdamW practice)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device`, in their own dtypes: under bf16 the networks cast what they read
    to their weights' dtype, and the stages keep the diffusion maths (targets, losses) in fp32."""
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second SIGINT aborts."""

    def __init__(self):
        self.raised = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


class Trainer:
    """One training run of one stage in one run directory (every rank builds one)."""

    def __init__(self, args: TrainArgs):
        from cascade.data.reader import check_fields, find_shards
        from cascade.registry import get_stage

        self.args = args
        # Every user mistake is found before DeepSpeed starts, so it costs no start-up time.
        self.run: RunConfig = load_run_config(args.config, args.stage)
        if args.max_steps is not None:
            if args.max_steps < 1:
                raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
            self.run.train.max_steps = args.max_steps
        self.train_cfg = self.run.train
        self.run_dir = Path(args.run_dir)
        found = checkpoints.latest(self.run_dir) if args.export is not None else None
        if found is not None and found[1].step > self.train_cfg.max_steps:
            # the checkpoint of step max_steps is gone (only the last few are kept): the newest one would
            # go out as if it were the model this command asks for
            done, max_steps = found[1].step, self.train_cfg.max_steps
            raise UserError(f"{self.run_dir} is trained to step {done}, past max_steps {max_steps}: --export "
                            f"would write the step-{done} weights to {args.export}. Give --max-steps {done} "
                            f"(or more) to export them, or a new --run-dir to train a {max_steps}-step model")
        find_shards(args.data, "train")
        deepspeed_config(args.deepspeed_config, self.train_cfg, 1)  # its errors, before start-up
        self.stage_cls = get_stage(self.run.stage)
        check_fields(args.data, "train", self.run.stage, *self.stage_cls.data_needs(self.run.model))
        if args.max_minutes is not None and not args.max_minutes > 0:
            raise UserError(f"--max-minutes must be > 0, got {args.max_minutes}")
        self.preview = None
        if args.preview_bundle is not None:
            from cascade.training.cascade_preview import DEFAULT_PROMPTS, CascadePreview

            if not args.preview_minutes > 0:
                raise UserError(f"--preview-minutes must be > 0, got {args.preview_minutes}")
            from cascade.outputs import check_out_dir

            self.preview = CascadePreview(args.preview_bundle, self.run.stage,
                                          check_out_dir(args.preview_out or self.run_dir / "progress",
                                                        "--preview-out"),
                                          prompts=args.preview_prompts or DEFAULT_PROMPTS,
                                          prior=not text_only(self.run.model))
            self.preview.check(self.stage_cls, self.run.model)
        if args.init_from is not None:
            from cascade.bundle import read_stage_config

            found = read_stage_config(args.init_from)["stage"]
            if found != self.run.stage:
                raise UserError(f"--init-from {args.init_from} holds a {found} stage, not a {self.run.stage}")
        if self.train_cfg.compile and not self.stage_cls.networks:
            raise UserError(f"{self.run.source}: train.compile is set but the {self.run.stage} stage has no "
                            f"networks to compile; remove it")
        run_dirs.claim(self.run_dir, self.run.as_dict(), self.run.source, write=False,
                       defaults=self.run.defaults(), upgrade_model=self._upgrade_model)

        self.dist = distributed.setup()
        _quiet_deepspeed()
        self.main = self.dist.is_main
        if self.main:
            run_dirs.claim(self.run_dir, self.run.as_dict(), self.run.source, write=True,
                           defaults=self.run.defaults(), upgrade_model=self._upgrade_model)
        distributed.barrier()
        self._eval_stage: nn.Module | None = None
        self._train_batches = None  # the train split as evaluation reads it (for the stages' baselines)

    def log(self, text: str) -> None:
        if self.main:
            from tqdm import tqdm

            tqdm.write(text)

    # ------------------------------------------------------------------ set-up
    def _build(self):
        import deepspeed

        cfg = self.train_cfg
        # The same seed on every rank: ZeRO-3 partitions each rank's own copy of the initial weights.
        torch.manual_seed(cfg.seed)
        stage = self.stage_cls(self.run.model)
        found = checkpoints.latest(self.run_dir)
        ds_config = deepspeed_config(self.args.deepspeed_config, cfg, self.dist.world_size)
        zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.resume = None
        self.same_layout = False
        if found is not None:
            path, state = found
            self.resume = (path, state)
            self.same_layout = state.world_size == self.dist.world_size and state.zero_stage == zero_stage
            if not self.same_layout:
                # DeepSpeed's optimizer partitions only fit the layout that wrote them.
                stage.load_state_dict(checkpoints.load_weights(path), strict=True)
        elif self.args.init_from is not None:  # a fresh run that fine-tunes; a resumed one has its own weights
            from cascade.bundle import init_from

            adapted = init_from(stage, self.args.init_from)
            self.log(f"starting from the weights of {self.args.init_from}" +
                     "".join(f"\n  {line}" for line in adapted))
        promote_scalars(stage)
        optimizer = torch.optim.AdamW(param_groups(stage, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                      weight_decay=cfg.weight_decay)
        wrapper = _LossOf(stage)
        if zero_stage == 3:
            probe = next(self._loader(stage, skip_batches=0))
            for p in params_read_outside_forward(stage, lambda: stage.loss(probe)):
                deepspeed.zero.register_external_parameter(wrapper, p)
        if cfg.compile:
            # In place, so the engine, the checkpoints and the EMA see the same parameter names.
            stage.compile_networks()
            if zero_stage == 3:
                self.log("train.compile under ZeRO-3: TorchDynamo also traces DeepSpeed's parameter gathering "
                         "hooks (recompiling them up to its limit, then running them uncompiled); expect less "
                         "of a speed-up than with ZeRO 0-2")
        engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=ds_config)
        # After initialize, which moves the weights to the engine's device: the EMA lives there too.
        ema = EMA(stage, cfg.ema_decay, holds=self.main)
        self.engine, self.stage, self.ema, self.zero_stage = engine, stage, ema, zero_stage

        self.step = 0
        self.micro_batches = 0
        rng_restored = False
        if self.resume is not None:
            path, state = self.resume
            if self.same_layout:
                checkpoints.load_deepspeed(path, engine)
                rng_restored = checkpoints.load_rng(path, self.dist.rank)
                self.log(f"resuming from {path.name}: weights, optimizer, EMA, RNG and data position")
            else:
                self.log(f"resuming from {path.name}, written by {state.world_size} process(es) with ZeRO "
                         f"stage {state.zero_stage}; now {self.dist.world_size} with stage {zero_stage}: "
                         f"weights and EMA loaded, the optimizer state restarts")
            if self.main:
                ema.load_state_dict(checkpoints.load_ema(path), state.ema_updates)
            ema.updates = state.ema_updates
            self.step = state.step
            # The same number of samples seen in total; each rank's share is its own new slice.
            self.micro_batches = state.micro_batches * state.world_size // self.dist.world_size
        if not rng_restored:
            torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (self.dist.rank + 1) + self.step)

    def _upgrade_model(self, model: dict[str, Any]) -> dict[str, Any]:
        """A recorded model section with its renamed keys under their current names."""
        upgrade = getattr(self.run.model, "upgrade_keys", None)
        return upgrade(model)[0] if upgrade is not None else model

    def _loader(self, stage: nn.Module, skip_batches: int) -> Iterator[dict[str, Any]]:
        from cascade.data.reader import make_loader

        cfg = self.train_cfg
        # The instance's attributes: a stage may decide them from its config (superres `text`).
        return iter(make_loader(self.args.data, "train", image_sizes=stage.image_sizes,
                                with_embeddings=stage.needs_embeddings, batch_size=cfg.batch_size,
                                preprocess=stage.preprocess, shuffle=True, seed=cfg.seed,
                                rank=self.dist.rank, world_size=self.dist.world_size,
                                num_workers=cfg.num_workers, infinite=True,
                                skip_batches=skip_batches, select=stage.keeps))

    def _val_batches(self, batch_size: int, split: str = "val"):
        """One ordered pass over `split`, or None when the data has no such split."""
        from cascade.data.reader import make_val_batches

        if not any((Path(self.args.data) / split).glob("*.tar")):
            return None
        return make_val_batches(self.args.data, image_sizes=self.stage.image_sizes,
                                with_embeddings=self.stage.needs_embeddings, batch_size=batch_size,
                                preprocess=self.stage.preprocess, seed=self.train_cfg.seed, split=split,
                                select=self.stage.keeps)

    # ------------------------------------------------------------------ the EMA copy on rank 0
    def ema_stage(self) -> nn.Module | None:
        """Rank 0: a plain (unpartitioned) copy of the stage with the EMA weights, in eval mode.

        A collective under ZeRO-3 (frozen weights and buffers are gathered from the live model)."""
        live = checkpoints.full_state_dict(self.stage, is_main=self.main)
        if not self.main:
            return None
        if self._eval_stage is None:
            self._eval_stage = self.stage_cls(self.run.model)
        live.update(self.ema.state_dict())
        self._eval_stage.load_state_dict(live, strict=True)
        return self._eval_stage.eval()

    # ------------------------------------------------------------------ periodic work
    def _save(self) -> None:
        state = checkpoints.CheckpointState(step=self.step, micro_batches=self.micro_batches,
                                            world_size=self.dist.world_size, zero_stage=self.zero_stage,
                                            ema_updates=self.ema.updates)
        path = checkpoints.save(self.run_dir, self.engine, self.stage, self.ema, state, is_main=self.main)
        self.log(f"checkpoint {path}")

    def _sample(self, preview_batch: dict[str, Any] | None) -> None:
        """A grid of the EMA model's previews for a fixed batch (every rank calls this)."""
        model = self.ema_stage()
        if model is not None and preview_batch is not None:
            images = model.preview(preview_batch, torch.Generator().manual_seed(self.train_cfg.seed))
            if images is not None:
                save_png(model.preview_grid(images, list(preview_batch.get("txt", []))),
                         self.run_dir / "samples" / f"step-{self.step:06d}.png")
        distributed.barrier()

    def _cascade_preview(self) -> None:
        """The preview prompts through the bundle's cascade with the EMA weights of this stage (rank 0)."""
        model = self.ema_stage()
        if model is not None:
            path = self.preview(model, self.step)
            self.log(f"step {self.step}: preview of the cascade with these weights in {path}")
        distributed.barrier()

    def _evaluate(self) -> dict[str, float]:
        """`stage.evaluate` of the EMA weights on the val split, on rank 0 (metrics named eval/...)."""
        model = self.ema_stage()
        metrics: dict[str, float] = {}
        if model is not None:
            batches = self._val_batches(self.train_cfg.batch_size)
            if batches is None:
                self.log(f"no validation shards in {Path(self.args.data) / 'val'}; skipping evaluation")
            else:
                generator = torch.Generator().manual_seed(self.train_cfg.seed)
                if self._train_batches is None:  # one object for the run, so a stage may cache what it read
                    self._train_batches = self._val_batches(64, split="train")
                metrics = {f"eval/{k}": float(v)
                           for k, v in model.evaluate(batches, generator, self._train_batches).items()}
                if metrics:
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                    self.log(f"step {self.step} eval: {shown}")
        distributed.barrier()
        return metrics

    def _preview_batch(self) -> dict[str, Any] | None:
        """Rank 0: the val rows (train, if there is no val split) that every grid shows, spread evenly
        over the sources of a mixed split (shapes scenes and emoji alternate)."""
        from cascade.batches import balanced_batch

        batches = self._val_batches(PREVIEW_COUNT) or self._val_batches(PREVIEW_COUNT, split="train")
        return balanced_batch(batches, PREVIEW_COUNT)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        self._build()
        cfg = self.train_cfg
        engine = self.engine
        if self.main:
            checkpoints.remove_unfinished(self.run_dir)
            truncate_metrics(self.run_dir, self.step)  # lines a killed run logged past its checkpoint
        log = RunLog(self.run_dir, active=self.main, start_step=self.step, max_steps=cfg.max_steps,
                     desc=f"{self.run.stage}")
        grids = bool(cfg.sample_every) and self.stage.samples_images
        previewed = time.monotonic()  # when the last cascade preview was made (or this invocation began)
        preview_batch = self._preview_batch() if grids and self.main else None
        batches = self._loader(self.stage, skip_batches=self.micro_batches)
        interrupted = False
        nonfinite = 0  # non-finite losses in a row
        window_loss, window_steps, window_time = torch.zeros((), device=engine.device), 0, 0.0
        samples_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        first_step = self.step
        deadline = None if self.args.max_minutes is None else time.monotonic() + 60 * self.args.max_minutes
        with _StopFlag() as stop:
            self.stage.train()
            while self.step < cfg.max_steps:
                started = time.perf_counter()
                lr = learning_rate(self.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                   max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
                step_loss = torch.zeros((), device=engine.device)  # on the device: read at logging steps
                done = 0
                while done < cfg.grad_accum:
                    batch = _to_device(next(batches), engine.device)
                    loss = engine(batch)
                    self.micro_batches += 1
                    # The one host sync per micro-batch: every rank must skip the same batches.
                    if distributed.any_rank(not bool(torch.isfinite(loss.detach()))):
                        self._nonfinite(loss, nonfinite := nonfinite + 1)
                        continue
                    nonfinite = 0
                    engine.backward(loss)
                    engine.step()
                    done += 1
                    step_loss += loss.detach().float() / cfg.grad_accum
                self.step += 1
                self.ema.update()
                window_time += time.perf_counter() - started  # training only: not eval, grids, saves
                window_loss += step_loss
                window_steps += 1
                log.advance()

                # every rank ends at the same step: the first whose clock passed the deadline decides
                out_of_time = deadline is not None and distributed.any_rank(time.monotonic() >= deadline)
                last = self.step == cfg.max_steps or out_of_time
                evaluate = (cfg.eval_every and self.step % cfg.eval_every == 0) or (last and cfg.eval_at_end)
                metrics = self._evaluate() if evaluate else {}
                if self.step % cfg.log_every == 0 or last or evaluate:
                    mean_loss = distributed.mean_over_ranks(float(window_loss) / window_steps)
                    speed = window_steps * samples_per_step / max(window_time, 1e-9)
                    log.record(self.step, {"loss": mean_loss, "lr": lr, "samples_per_s": speed, **metrics})
                    window_loss, window_steps, window_time = torch.zeros((), device=engine.device), 0, 0.0
                if grids and (self.step % cfg.sample_every == 0 or last):
                    self._sample(preview_batch)
                if self.preview is not None and (last or time.monotonic() - previewed >= 60 * self.args.preview_minutes):
                    self._cascade_preview()
                    previewed = time.monotonic()
                if distributed.any_rank(stop.raised):
                    interrupted = True
                    self._save()
                    self.log(f"interrupted at step {self.step}; run the same command to resume")
                    break
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                    self._save()
                if out_of_time and self.step < cfg.max_steps:
                    self.log(f"time budget of {self.args.max_minutes:g} min reached at step {self.step} "
                             f"(max_steps {cfg.max_steps})")
                    break
            if first_step >= cfg.max_steps:
                self.log(f"already trained to step {self.step} (max_steps {cfg.max_steps}); nothing to do")
        log.close()
        export_dir = None
        if self.args.export is not None and not interrupted:
            export_dir = self.export(Path(self.args.export))
        return TrainResult(step=self.step, interrupted=interrupted, export_dir=export_dir, start_step=first_step)

    def _nonfinite(self, loss: torch.Tensor, in_a_row: int) -> None:
        """Report a non-finite loss (on some rank) and skip its batch; stop after `max_nonfinite` in a row."""
        limit = self.train_cfg.max_nonfinite
        self.log(f"step {self.step + 1}: loss is {float(loss.detach()):g} on this rank or another; batch "
                 f"skipped ({in_a_row} in a row, the run stops at {limit})")
        if in_a_row >= limit:
            raise UserError(f"{limit} non-finite losses in a row at step {self.step + 1}: the run diverged. "
                            f"Lower train.lr, check the data, or resume from the last checkpoint in "
                            f"{self.run_dir / 'checkpoints'}")

    def export(self, bundle_dir: Path) -> Path | None:
        """Write the EMA weights as `bundle_dir/<stage>/` and update `bundle_dir/cascade.json`."""
        from cascade.bundle import save_stage, write_manifest

        model = self.ema_stage()
        path = None
        if self.main:
            path = save_stage(model, bundle_dir / self.run.stage)
            write_manifest(bundle_dir)
            self.log(f"exported {self.run.stage} (EMA weights) to {path}")
        distributed.barrier()
        return path


def train(args: TrainArgs) -> TrainResult:
    return Trainer(args).fit()
