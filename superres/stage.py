"""The super-resolution stages: `sr256` (64 -> 256) and `sr1024` (256 -> 1024).

Training (Ho et al. 2022, "Cascaded Diffusion Models"; Imagen; DALL-E 2, appendix C): the low-res
image is degraded as the previous stage's output would be (Gaussian blur for 64 -> 256, a BSR-style
mix of blur, resize and JPEG for 256 -> 1024), upsampled bicubically to the output size, corrupted by
a forward-diffusion step at a random augmentation level s, and the network, told s and the
timestep, learns to denoise the high-res image given it. sr1024 trains on aligned random crops and
runs on whole images (the network is fully convolutional; see `superres.unet`), in tiles when
`tile_size` is set (see `superres.tiling`), or in bands of rows when `stream_rows` is (see
`superres.streaming`).

Sampling: `sample({"low_res": (B, 3, h, w)[, "clip_tokens", "clip_mask"]}, aug_level=0.2)`.
The config is `superres.config`; evaluation (PSNR and SSIM against the real high-res image, beside
bicubic upsampling, swept over augmentation level and step count) is `superres.evaluation`.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from cascade.config import Config
from cascade.diffusion import (diffusion_loss, model_output_to_eps, repeat_to_batch, sample,
                               sample_inpaint, sample_timesteps)
from cascade.errors import UserError
from cascade.registry import register_stage
from cascade.stage import Stage, build_schedule, resolve_sampling
from superres.augmentation import noise_augment
from superres.config import SR1024Config, SRConfig
from superres.degradations import mixed_degradation, random_blur
from superres.evaluation import eval_pairs, evaluate_superres
from superres.metrics import bicubic_upsample
from superres.streaming import streamed_forward
from superres.tiling import tiled_apply
from superres.unet import EfficientUNet


class SuperResStage(Stage):
    """A diffusion upsampler from low_size to high_size; see the module docstring."""

    Config: ClassVar[type[Config]] = SRConfig
    low_size: ClassVar[int] = 64
    high_size: ClassVar[int] = 256
    networks = ("net",)

    @classmethod
    def data_needs(cls, config: SRConfig) -> tuple[tuple[int, ...], bool]:
        # the reader loads CLIP tokens only for a text-conditioned upsampler
        return tuple(cls.image_sizes), config.text

    def __init__(self, config: SRConfig):
        super().__init__(config)
        self._check(config)
        self.net = EfficientUNet(base_channels=config.base_channels, channel_mults=config.channel_mults,
                                 num_res_blocks=config.num_res_blocks, dropout=config.dropout,
                                 text_dim=config.text_dim if config.text else None, head_dim=config.head_dim,
                                 gradient_checkpointing=config.gradient_checkpointing)
        self.schedule = build_schedule(config)  # data, not weights: real (on the CPU) under a meta device

    @property
    def scale(self) -> int:
        return self.high_size // self.low_size

    def _check(self, c: SRConfig) -> None:
        align = 2 ** (len(c.channel_mults) - 1)
        if c.train_crop is not None and (c.train_crop % (align * self.scale) or c.train_crop > self.high_size):
            raise UserError(f"model.train_crop={c.train_crop} must be a multiple of {align * self.scale} "
                            f"and at most {self.high_size}")
        if c.tile_size is not None and (c.tile_size % align or c.tile_margin % align):
            raise UserError(f"model.tile_size and model.tile_margin must be multiples of {align}")

    # -- data ---------------------------------------------------------------------------------------

    def keeps(self, meta: dict[str, Any]) -> bool:
        """Only images with real detail at the output size: a sample made from a smaller raster original
        (Fluent Emoji 3D's 256x256 files, small photos) holds a Lanczos upscale at 1024, and learning to
        reproduce that kernel taught sr1024 to blur some edges and outline others."""
        from cascade.data.sample import native_size

        size = native_size(meta)
        return size is None or size >= self.high_size

    def preprocess(self, sample: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Add "sr_low" (degraded, possibly cropped) and "sr_high" (the aligned crop) to a sample."""
        c = self.config
        low, high = sample[f"image_{self.low_size}"], sample[f"image_{self.high_size}"]  # (3, h, h), (3, H, H)
        if c.train_crop is not None:
            crop = c.train_crop // self.scale
            y, x = (int(torch.randint(self.low_size - crop + 1, (), generator=generator)) for _ in range(2))
            low = low[:, y:y + crop, x:x + crop]
            high = high[:, y * self.scale:(y + crop) * self.scale, x * self.scale:(x + crop) * self.scale]
        if c.degradation != "none" and torch.rand((), generator=generator).item() < c.degradation_prob:
            level = c.degradation_max * torch.rand((), generator=generator).item()
            if c.degradation == "blur":
                low = random_blur(low, level, generator, max_sigma=c.blur_sigma)
            else:
                low = mixed_degradation(low, level, generator)
        return {**sample, "sr_low": low.contiguous(), "sr_high": high.contiguous()}

    def _pairs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "sr_low" in batch:
            return batch["sr_low"], batch["sr_high"]
        return batch[f"image_{self.low_size}"], batch[f"image_{self.high_size}"]

    def _text(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.config.text:
            return None, None
        return batch["clip_tokens"].float(), batch["clip_mask"].bool()

    # -- network ------------------------------------------------------------------------------------

    def _condition(self, low: torch.Tensor, size: int | tuple[int, int], level: torch.Tensor,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Bicubic upsampling to the output size, then the forward-diffusion corruption at `level` (with
        `noise` when given)."""
        return noise_augment(bicubic_upsample(low, size), level, self.schedule, generator, noise)

    def forward(self, x_t: torch.Tensor, low_up: torch.Tensor, t: torch.Tensor, aug_level: torch.Tensor,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The network output (eps, x0 or v per config); over large images row-streamed or tiled when
        configured (streaming only without autograd: training runs the whole patch)."""
        c = self.config
        big = c.tile_size is not None and max(x_t.shape[-2:]) > c.tile_size
        if (c.stream_rows is not None and (big or c.tile_size is None) and x_t.shape[-2] > c.stream_rows
                and not torch.is_grad_enabled() and self._streamable(x_t.device)):
            return streamed_forward(self.net, x_t, low_up, t, aug_level, text, text_mask, rows=c.stream_rows)
        if not big:
            return self.net(x_t, low_up, t, aug_level, text, text_mask)
        return tiled_apply(self.net, [x_t, low_up], tile=c.tile_size, margin=c.tile_margin,
                           align=self.net.downsample_factor, t=t, aug_level=aug_level, text=text,
                           text_mask=text_mask)

    def _streamable(self, device: torch.device) -> bool:
        """Whether streaming can run the net here. It reads the convolutions' weights outside their modules'
        forward calls, so not where a forward hook brings them in (accelerate's sequential offload: meta
        weights until then; ZeRO-3 partitioning: `ds_id`), and it runs eagerly, so not when the net was
        compiled (`compile_networks`: the compiled whole-image or tiled call is what was asked for). There
        the configured tiles (or the whole image) run instead."""
        if getattr(self.net, "_compiled_call_impl", None) is not None:
            return False
        return all(p.device == device and not hasattr(p, "ds_id") for p in self.net.parameters())

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """`cascade.diffusion`'s loss (MSE to the prediction target, min-SNR weighted when configured) at a
        uniform timestep, with a uniform augmentation level and the caption dropped at p_drop_text."""
        c = self.config
        low, high = self._pairs(batch)
        b, device = high.shape[0], high.device
        if c.objective != "diffusion":
            error = self._regress(low, high.shape[-2:], *self._text(batch)) - high.float()
            return error.abs().mean() if c.objective == "l1" else error.pow(2).mean()
        level = torch.rand(b, device=device) * c.train_aug_max
        low_up = self._condition(low, high.shape[-1], level)
        t = sample_timesteps(self.schedule, b, device=device)
        x0 = high - bicubic_upsample(low, high.shape[-1]) if c.residual else high
        noise = torch.randn_like(x0)
        text, mask = self._text(batch)
        if mask is not None:
            mask = mask & (torch.rand(b, device=device) >= c.p_drop_text)[:, None]
        return diffusion_loss(self.schedule, lambda x_t, t_: self.net(x_t, low_up, t_, level, text, mask).float(),
                              x0.float(), t, noise.float(), c.prediction, snr_gamma=c.snr_gamma,
                              snr_plus_one=c.snr_plus_one)

    def _regress(self, low: torch.Tensor, size: tuple[int, int], text: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """objective l1 / l2: the high-res estimate in one pass, the network reading bicubic(low) (and zeros for
        x_t) at t = 0 and augmentation level 0; the residual over bicubic when `residual`."""
        base = bicubic_upsample(low, size)
        zero = torch.zeros(low.shape[0], device=low.device)
        out = self(torch.zeros_like(base), base, zero.long(), zero, text, text_mask).float()
        return out + base if self.config.residual else out

    # -- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, conditioning: dict[str, Any], *, sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None,
               aug_level: float | None = None, threshold: str | float | None = None,
               noise: torch.Tensor | None = None, aug_noise: torch.Tensor | None = None, progress: bool = False,
               callback: Callable[[dict], None] | None = None, eta: float = 0.0,
               known: torch.Tensor | None = None, mask: torch.Tensor | None = None, resample: int = 1,
               jump: int = 1, t_min: int | None = None) -> torch.Tensor:
        """Upsample conditioning["low_res"] (B, 3, h, w) in [-1, 1] by `scale` -> (B, 3, h*scale, w*scale).

        Optional conditioning["clip_tokens"] (B, L, D) and ["clip_mask"] (B, L) when the config has text.
        sampler, steps, guidance and t_min (the timestep sampling ends at) left as None are the config's
        (guidance acts only on a text-conditioned upsampler). The input is corrupted at `aug_level` (default:
        the config's), as in training, with `aug_noise` (B, 3, H, W) when given. `noise`, the starting x_T
        (B, 3, H, W), is drawn from `generator` when not given (after the augmentation noise). `threshold`
        defaults to "static" (clip x0 to [-1, 1]), or none for a residual model, whose x0 lies in [-2, 2].
        `callback` is called after every sampling step (with tiles, once all tiles of the step are done).
        `eta`: DDIM's noise (0: deterministic); the other samplers ignore it.

        Inpainting: with `known` (B, 3, H, W) in [-1, 1] (the original at the output size) and `mask`
        (B or 1, 1, H, W), 1 = repaint, the known region is replaced at every step (in the residual's terms
        for a residual model; `cascade.diffusion.inpainting`, with RePaint's `resample` and `jump`), and
        the output is `known` where the mask is 0, so the cascade keeps the original outside the mask at
        every resolution.
        """
        c = self.config
        sampler, steps, guidance = resolve_sampling(c, sampler, steps, guidance)
        low = conditioning["low_res"]
        if low.dim() != 4 or low.shape[1] != 3:
            raise UserError(f"low_res must be (B, 3, h, w), got {tuple(low.shape)}")
        low = low.to(self.device)
        b, _, h, w = low.shape
        size_h, size_w = h * self.scale, w * self.scale
        if size_h % self.net.downsample_factor or size_w % self.net.downsample_factor:
            raise UserError(f"output size {size_h}x{size_w} must be a multiple of {self.net.downsample_factor}")
        text, text_mask = conditioning.get("clip_tokens"), conditioning.get("clip_mask")
        text, text_mask = (None if v is None else v.to(self.device) for v in (text, text_mask))
        if not c.text:
            text = text_mask = None
        elif text is not None and text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if mask is not None:
            from cascade.masks import check_region

            check_region(known, mask, b, size_h, size_w)
            known, mask = known.to(low.device, torch.float32), mask.to(low.device, torch.float32)
        if c.objective != "diffusion":  # one pass: no noise, no steps; inpainting keeps the original outside the mask
            x = self._regress(low, (size_h, size_w), text, text_mask)
            if mask is not None:
                x = known * (1 - mask) + x * mask
            if callback is not None:
                callback({"x": x, "i": 0, "x0": x})
            return x.clamp(-1.0, 1.0)
        level = torch.full((b,), c.aug_level if aug_level is None else float(aug_level), device=low.device)
        low_up = self._condition(low, (size_h, size_w), level, generator, aug_noise)

        def denoise(x_t, t, cond_mask=None):
            lu, lv, tx, tm = repeat_to_batch(x_t.shape[0], low_up, level, text, text_mask)
            if tm is not None and cond_mask is not None:
                tm = tm & cond_mask[:, None]
            out = self(x_t, lu, t, lv, tx, tm).float()
            return model_output_to_eps(self.schedule, c.prediction, out, x_t, t)

        if threshold is None and not c.residual:
            threshold = "static"
        options = dict(sampler=sampler, steps=steps, eta=eta, guidance=guidance if text is not None else None,
                       threshold=threshold, generator=generator,
                       x_T=None if noise is None else noise.to(low.device), callback=callback, progress=progress,
                       t_min=c.t_min if t_min is None else t_min)
        base = bicubic_upsample(low, (size_h, size_w)) if c.residual else None
        if mask is not None:
            target = known - base if c.residual else known  # the known region in the network's x0 terms
            x = sample_inpaint(denoise, target, mask, schedule=self.schedule, resample=resample, jump=jump,
                               **options)
        else:
            x = sample(denoise, (b, 3, size_h, size_w), schedule=self.schedule, device=low.device, **options)
        if c.residual:
            x = x + base
        return x.clamp(-1.0, 1.0)

    # -- evaluation ---------------------------------------------------------------------------------

    preview_columns = ("bicubic", "SR", "real")

    @torch.no_grad()
    def preview(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Rows of [bicubic, upsampled, real] for up to 4 validation images (detailed crops if eval_crop)."""
        low, high, cond, _ = eval_pairs(self, [batch], 4)
        out = self.sample(cond, generator=generator)
        bicubic = bicubic_upsample(low, high.shape[-1])
        return torch.stack([bicubic, out, high], dim=1).flatten(0, 1)  # (3N, 3, H, W)

    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator, train_batches=None) -> dict[str, float]:
        """See `superres.evaluation.evaluate_superres`."""
        return evaluate_superres(self, batches, generator)


@register_stage("sr256")
class SR256(SuperResStage):
    """64 -> 256, trained on whole images with blur degradation (DALL-E 2's first upsampler)."""

    Config = SRConfig
    image_sizes = (64, 256)
    low_size, high_size = 64, 256


@register_stage("sr1024")
class SR1024(SuperResStage):
    """256 -> 1024, trained on aligned 64 -> 256 crops with BSR-style degradation, run on whole images."""

    Config = SR1024Config
    image_sizes = (256, 1024)
    low_size, high_size = 256, 1024
