"""The diffusion prior stage: CLIP text embedding (+ token states) -> CLIP image embedding.

DALL-E 2 (Ramesh et al. 2022, sec. 2.2): a Gaussian diffusion over the L2-normalised image embedding
scaled by sqrt(D) (so its coordinates have unit variance, like the noise), cosine schedule (Nichol &
Dhariwal 2021), a causal transformer predicting x0 trained with MSE, text conditioning dropped 10% of
the time so classifier-free guidance (Ho & Salimans 2021) can be used, and at sampling time two draws
per caption of which the one with the larger dot product with the text embedding is kept.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from cascade.diffusion import diffusion_loss, model_output_to_eps, repeat_to_batch, sample_timesteps
from cascade.diffusion import sample as diffusion_sample
from cascade.errors import UserError
from cascade.progress_bars import ImageBar
from cascade.registry import register_stage
from cascade.stage import Stage, build_schedule, resolve_sampling
from prior.config import PriorConfig
from prior.metrics import embedding_scores, nearest_caption_images
from prior.network import PriorTransformer

_COND_KEYS = ("clip_text", "clip_tokens", "clip_mask")


@register_stage("prior")
class PriorStage(Stage):
    Config = PriorConfig
    image_sizes = ()
    needs_embeddings = True
    samples_images = False
    networks = ("net",)

    def __init__(self, config: PriorConfig):
        super().__init__(config)
        self.net = PriorTransformer(config)
        self.schedule = build_schedule(config)  # host-side constants, also when the network is built on "meta"
        self.scale = math.sqrt(config.embed_dim)
        # The train batches last given to `evaluate` and the (text, image) embeddings read from them.
        self._train_pairs_cache: tuple[Any, dict[str, torch.Tensor] | None] | None = None

    def _cond_tensors(self, conditioning: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clip_text, clip_tokens) as fp32 and clip_mask as bool, on the stage's device."""
        text, tokens, mask = (conditioning[key].to(self.device) for key in _COND_KEYS)
        return text.float(), tokens.float(), mask.bool()

    def _check_dims(self, batch: dict[str, Any]) -> None:
        cfg = self.config
        want = {"clip_text": (cfg.embed_dim,), "clip_tokens": (cfg.max_text_len, cfg.token_dim),
                "clip_mask": (cfg.max_text_len,)}
        for key, shape in want.items():
            if key not in batch:
                raise UserError(f"prior: batch has no '{key}'; run `cascade data embed` on the data first")
            if tuple(batch[key].shape[1:]) != shape:
                raise UserError(f"prior: '{key}' has shape {tuple(batch[key].shape[1:])} per sample but the "
                                f"model config expects {shape} (embed_dim/token_dim/max_text_len must match "
                                f"the CLIP that embedded the data)")

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """MSE to the prediction target (x0 by default) on the scaled image embedding at a uniform
        random timestep, min-SNR weighted when configured."""
        cfg = self.config
        self._check_dims(batch)
        x0 = batch["clip_image"].float() * self.scale  # (B, D)
        b = x0.shape[0]
        keep = torch.rand(b, device=x0.device) >= cfg.p_drop_text  # (B,)
        text, tokens, mask = batch["clip_text"].float(), batch["clip_tokens"].float(), batch["clip_mask"].bool()
        t = sample_timesteps(self.schedule, b, device=x0.device)
        noise = torch.randn_like(x0)
        return diffusion_loss(self.schedule, lambda x_t, tt: self.net(x_t, tt, text, tokens, mask, keep).float(),
                              x0, t, noise, cfg.prediction, snr_gamma=cfg.snr_gamma, snr_plus_one=cfg.snr_plus_one)

    @torch.no_grad()
    def sample(self, conditioning: dict[str, Any], *, sampler: str | None = None, steps: int | None = None,
               guidance: float | None = None, generator: torch.Generator | None = None,
               candidates: int | None = None, x_T: torch.Tensor | None = None,
               callback: Callable[[dict], None] | None = None, eta: float = 0.0,
               negative: dict[str, Any] | None = None, t_min: int | None = None) -> torch.Tensor:
        """Image embeddings (B, D), L2-normalised, for conditioning {"clip_text": (B, D),
        "clip_tokens": (B, L, Dt), "clip_mask": (B, L)}.

        sampler, steps, guidance, candidates and t_min (the timestep sampling ends at) left as None are the
        config's. With `candidates` = k, k embeddings are drawn per caption and the one closest to the text
        embedding is returned. `x_T` (B * k, D) fixes the starting noise. `callback` is called after every
        sampling step (see `cascade.diffusion.sample`); the k candidates share the steps. `eta`: DDIM's
        noise (0: deterministic); the other samplers ignore it. `negative` ({"clip_text", "clip_tokens",
        "clip_mask"} of B rows, e.g. a negative prompt's): guidance steers away from that text instead of
        from the null text.
        """
        cfg = self.config
        sampler, steps, guidance = resolve_sampling(cfg, sampler, steps, guidance)
        k = candidates or cfg.candidates
        self._check_dims(conditioning)
        device = self.device
        text, tokens, mask = self._cond_tensors(conditioning)
        b = text.shape[0]
        # Candidates are rows of one batch: row i * k + j is candidate j of caption i.
        text_k, tokens_k, mask_k = (c.repeat_interleave(k, dim=0) for c in (text, tokens, mask))
        neg_k = None
        if negative is not None:
            self._check_dims(negative)
            neg = self._cond_tensors(negative)
            if neg[0].shape[0] != b or neg[1].shape[1] != tokens.shape[1]:
                raise ValueError(f"negative conditioning needs {b} rows of {tokens.shape[1]} tokens")
            neg_k = [c.repeat_interleave(k, dim=0) for c in neg]

        def denoise(x_t: torch.Tensor, t: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
            rows = repeat_to_batch(x_t.shape[0], text_k, tokens_k, mask_k)
            if neg_k is not None and cond_mask is not None:  # the "unconditional" rows read the negative text
                pick = cond_mask.to(x_t.device)
                rows = [torch.where(pick.view(-1, *[1] * (c.ndim - 1)), c, n)
                        for c, n in zip(rows, repeat_to_batch(x_t.shape[0], *neg_k))]
                cond_mask = None
            out = self.net(x_t, t, *rows, keep=cond_mask).float()
            return model_output_to_eps(self.schedule, cfg.prediction, out, x_t, t)

        z = diffusion_sample(denoise, (b * k, cfg.embed_dim), schedule=self.schedule, sampler=sampler,
                             steps=steps, eta=eta, guidance=guidance, generator=generator,
                             x_T=None if x_T is None else x_T.to(device), callback=callback, device=device,
                             t_min=cfg.t_min if t_min is None else t_min)
        z = F.normalize(z.float(), dim=-1).view(b, k, -1)  # (B, k, D)
        best = (z * F.normalize(text, dim=-1)[:, None]).sum(-1).argmax(dim=1)  # (B,)
        return z[torch.arange(b, device=device), best]

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]], generator: torch.Generator,
                 train_batches: Iterable[dict[str, Any]] | None = None,
                 train_pairs: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Sampled vs true image embeddings on up to `eval_max_samples` val samples, beside baselines.

        Returns a flat dict: prior_cos, prior_mean_rank, prior_r1 (the rank of the true val image among
        all val images when retrieved with the sample), the same for text_* (the text embedding used
        as the image embedding) and, when train pairs are given, nn_* (the image embedding of the
        train sample whose caption embedding is nearest), with nn_pool the number of train pairs searched
        and val_count the number of val samples. Samples use `eval_steps` and `eval_guidance`.

        The train pairs: `train_pairs` {"clip_text": (M, D), "clip_image": (M, D)}, or read from
        `train_batches` (up to `train_pool_size`; cached while the same object is passed again, as the
        training engine does at every evaluation of a run); without either, nn_* is omitted.
        """
        cfg = self.config
        val = _gather(batches, ("clip_image",) + _COND_KEYS, cfg.eval_max_samples)
        if val is None:
            return {}
        true = val["clip_image"].float()
        preds = []
        steps = resolve_sampling(cfg, None, cfg.eval_steps, None)[1]
        with ImageBar(true.shape[0], "prior: sampling val embeddings") as bar:
            for i in range(0, true.shape[0], 256):
                rows = {k: val[k][i: i + 256] for k in _COND_KEYS}
                preds.append(self.sample(rows, steps=cfg.eval_steps, guidance=cfg.eval_guidance, generator=generator,
                                         callback=bar.steps(rows["clip_text"].shape[0], steps)))
                bar.done()
        out = {"val_count": float(true.shape[0])}
        out.update(embedding_scores("prior", torch.cat(preds).cpu(), true))
        out.update(embedding_scores("text", val["clip_text"], true))
        train = self._train_pairs(train_pairs, train_batches)
        if train is not None:
            nn_images = nearest_caption_images(val["clip_text"], train["clip_text"], train["clip_image"])
            out.update(embedding_scores("nn", nn_images, true))
            out["nn_pool"] = float(train["clip_text"].shape[0])
        return out

    def _train_pairs(self, train_pairs, train_batches) -> dict[str, torch.Tensor] | None:
        keys, limit = ("clip_text", "clip_image"), self.config.train_pool_size
        if train_pairs is not None:
            return {k: train_pairs[k][:limit].float().cpu() for k in keys}
        if train_batches is None:
            return None
        if self._train_pairs_cache is None or self._train_pairs_cache[0] is not train_batches:
            self._train_pairs_cache = (train_batches, _gather(train_batches, keys, limit))
        return self._train_pairs_cache[1]


def _gather(batches: Iterable[dict[str, Any]], keys: tuple[str, ...], limit: int | None
            ) -> dict[str, torch.Tensor] | None:
    """Concatenate `keys` over batches (on the CPU), stopping after `limit` rows; None if empty."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    count = 0
    for batch in batches:
        for k in keys:
            parts[k].append(batch[k].detach().cpu())
        count += batch[keys[0]].shape[0]
        if limit is not None and count >= limit:
            break
    if not count:
        return None
    return {k: torch.cat(v)[:limit] for k, v in parts.items()}
