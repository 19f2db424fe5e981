"""The super-resolution stages: `sr256` (64 -> 256) and `sr1024` (256 -> 1024).

Training (Ho et al. 2022, "Cascaded Diffusion Models"; Imagen; DALL-E 2, appendix C): the low-res
image is degraded as the previous stage's output would be (Gaussian blur for 64 -> 256, a BSR-style
mix of blur, resize and JPEG for 256 -> 1024), upsampled bicubically to the output size, corrupted by
a forward-diffusion step at a random augmentation level s, and the network, told s and the
timestep, learns to denoise the high-res image given it. sr1024 trains on aligned random crops and
runs on whole images (the network is fully convolutional; see `superres.unet`), in tiles when
`tile_size` is set (see `superres.tiling`).

Sampling: `sample({"low_res": (B, 3, h, w)[, "clip_tokens", "clip_mask"]}, aug_level=0.2)`.
Evaluation: PSNR and SSIM against the real high-res image, beside bicubic upsampling, swept over
augmentation level and step count.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F

from cascade.config import Config
from cascade.data.degradations import mixed_degradation, random_blur
from cascade.data.sources import balanced_batch, source_of
from cascade.diffusion import NoiseSchedule, model_output_to_eps, prediction_target, q_sample, sample
from cascade.errors import UserError
from cascade.registry import register_stage
from cascade.stage import Stage
from superres.augmentation import noise_augment
from superres.metrics import bicubic_upsample, psnr, ssim
from superres.tiling import tiled_apply
from superres.unet import EfficientUNet


class SRConfig(Config):
    """The `model:` section of an sr256 / sr1024 config."""

    # network (Imagen's Efficient U-Net: channels = base_channels * channel_mults[i] at level i)
    base_channels: int = 32
    channel_mults: list[int] = [1, 2, 4]
    num_res_blocks: list[int] = [1, 2, 2]
    dropout: float = 0.0
    # text conditioning by cross-attention at the lowest resolution (Imagen); DALL-E 2 used none
    text: bool = False
    text_dim: int = 512  # width of clip_tokens
    head_dim: int = 64
    p_uncond: float = 0.1  # caption dropout, for classifier-free guidance
    # diffusion
    schedule: Literal["linear", "cosine", "angle"] = "cosine"
    timesteps: int = 1000
    prediction: Literal["eps", "x0", "v"] = "v"
    # diffuse the residual high - bicubic(low) instead of the image (SRDiff, Li et al. 2022): a new
    # network then starts at bicubic quality instead of noise, which short CPU runs need
    residual: bool = False
    # noise-conditioning augmentation: train on s ~ U[0, train_aug_max]; sample at aug_level
    train_aug_max: float = 0.5
    aug_level: float = 0.2
    # low-res degradation in training: "blur" (sigma ~ U[0, level * blur_sigma]) or "mixed" (BSR-style)
    degradation: Literal["none", "blur", "mixed"] = "blur"
    degradation_max: float = 1.0  # level ~ U[0, degradation_max]
    degradation_prob: float = 0.5
    blur_sigma: float = 0.6
    # random aligned crops for training, as the high-res crop size (None: whole images)
    train_crop: int | None = None
    # tiled inference (None: one pass over the whole image); sizes in high-res pixels
    tile_size: int | None = None
    tile_margin: int = 16
    # sampling and evaluation
    sampler: Literal["ddpm", "ddim", "dpmpp"] = "ddim"
    steps: int = 25
    eval_images: int = 8
    eval_crop: int | None = None  # evaluate on the most detailed crop of this high-res size (None: whole)
    eval_steps: list[int] = [5, 25]
    eval_aug_levels: list[float] = [0.0, 0.1, 0.2, 0.4]


class SR1024Config(SRConfig):
    degradation: Literal["none", "blur", "mixed"] = "mixed"
    train_crop: int | None = 256
    tile_size: int | None = 256
    eval_crop: int | None = 256


class SuperResStage(Stage):
    """A diffusion upsampler from low_size to high_size; see the module docstring."""

    Config: ClassVar[type[Config]] = SRConfig
    low_size: ClassVar[int] = 64
    high_size: ClassVar[int] = 256

    @classmethod
    def data_needs(cls, config: SRConfig) -> tuple[tuple[int, ...], bool]:
        # the reader loads CLIP tokens only for a text-conditioned upsampler
        return tuple(cls.image_sizes), config.text

    def __init__(self, config: SRConfig):
        super().__init__(config)
        self._check(config)
        self.net = EfficientUNet(base_channels=config.base_channels, channel_mults=config.channel_mults,
                                 num_res_blocks=config.num_res_blocks, dropout=config.dropout,
                                 text_dim=config.text_dim if config.text else None, head_dim=config.head_dim)
        with torch.device("cpu"):  # the schedule is data, not weights: keep it real under a meta device
            self.schedule = NoiseSchedule.from_name(config.schedule, config.timesteps)

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
        for name in ("train_aug_max", "aug_level", "degradation_max", "degradation_prob", "p_uncond"):
            if not 0.0 <= getattr(c, name) <= 1.0:
                raise UserError(f"model.{name} must be in [0, 1], got {getattr(c, name)}")

    # -- data ---------------------------------------------------------------------------------------

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
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Bicubic upsampling to the output size, then the forward-diffusion corruption at `level`."""
        return noise_augment(bicubic_upsample(low, size), level, self.schedule, generator)

    def forward(self, x_t: torch.Tensor, low_up: torch.Tensor, t: torch.Tensor, aug_level: torch.Tensor,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The network output (eps, x0 or v per config), tiled over large images when configured."""
        c = self.config
        if c.tile_size is None or max(x_t.shape[-2:]) <= c.tile_size:
            return self.net(x_t, low_up, t, aug_level, text, text_mask)
        return tiled_apply(self.net, [x_t, low_up], tile=c.tile_size, margin=c.tile_margin,
                           align=self.net.downsample_factor, t=t, aug_level=aug_level, text=text,
                           text_mask=text_mask)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """MSE to the prediction target at a uniform timestep, with a uniform augmentation level."""
        c = self.config
        low, high = self._pairs(batch)
        b, device = high.shape[0], high.device
        level = torch.rand(b, device=device) * c.train_aug_max
        low_up = self._condition(low, high.shape[-1], level)
        t = torch.randint(0, self.schedule.timesteps, (b,), device=device)
        x0 = high - bicubic_upsample(low, high.shape[-1]) if c.residual else high
        noise = torch.randn_like(x0)
        x_t = q_sample(self.schedule, x0, t, noise)
        text, mask = self._text(batch)
        if mask is not None:
            mask = mask & (torch.rand(b, device=device) >= c.p_uncond)[:, None]
        out = self.net(x_t, low_up, t, level, text, mask)
        target = prediction_target(self.schedule, c.prediction, x0, noise, t)
        return F.mse_loss(out.float(), target.float())

    # -- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, conditioning: dict[str, Any], *, sampler: str | None = None, steps: int | None = None,
               guidance: float = 1.0, generator: torch.Generator | None = None,
               aug_level: float | None = None, threshold: str | float | None = None,
               noise: torch.Tensor | None = None, progress: bool = False,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Upsample conditioning["low_res"] (B, 3, h, w) in [-1, 1] by `scale` -> (B, 3, h*scale, w*scale).

        Optional conditioning["clip_tokens"] (B, L, D) and ["clip_mask"] (B, L) when the config has text.
        The input is corrupted at `aug_level` (default: the config's), as in training. `noise`, the
        starting x_T (B, 3, H, W), is drawn from `generator` when not given. `threshold` defaults to
        "static" (clip x0 to [-1, 1]), or none for a residual model, whose x0 lies in [-2, 2].
        `callback` is called after every sampling step (with tiles, once all tiles of the step are done).
        """
        c = self.config
        low = conditioning["low_res"]
        if low.dim() != 4 or low.shape[1] != 3:
            raise UserError(f"low_res must be (B, 3, h, w), got {tuple(low.shape)}")
        b, _, h, w = low.shape
        size_h, size_w = h * self.scale, w * self.scale
        if size_h % self.net.downsample_factor or size_w % self.net.downsample_factor:
            raise UserError(f"output size {size_h}x{size_w} must be a multiple of {self.net.downsample_factor}")
        level = torch.full((b,), c.aug_level if aug_level is None else float(aug_level), device=low.device)
        low_up = self._condition(low, (size_h, size_w), level, generator)
        text, mask = conditioning.get("clip_tokens"), conditioning.get("clip_mask")
        if not c.text:
            text = mask = None
        elif text is not None and mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)

        def denoise(x_t, t, cond_mask=None):
            reps = x_t.shape[0] // b
            lu, lv = low_up.repeat(reps, 1, 1, 1), level.repeat(reps)
            tx = None if text is None else text.repeat(reps, 1, 1)
            tm = None if mask is None else mask.repeat(reps, 1)
            if tm is not None and cond_mask is not None:
                tm = tm & cond_mask[:, None]
            out = self(x_t, lu, t, lv, tx, tm)
            return model_output_to_eps(self.schedule, c.prediction, out, x_t, t)

        if threshold is None and not c.residual:
            threshold = "static"
        x = sample(denoise, (b, 3, size_h, size_w), schedule=self.schedule, sampler=sampler or c.sampler,
                   steps=steps or c.steps, guidance=guidance if text is not None else None,
                   threshold=threshold, generator=generator, x_T=noise, callback=callback, progress=progress)
        if c.residual:
            x = x + bicubic_upsample(low, (size_h, size_w))
        return x.clamp(-1.0, 1.0)

    # -- evaluation ---------------------------------------------------------------------------------

    def _eval_pairs(self, batches, limit: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], list[str]]:
        """Up to `limit` clean (low, high) pairs, split evenly over the sources present (shapes scenes and
        emoji renders, from each sample's json), each cut to its most detailed eval_crop; plus text
        conditioning and the source of every pair."""
        picked = balanced_batch(batches, limit, max_batches=None)
        if picked is None:
            raise UserError("no validation images to evaluate on")
        low, high = picked[f"image_{self.low_size}"], picked[f"image_{self.high_size}"]
        sources = [source_of(scene) for scene in picked.get("json") or [{}] * len(low)]
        if self.config.eval_crop is not None and self.config.eval_crop < self.high_size:
            low, high = detailed_crops(low, high, self.config.eval_crop // self.scale, self.scale)
        cond = {"low_res": low}
        if self.config.text:
            cond.update(clip_tokens=picked["clip_tokens"].float(), clip_mask=picked["clip_mask"].bool())
        return low, high, cond, sources

    @torch.no_grad()
    def preview(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Rows of [bicubic, upsampled, real] for up to 4 validation images (detailed crops if eval_crop)."""
        low, high, cond, _ = self._eval_pairs([batch], 4)
        out = self.sample(cond, generator=generator)
        bicubic = bicubic_upsample(low, high.shape[-1])
        return torch.stack([bicubic, out, high], dim=1).flatten(0, 1)  # (3N, 3, H, W)

    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator) -> dict[str, float]:
        """PSNR (dB, capped at 100) and SSIM against the real high-res image for bicubic and for every
        (aug level, steps), on up to eval_images pairs split evenly over the val sources.

        Keys: psnr_bicubic, ssim_bicubic, psnr_aug{s}_steps{n}, ssim_aug{s}_steps{n}, psnr_best /
        ssim_best over the sweep; with more than one source, also psnr_bicubic_{source},
        psnr_best_{source} (and ssim_) for each, source being "shapes" or "emoji".
        """
        c = self.config
        low, high, cond, sources = self._eval_pairs(batches, c.eval_images)
        bicubic = bicubic_upsample(low, high.shape[-1])
        scores = {"bicubic": (psnr(bicubic, high), ssim(bicubic, high))}
        seed = int(torch.randint(2 ** 31, (), generator=generator))
        for level, steps in itertools.product(c.eval_aug_levels, c.eval_steps):
            g = torch.Generator().manual_seed(seed)  # the same noise for every setting of the sweep
            out = self.sample(cond, steps=steps, generator=g, aug_level=level)
            scores[f"aug{level:g}_steps{steps}"] = (psnr(out, high), ssim(out, high))
        groups = {"": torch.ones(len(low), dtype=torch.bool)}
        if len(set(sources)) > 1:
            groups.update({f"_{name}": torch.tensor([s == name for s in sources]) for name in sorted(set(sources))})
        sweep = [k for k in scores if k != "bicubic"]
        metrics = {}
        for suffix, rows in groups.items():
            # every setting overall; per source only bicubic and the best of the sweep
            for key in scores if not suffix else ["bicubic"]:
                metrics[f"psnr_{key}{suffix}"] = scores[key][0][rows].mean().item()
                metrics[f"ssim_{key}{suffix}"] = scores[key][1][rows].mean().item()
            metrics[f"psnr_best{suffix}"] = max(scores[k][0][rows].mean().item() for k in sweep)
            metrics[f"ssim_best{suffix}"] = max(scores[k][1][rows].mean().item() for k in sweep)
            metrics[f"eval_images{suffix}"] = float(rows.sum())
        return metrics


def detailed_crops(low: torch.Tensor, high: torch.Tensor, crop: int, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the aligned (low crop x crop, high crop*scale square) pair whose low-res crop has the
    most edge energy (sum of absolute neighbour differences), searched on a grid of stride crop / 4.
    A centre crop of a shapes scene is often flat background, where every upsampler is exact (PSNR inf)
    and the eval would say nothing."""
    stride = max(1, crop // 4)
    edges = torch.zeros(low.shape[0], 1, *low.shape[-2:])
    edges[..., :, 1:] += (low[..., :, 1:] - low[..., :, :-1]).abs().sum(1, keepdim=True)
    edges[..., 1:, :] += (low[..., 1:, :] - low[..., :-1, :]).abs().sum(1, keepdim=True)
    energy = F.avg_pool2d(edges, crop, stride=stride)  # (B, 1, ny, nx): windows at multiples of stride
    best = energy.flatten(1).argmax(1)
    nx = energy.shape[-1]
    lows, highs = [], []
    for i, b in enumerate(best.tolist()):
        y, x = (b // nx) * stride, (b % nx) * stride
        lows.append(low[i, :, y:y + crop, x:x + crop])
        highs.append(high[i, :, y * scale:(y + crop) * scale, x * scale:(x + crop) * scale])
    return torch.stack(lows), torch.stack(highs)


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
