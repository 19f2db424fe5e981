"""The 64x64 decoder stage: p(x | z_i, text), a conditional diffusion model (unCLIP, Ramesh et al. 2022,
section 2.1), trained with classifier-free dropout of z_i (10%) and text (50%) and sampled with any of
`cascade.diffusion`'s samplers, guidance and thresholding.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from cascade import diffusion
from cascade.diffusion.noise import randn
from cascade.errors import UserError
from cascade.registry import register_stage
from cascade.stage import Stage, resolve_sampling
from decoder.conditioning import Conditioning
from decoder.config import DecoderConfig
from decoder.unet import UNet


CONFIG = object()  # a keyword left out: the config's value (where None is a value of its own)


@register_stage("decoder")
class Decoder(Stage):
    """U-Net decoder from CLIP image embeddings (and optional text tokens) to 64x64 images in [-1, 1]."""

    Config = DecoderConfig
    image_sizes = (64,)
    needs_embeddings = True
    networks = ("conditioning", "unet")

    @classmethod
    def data_needs(cls, config: DecoderConfig) -> tuple[tuple[int, ...], bool]:
        return (config.image_size,), True

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.conditioning = Conditioning(config)
        out_channels = 6 if config.learned_variance else 3
        in_channels = 6 if config.self_condition else 3
        self.unet = UNet(image_size=config.image_size, in_channels=in_channels, out_channels=out_channels,
                         channels=config.channels, channel_mult=config.channel_mult,
                         num_res_blocks=config.block_counts, attention_resolutions=config.attention_resolutions,
                         head_dim=config.head_dim, context_dim=config.context_width,
                         emb_dim=config.embedding_dim, dropout=config.dropout, patch_size=config.patch_size,
                         coord_channels=config.coord_channels, attention_positions=config.attention_positions,
                         gradient_checkpointing=config.gradient_checkpointing)
        self._schedule = None

    @property
    def schedule(self) -> diffusion.NoiseSchedule:
        # Built on first use, never under a meta-device context (the dalle2 configs only instantiate).
        if self._schedule is None:
            with torch.device("cpu"):
                self._schedule = diffusion.NoiseSchedule.from_name(self.config.schedule, self.config.timesteps)
        return self._schedule

    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
        """The U-Net's output in fp32, whatever its weights' dtype: the diffusion maths on it stay fp32."""
        return self.unet(x, t, emb, context, mask).float()

    def _condition(self, source: dict[str, Any], keep_image: torch.Tensor, keep_text: torch.Tensor):
        image_emb = source["clip_image"].to(self.device)
        tokens, mask = source.get("clip_tokens"), source.get("clip_mask")
        if tokens is not None:
            tokens = tokens.to(self.device)
            mask = None if mask is None else mask.to(self.device, torch.bool)
        return self.conditioning(image_emb, tokens, mask, keep_image.to(self.device), keep_text.to(self.device))

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x0 = batch[f"image_{self.config.image_size}"].to(self.device, torch.float32)
        b = x0.shape[0]
        keep_image = torch.rand(b, device=self.device) >= self.config.p_drop_image
        keep_text = torch.rand(b, device=self.device) >= self.config.p_drop_text
        emb, context, mask = self._condition(batch, keep_image, keep_text)
        t = diffusion.sample_timesteps(self.schedule, b, device=self.device, logit_normal=self.config.t_logit_normal,
                                        logit_mean=self.config.t_logit_mean)
        noise = torch.randn_like(x0)

        def model(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
            if not self.config.self_condition:
                return self._unet(x_t, t_, emb, context, mask)
            estimate = torch.zeros_like(x_t)
            rows = torch.nonzero(torch.rand(b, device=self.device) < 0.5).flatten()
            if rows.numel():
                with torch.no_grad():
                    estimate[rows] = self._x0_estimate(x_t[rows], t_[rows], estimate[rows], emb[rows],
                                                       context[rows], None if mask is None else mask[rows])
            return self._unet(torch.cat([x_t, estimate], dim=1), t_, emb, context, mask)

        return diffusion.diffusion_loss(
            self.schedule, model, x0, t, noise,
            self.config.prediction, learned_variance=self.config.learned_variance, snr_gamma=self.config.snr_gamma,
            snr_plus_one=self.config.snr_plus_one)

    def _x0_estimate(self, x_t: torch.Tensor, t: torch.Tensor, estimate: torch.Tensor, emb: torch.Tensor,
                     context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The self-conditioning input: the net's x0 at (x_t, t) given `estimate`, clipped to [-1, 1]."""
        out = self._unet(torch.cat([x_t, estimate], dim=1), t, emb, context, mask)[:, :3]
        return diffusion.model_output_to_x0(self.schedule, self.config.prediction, out, x_t, t).clamp(-1.0, 1.0)

    def denoiser(self, conditioning: dict[str, Any], negative: dict[str, Any] | None = None):
        """denoise(x_t, t, cond_mask=None) -> eps (or (eps, variance output)) for `cascade.diffusion.sample`.

        The conditioning is encoded once; rows where cond_mask is False get the null image embedding
        and null text (the classifier-free unconditional model), or, with `negative` (conditioning of
        the same keys and batch, e.g. a negative prompt's tokens and its prior embedding), that
        conditioning: guidance then steers away from it. Row r uses conditioning row r % B.
        With `self_condition` the function keeps each row's last x0 estimate and passes it on to the
        next call; a call whose t is not below the previous call's (a new trajectory) or whose batch
        differs starts again from zeros.
        """
        b = conditioning["clip_image"].shape[0]
        ones = torch.ones(b, dtype=torch.bool)
        cond = self._condition(conditioning, ones, ones)
        if negative is None:
            uncond = self._condition(conditioning, ~ones, ~ones)
        else:
            if set(negative) != set(conditioning) or negative["clip_image"].shape[0] != b:
                raise ValueError(f"negative conditioning needs the keys {sorted(conditioning)} and {b} rows")
            uncond = self._condition(negative, ones, ones)
        state: dict[str, torch.Tensor] = {}

        def denoise(x: torch.Tensor, t: torch.Tensor, cond_mask: torch.Tensor | None = None):
            emb, context, mask = diffusion.repeat_to_batch(x.shape[0], *cond)
            if cond_mask is not None:
                pick = cond_mask.to(x.device)
                emb, context, mask = (torch.where(pick.view(-1, *[1] * (c.ndim - 1)), c, u)
                                      for c, u in zip((emb, context, mask),
                                                      diffusion.repeat_to_batch(x.shape[0], *uncond)))
            if self.config.self_condition:
                last = state.get("x0")
                fresh = last is None or last.shape != x.shape or bool((t >= state["t"]).any())
                estimate = torch.zeros_like(x) if fresh else last
                out = self._unet(torch.cat([x, estimate], dim=1), t, emb, context, mask)
                x0 = diffusion.model_output_to_x0(self.schedule, self.config.prediction, out[:, :3], x, t)
                state["x0"], state["t"] = x0.clamp(-1.0, 1.0), t
            else:
                out = self._unet(x, t, emb, context, mask)
            variance = None
            if self.config.learned_variance:
                out, variance = out.chunk(2, dim=1)
            eps = diffusion.model_output_to_eps(self.schedule, self.config.prediction, out, x, t)
            return eps if variance is None else (eps, variance)

        return denoise

    @torch.no_grad()
    def sample(self, conditioning: dict[str, Any], *, sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None,
               threshold: str | float | None | object = CONFIG, noise: torch.Tensor | None = None,
               eta: float = 0.0, progress: bool = False, callback: Callable[[dict], None] | None = None,
               negative: dict[str, Any] | None = None, init: torch.Tensor | None = None,
               strength: float = 1.0) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] for conditioning {"clip_image": (B, D), ["clip_tokens": (B, L, Dt),
        "clip_mask": (B, L)]}. sampler, steps and guidance left as None, and threshold left out, are the
        config's. `noise` (B, 3, S, S) or (1, 3, S, S) fixes x_T, so equal noise and conditioning give
        equal images with a deterministic sampler (DDIM with eta 0, DPM-Solver++). `callback` is called
        after every sampling step (see `cascade.diffusion.sample`). `negative`: what guidance steers away
        from instead of the null conditioning (see `denoiser`). `init` (B, 3, S, S) in [-1, 1]: image to
        image (`cascade.diffusion.sample_from_image`) at `strength`; x_T is drawn as without it, so
        strength 1 gives the images `sample` gives without `init`."""
        sampler, steps, guidance = resolve_sampling(self.config, sampler, steps, guidance)
        threshold = self.config.threshold if threshold is CONFIG else threshold
        b, s = conditioning["clip_image"].shape[0], self.config.image_size
        if noise is not None:
            noise = noise.to(self.device, torch.float32).expand(b, 3, s, s)
        options = dict(eta=eta, guidance=guidance, threshold=threshold, generator=generator, callback=callback,
                       progress=progress)
        if init is not None:
            if tuple(init.shape) != (b, 3, s, s):
                raise UserError(f"init image must be ({b}, 3, {s}, {s}), got {tuple(init.shape)}")
            if noise is None:  # drawn as `sample` draws x_T, so that strength 1 is plain sampling
                noise = randn((b, 3, s, s), generator, self.device)
            x = diffusion.sample_from_image(self.denoiser(conditioning, negative), init.to(self.device, torch.float32),
                                            strength, schedule=self.schedule, sampler=sampler, steps=steps,
                                            noise=noise, **options)
        else:
            x = diffusion.sample(self.denoiser(conditioning, negative), (b, 3, s, s), schedule=self.schedule,
                                 sampler=sampler, steps=steps, x_T=noise, device=self.device, **options)
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def preview(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        n = min(8, batch["clip_image"].shape[0])
        conditioning = {k: batch[k][:n] for k in ("clip_image", "clip_tokens", "clip_mask") if k in batch}
        return self.sample(conditioning, generator=generator)

    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator, train_batches=None) -> dict[str, float]:
        from decoder.evaluation import evaluate_decoder

        return evaluate_decoder(self, batches, generator)
