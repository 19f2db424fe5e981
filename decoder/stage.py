"""The 64x64 decoder stage: p(x | z_i, text), a conditional diffusion model (unCLIP, Ramesh et al. 2022,
section 2.1), trained with classifier-free dropout of z_i (10%) and text (50%) and sampled with any of
`cascade.diffusion`'s samplers, guidance and thresholding.

With `conditioning: imagen` it is Imagen's base model instead (Saharia et al. 2022): p(x | text) from a
frozen language model's features of the captions (`decoder.conditioning.TextConditioning`), computed
here from the batch's `txt` (`cascade.encoders.frozen_text`); no image embedding, so no prior before it.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch

from cascade import diffusion
from cascade.diffusion.noise import randn
from cascade.errors import UserError
from cascade.registry import register_stage
from cascade.stage import Stage, build_schedule, resolve_sampling
from decoder.conditioning import Conditioning, TextConditioning
from decoder.config import DecoderConfig
from decoder.unet import UNet


CONFIG = object()  # a keyword left out: the config's value (where None is a value of its own)
# What `sample` reads from its conditioning, per `DecoderConfig.conditioning`.
CONDITIONING_KEYS = {"unclip": ("clip_image", "clip_tokens", "clip_mask"), "imagen": ("txt",)}


@register_stage("decoder")
class Decoder(Stage):
    """U-Net decoder from CLIP image embeddings (and optional text tokens), or (imagen) from captions through a
    frozen language model, to 64x64 images in [-1, 1]."""

    Config = DecoderConfig
    image_sizes = (64,)
    needs_embeddings = True
    networks = ("conditioning", "unet")

    @classmethod
    def data_needs(cls, config: DecoderConfig) -> tuple[tuple[int, ...], bool]:
        return (config.image_size,), config.conditioning == "unclip"

    def __init__(self, config: DecoderConfig):
        super().__init__(config)
        self.conditioning = Conditioning(config) if config.conditioning == "unclip" else TextConditioning(config)
        self.conditioning_keys = CONDITIONING_KEYS[config.conditioning]
        out_channels = 6 if config.learned_variance else 3
        in_channels = 3 + 3 * config.self_condition + 4 * config.inpaint
        self.unet = UNet(image_size=config.image_size, in_channels=in_channels, out_channels=out_channels,
                         channels=config.channels, channel_mult=config.channel_mult,
                         num_res_blocks=config.block_counts, attention_resolutions=config.attention_resolutions,
                         head_dim=config.head_dim, context_dim=config.context_width,
                         emb_dim=config.embedding_dim, dropout=config.dropout, patch_size=config.patch_size,
                         coord_channels=config.coord_channels, attention_positions=config.attention_positions,
                         pixel_head=config.pixel_head, padding=config.padding,
                         pixel_head_padding=config.pixel_head_padding,
                         gradient_checkpointing=config.gradient_checkpointing)
        self._schedule = None

    @staticmethod
    def input_layout(config: DecoderConfig) -> list[tuple[str, int]]:
        """The U-Net stem's input channels in order, as (name, count): the image, the self-conditioning
        estimate, the inpainting channels (each folded by the space-to-depth patch), then the coordinates."""
        fold = config.patch_size**2
        layout = [("image", 3 * fold), ("self_condition", 3 * fold * config.self_condition),
                  ("inpaint", 4 * fold * config.inpaint), ("coordinates", 2 * config.coord_channels)]
        return [(name, n) for name, n in layout if n]

    def adapt_weights(self, state: dict[str, torch.Tensor], source: DecoderConfig) -> list[str]:
        """A decoder fine-tuned with more inputs than `source` had (inpainting, self-conditioning): the stem
        gets the source's weights for the inputs both have and zeros for the new ones, so it starts out
        computing exactly what the source did. The same for a `pixel_head` the source lacks: it keeps its
        initialisation, whose zero last layer leaves the source's output as it was."""
        notes = self._add_pixel_head(state, source)
        return notes + self._widen_stem(state, source)

    def _add_pixel_head(self, state: dict[str, torch.Tensor], source: DecoderConfig) -> list[str]:
        if bool(source.pixel_head) == bool(self.config.pixel_head):
            return []
        if source.pixel_head:
            raise UserError("the source decoder has a pixel head (pixel_head) that this config drops; "
                            "--init-from can only add one")
        state.update(self.unet.pixel_head.state_dict(prefix="unet.pixel_head."))  # copied in by the load
        return [f"unet.pixel_head: new ({self.config.pixel_head} channels; its last layer zero)"]

    def _widen_stem(self, state: dict[str, torch.Tensor], source: DecoderConfig) -> list[str]:
        key = "unet.stem.weight"
        old, new = self.input_layout(source), self.input_layout(self.config)
        if key not in state or old == new:
            return []
        if any(name not in dict(new) for name, _ in old):
            raise UserError(f"the source decoder reads inputs this config drops ({', '.join(dict(old))}); "
                            "--init-from can only add inputs")
        weight, offsets, start = state[key], {}, 0
        for name, n in old:
            offsets[name], start = start, start + n
        state[key] = torch.cat([weight[:, offsets[name]:offsets[name] + n] if name in offsets
                                else weight.new_zeros(weight.shape[0], n, *weight.shape[2:]) for name, n in new], dim=1)
        added = [name for name, _ in new if name not in offsets]
        return [f"{key}: {weight.shape[1]} -> {state[key].shape[1]} input channels (new, zero: {', '.join(added)})"]

    @property
    def schedule(self) -> diffusion.NoiseSchedule:
        # Built on first use, never under a meta-device context (the dalle2 configs only instantiate).
        if self._schedule is None:
            self._schedule = build_schedule(self.config)
        return self._schedule

    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
              mask: torch.Tensor | None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net's output in fp32, whatever its weights' dtype: the diffusion maths on it stay fp32.
        `extra`: the inpainting channels (masked image, mask), appended to x's."""
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        return self.unet(x, t, emb, context, mask).float()

    @staticmethod
    def inpaint_channels(known: torch.Tensor | None, mask: torch.Tensor | None, shape: tuple[int, ...],
                         device: torch.device) -> torch.Tensor:
        """The 4 inpainting input channels (B, 4, S, S): the known image zeroed where the mask repaints, and
        the mask (1 = repaint); without a mask, the whole image is repainted (plain generation)."""
        b, _, s, _ = shape
        if mask is None:
            return torch.cat([torch.zeros(b, 3, s, s, device=device), torch.ones(b, 1, s, s, device=device)], 1)
        mask = mask.to(device, torch.float32).expand(b, 1, s, s)
        return torch.cat([known.to(device, torch.float32) * (1 - mask), mask], dim=1)

    def rows(self, conditioning: dict[str, Any]) -> int:
        """How many images `conditioning` asks for."""
        key = self.conditioning_keys[0]
        if key not in conditioning:
            raise UserError(f"this decoder (conditioning: {self.config.conditioning}) needs '{key}' in its "
                            f"conditioning, got {sorted(conditioning)}")
        return len(conditioning[key])

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imagen: the frozen language model's (pooled, tokens, mask) of `texts`, on this stage's device. The
        model is not a submodule (`cascade.encoders.frozen_text`): it is built on first use, on this stage's
        device (fp32; on the CPU for a meta-device stage), and never saved with the decoder."""
        return self._text_encoder().encode(list(texts), device=self.device)

    def _text_encoder(self):
        """imagen: the shared frozen language model and its tokenizer, on this stage's device (the CPU for a
        meta-device stage)."""
        from cascade.encoders.frozen_text import frozen_text_encoder

        home = "cpu" if self.device.type == "meta" else self.device
        return frozen_text_encoder(self.config.text_encoder, self.config.text_len, home)

    def _condition(self, source: dict[str, Any], keep_image: torch.Tensor, keep_text: torch.Tensor):
        if self.config.conditioning == "imagen":
            pooled, tokens, mask = self.encode_text(source["txt"])
            return self.conditioning(pooled, tokens, mask, keep_text.to(self.device))
        image_emb = source["clip_image"].to(self.device)
        tokens, mask = source.get("clip_tokens"), source.get("clip_mask")
        if tokens is not None:
            tokens = tokens.to(self.device)
            mask = None if mask is None else mask.to(self.device, torch.bool)
        return self.conditioning(image_emb, tokens, mask, keep_image.to(self.device), keep_text.to(self.device))

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x0 = batch[f"image_{self.config.image_size}"].to(self.device, torch.float32)
        b = x0.shape[0]
        if self.config.p_drop_colour and self.training:
            batch = self._drop_colours(batch, b)
        keep_image = torch.rand(b, device=self.device) >= self.config.p_drop_image
        keep_text = torch.rand(b, device=self.device) >= self.config.p_drop_text
        emb, context, mask = self._condition(batch, keep_image, keep_text)
        t = diffusion.sample_timesteps(self.schedule, b, device=self.device, logit_normal=self.config.t_logit_normal,
                                        logit_mean=self.config.t_logit_mean)
        noise = torch.randn_like(x0)
        extra = None
        if self.config.inpaint:
            from cascade.masks import random_masks

            regions = random_masks(b, x0.shape[-1], p_whole=self.config.inpaint_whole, device=self.device)
            extra = self.inpaint_channels(x0, regions, x0.shape, self.device)

        def model(x_t: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
            if not self.config.self_condition:
                return self._unet(x_t, t_, emb, context, mask, extra)
            estimate = torch.zeros_like(x_t)
            rows = torch.nonzero(torch.rand(b, device=self.device) < 0.5).flatten()
            if rows.numel():
                with torch.no_grad():
                    estimate[rows] = self._x0_estimate(x_t[rows], t_[rows], estimate[rows], emb[rows],
                                                       context[rows], None if mask is None else mask[rows],
                                                       None if extra is None else extra[rows])
            return self._unet(torch.cat([x_t, estimate], dim=1), t_, emb, context, mask, extra)

        grounding = self.config.grounding_loss  # token grounding: from the attention this pass records
        with self._recording_attention() if grounding else nullcontext() as maps:
            loss = diffusion.diffusion_loss(
                self.schedule, model, x0, t, noise, self.config.prediction,
                learned_variance=self.config.learned_variance, snr_gamma=self.config.snr_gamma,
                snr_plus_one=self.config.snr_plus_one)
        if not grounding:
            return loss
        from decoder.grounding import grounding_loss, grounding_targets

        scenes = list(batch.get("json") or [{}] * b)
        targets = grounding_targets(batch["txt"], scenes, self._text_encoder().tokenizer, self.config.text_len,
                                    places=self.config.grounding_places)
        return loss + grounding * grounding_loss(maps, targets, scenes, keep_text)

    def _drop_colours(self, batch: dict[str, Any], b: int) -> dict[str, Any]:
        """The batch with each shapes object's colour word cut from its caption with probability
        `p_drop_colour` (`decoder.grounding.drop_colours`); one draw per sample and object slot."""
        from decoder.grounding import drop_colours

        scenes = list(batch.get("json") or [{}] * b)
        slots = max((len(s.get("objects") or ()) for s in scenes if isinstance(s, dict)), default=0)
        if not slots:
            return batch
        drop = (torch.rand(b, slots, device=self.device) < self.config.p_drop_colour).tolist()
        rewritten = [drop_colours(text, scene, row) for text, scene, row in zip(batch["txt"], scenes, drop)]
        return dict(batch, txt=[text for text, _ in rewritten], json=[scene for _, scene in rewritten])

    def text_attention(self, x_t: torch.Tensor, t: torch.Tensor, texts: list[str]) -> list[torch.Tensor]:
        """imagen: one forward of the U-Net at (x_t, t) reading `texts`, and per text-reading attention block
        the (B, HW, L) shares of each query's attention per context token (averaged over heads; token i of a
        text is context token 1 + i, after the null token). What the grounding loss reads; for diagnostics
        (`benchmarks/grounding_share.py`). No gradients are kept."""
        if self.config.conditioning != "imagen":
            raise ValueError("text_attention reads the token states of an Imagen-style decoder (conditioning: imagen)")
        with torch.no_grad():
            denoise = self.denoiser({"txt": list(texts)})  # the first sampling step's inputs, text kept
        with torch.enable_grad(), self._recording_attention() as maps:  # blocks record only with gradients on
            denoise(x_t.to(self.device, torch.float32), t.to(self.device))
        return [m.detach() for m in maps]

    @contextmanager
    def _recording_attention(self):
        """A list that every text-reading attention block appends its attention shares to, while inside."""
        from cascade.nn.attention import SelfAttention2d

        blocks = [m for m in self.unet.modules() if isinstance(m, SelfAttention2d) and m.context_kv is not None]
        maps: list[torch.Tensor] = []
        for block in blocks:
            block.record = maps
        try:
            yield maps
        finally:
            for block in blocks:
                block.record = None

    def _x0_estimate(self, x_t: torch.Tensor, t: torch.Tensor, estimate: torch.Tensor, emb: torch.Tensor,
                     context: torch.Tensor, mask: torch.Tensor | None,
                     extra: torch.Tensor | None = None) -> torch.Tensor:
        """The self-conditioning input: the net's x0 at (x_t, t) given `estimate`, clipped to [-1, 1]."""
        out = self._unet(torch.cat([x_t, estimate], dim=1), t, emb, context, mask, extra)[:, :3]
        return diffusion.model_output_to_x0(self.schedule, self.config.prediction, out, x_t, t).clamp(-1.0, 1.0)

    def denoiser(self, conditioning: dict[str, Any], negative: dict[str, Any] | None = None,
                 extra: torch.Tensor | None = None):
        """denoise(x_t, t, cond_mask=None) -> eps (or (eps, variance output)) for `cascade.diffusion.sample`.

        The conditioning is encoded once; rows where cond_mask is False get the null image embedding
        and null text (the classifier-free unconditional model), or, with `negative` (conditioning of
        the same keys and batch, e.g. a negative prompt's tokens and its prior embedding), that
        conditioning: guidance then steers away from it. Row r uses conditioning row r % B.
        With `self_condition` the function keeps each row's last x0 estimate and passes it on to the
        next call; a call whose t is not below the previous call's (a new trajectory) or whose batch
        differs starts again from zeros. `extra` (B, 4, S, S): an inpainting decoder's masked image and
        mask (`inpaint_channels`; default: the whole image repainted), the same for both guidance halves.
        """
        b = self.rows(conditioning)
        ones = torch.ones(b, dtype=torch.bool)
        cond = self._condition(conditioning, ones, ones)
        if negative is None:
            uncond = self._condition(conditioning, ~ones, ~ones)
        else:
            if set(negative) != set(conditioning) or self.rows(negative) != b:
                raise ValueError(f"negative conditioning needs the keys {sorted(conditioning)} and {b} rows")
            uncond = self._condition(negative, ones, ones)
        state: dict[str, torch.Tensor] = {}
        size = self.config.image_size
        if self.config.inpaint and extra is None:
            extra = self.inpaint_channels(None, None, (b, 3, size, size), self.device)
        elif not self.config.inpaint:
            extra = None

        def denoise(x: torch.Tensor, t: torch.Tensor, cond_mask: torch.Tensor | None = None):
            emb, context, mask = diffusion.repeat_to_batch(x.shape[0], *cond)
            channels = None if extra is None else diffusion.repeat_to_batch(x.shape[0], extra)[0]
            if cond_mask is not None:
                pick = cond_mask.to(x.device)
                emb, context, mask = (torch.where(pick.view(-1, *[1] * (c.ndim - 1)), c, u)
                                      for c, u in zip((emb, context, mask),
                                                      diffusion.repeat_to_batch(x.shape[0], *uncond)))
            if self.config.self_condition:
                last = state.get("x0")
                fresh = last is None or last.shape != x.shape or bool((t >= state["t"]).any())
                estimate = torch.zeros_like(x) if fresh else last
                out = self._unet(torch.cat([x, estimate], dim=1), t, emb, context, mask, channels)
                x0 = diffusion.model_output_to_x0(self.schedule, self.config.prediction, out[:, :3], x, t)
                state["x0"], state["t"] = x0.clamp(-1.0, 1.0), t
            else:
                out = self._unet(x, t, emb, context, mask, channels)
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
               strength: float = 1.0, known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               inpaint_method: str | None = None, resample: int = 1, jump: int = 1,
               regions: list | None = None, region_guidance: float = 2.0,
               region_share: float | None = None, t_min: int | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] for conditioning {"clip_image": (B, D), ["clip_tokens": (B, L, Dt),
        "clip_mask": (B, L)]}, or for an imagen decoder {"txt": B captions} (other keys are ignored).
        sampler, steps, guidance and t_min (the timestep sampling ends at, `cascade.diffusion`) left as
        None, and threshold left out, are the config's. `noise` (B, 3, S, S) or (1, 3, S, S) fixes x_T, so
        equal noise and conditioning give equal images with a deterministic sampler (DDIM with eta 0,
        DPM-Solver++). `callback` is called after every sampling step (see `cascade.diffusion.sample`).
        `negative`: what guidance steers away from instead of the null conditioning (see `denoiser`). `init`
        (B, 3, S, S) in [-1, 1]: image to image (`cascade.diffusion.sample_from_image`) at `strength`; x_T is
        drawn as without it, so strength 1 gives the images `sample` gives without `init`.

        Inpainting: `known` (B, 3, S, S) in [-1, 1] and `mask` (B or 1, 1, S, S) in [0, 1], 1 = repaint;
        the result is `known` where the mask is 0. `inpaint_method` "replace" (any decoder: the known region
        replaced at every step, `cascade.diffusion.inpainting`, with RePaint's `resample` and `jump`) or
        "glide" (a decoder trained with `inpaint: true` reads the masked image and the mask); default
        "glide" for such a decoder, else "replace".

        Per-object guidance (an Imagen-style decoder; `cascade.layout.prompt_regions`): `regions` has, per
        row, None or [(an object's own caption, (S, S) mask of its place)]; each object's guidance term
        counts only inside its mask, eps = eps_u + w (eps_c - eps_u) + region_guidance * sum_k
        M_k (eps_k - eps_u), one more forward pass per object and step, at the steps whose t is in the
        noisiest `region_share` of the schedule (t >= (1 - share) T; default: the config's), plain guidance
        at the others."""
        sampler, steps, guidance = resolve_sampling(self.config, sampler, steps, guidance)
        threshold = self.config.threshold if threshold is CONFIG else threshold
        b, s = self.rows(conditioning), self.config.image_size
        if noise is not None:
            noise = noise.to(self.device, torch.float32).expand(b, 3, s, s)
        options = dict(eta=eta, guidance=guidance, threshold=threshold, generator=generator, callback=callback,
                       progress=progress, t_min=self.config.t_min if t_min is None else t_min)
        if regions is not None and any(regions):
            if mask is not None or init is not None:
                raise UserError("per-object regions do not combine with inpainting or image to image")
            if len(regions) != b:
                raise UserError(f"regions: one entry per image ({b}), got {len(regions)}")
            share = self.config.region_share if region_share is None else region_share
            if not 0.0 < share <= 1.0:  # NaN fails too
                raise UserError(f"region share {share:g}: must be in (0, 1] (the noisiest share of the timesteps)")
            denoise = self._regional(self.denoiser(conditioning, negative), regions, guidance, region_guidance,
                                     share)
            x = diffusion.sample(denoise, (b, 3, s, s), schedule=self.schedule, sampler=sampler, steps=steps,
                                 x_T=noise, device=self.device, **{**options, "guidance": None})
            return x.clamp(-1.0, 1.0)
        if mask is not None:
            method = self.inpaint_method(inpaint_method)
            known, mask = self._check_inpaint(known, mask, init, b)
            if method == "replace":  # an inpainting decoder then generates (whole mask) while the region is replaced
                x = diffusion.sample_inpaint(self.denoiser(conditioning, negative), known, mask,
                                             schedule=self.schedule, sampler=sampler, steps=steps,
                                             resample=resample, jump=jump, x_T=noise, **options)
            else:
                extra = self.inpaint_channels(known, mask, (b, 3, s, s), self.device)
                x = diffusion.sample(self.denoiser(conditioning, negative, extra), (b, 3, s, s),
                                     schedule=self.schedule, sampler=sampler, steps=steps, x_T=noise,
                                     device=self.device, **options)
                x = mask * x + (1 - mask) * known
        elif init is not None:
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

    def _regional(self, base: Callable, regions: list, guidance: float | None, weight: float,
                  share: float = 1.0) -> Callable:
        """A denoise function that does its own guidance: `base`'s (conditional and unconditional halves in
        one call) plus, at t >= (1 - share) T, each object's term inside its mask (see `sample`); no
        `cond_mask` is passed to it."""
        from cascade.diffusion.guidance import combine_guidance, guidance_halves, split_output

        if self.config.conditioning != "imagen":
            raise UserError("per-object regions need an Imagen-style decoder (conditioning: imagen): an unCLIP "
                            "decoder would need an image embedding of each object")
        s = self.config.image_size
        terms = []  # per object k: (the rows that have a k-th object, their denoiser, their masks)
        for k in range(max(len(r) for r in regions if r)):
            rows = [i for i, r in enumerate(regions) if r and k < len(r)]
            masks = torch.zeros(len(rows), 1, s, s)
            for j, i in enumerate(rows):
                mask = torch.as_tensor(regions[i][k][1]).detach().to("cpu", torch.float32)
                if tuple(mask.shape) != (s, s):
                    raise UserError(f"regions: each object's mask must be ({s}, {s}), got {tuple(mask.shape)}")
                masks[j, 0] = mask
            terms.append((torch.tensor(rows, device=self.device),
                          self.denoiser({"txt": [regions[i][k][0] for i in rows]}), masks.to(self.device)))
        w = 1.0 if guidance is None else float(guidance)
        first = (1.0 - share) * self.schedule.timesteps  # the per-object terms from the noisiest t down to here

        def denoise(x: torch.Tensor, t: torch.Tensor, cond_mask: torch.Tensor | None = None):
            eps_c, eps_u, variance = guidance_halves(base, x, t)
            out = combine_guidance(eps_c, eps_u, w)
            if float(t.max()) < first:  # past the layout: plain guidance, and no extra forward passes
                return out if variance is None else (out, variance)
            for rows, term, masks in terms:
                eps_k = split_output(term(x[rows], t[rows]))[0]
                out = out.index_add(0, rows, weight * masks * (eps_k - eps_u[rows]))
            return out if variance is None else (out, variance)

        return denoise

    def inpaint_method(self, requested: str | None = None) -> str:
        """The inpainting method a request means: `requested`, or by default "glide" for a decoder trained
        with `inpaint: true` and "replace" for any other; a UserError for one this decoder cannot run."""
        method = requested or ("glide" if self.config.inpaint else "replace")
        if method not in ("replace", "glide"):
            raise UserError(f"unknown inpainting method '{method}' (choose replace or glide)")
        if method == "glide" and not self.config.inpaint:
            raise UserError("the glide inpainting method needs a decoder trained with model.inpaint: true "
                            "(fine-tune one with train_stage.py --init-from BUNDLE/decoder); use replace")
        return method

    def _check_inpaint(self, known: torch.Tensor | None, mask: torch.Tensor, init: torch.Tensor | None,
                       b: int) -> tuple[torch.Tensor, torch.Tensor]:
        from cascade.masks import check_region

        if init is not None:
            raise UserError("inpainting and image to image (init) do not combine")
        check_region(known, mask, b, self.config.image_size, self.config.image_size)
        return known.to(self.device, torch.float32), mask.to(self.device, torch.float32)

    @torch.no_grad()
    def preview(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        n = min(8, self.rows(batch))
        conditioning = {k: batch[k][:n] for k in self.conditioning_keys if k in batch}
        return self.sample(conditioning, generator=generator)

    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator, train_batches=None) -> dict[str, float]:
        from decoder.evaluation import evaluate_decoder

        return evaluate_decoder(self, batches, generator)
