"""The `clip` stage: DALL·E 2's CLIP (Ramesh et al. 2022, section 2), trained LiT-style here.

The network is a `cascade.encoders.ClipEncoder`; the loss is CLIP's symmetric InfoNCE (open_clip's
`ClipLoss`) with a learned temperature clipped at 100. Evaluation reports image->text and text->image
recall@1/5/10 on the val batches beside the ridge-regression baseline of `retrieval`, which is fit on
the training pairs seen in this process (the engine hands `evaluate` only val batches, so `loss`
remembers up to `ridge_train_samples` of them, as 8-bit images and captions). The memory is shared by
every stage built with the same config, because the engine evaluates a separate copy holding the EMA
weights, which never sees a training batch itself.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cascade.clip_stage import retrieval
from cascade.encoders import ClipEncoder, ClipEncoderConfig
from cascade.encoders.clip_model import LOGIT_SCALE_MAX, _open_clip
from cascade.registry import register_stage
from cascade.stage import Stage

SOURCE_SIZE = 64  # the shard image the tower reads, resized to `image_size`

MAX_CACHED_IMAGES = 100_000  # pooled trunk features kept (5 kB each for EfficientNet-Lite0)

# config JSON -> {key: ((3, S, S) uint8 image, caption)}: the training pairs seen in this process
_TRAIN_PAIRS: dict[str, dict[str, tuple[torch.Tensor, str]]] = {}


class ClipStageConfig(ClipEncoderConfig):
    # With the image trunk fully locked (LiT), its pooled features of a training image never change:
    # compute them once per sample key and train the head on the stored ones.
    cache_locked_image_features: bool = True
    ridge_baseline: bool = True  # report the ridge baseline beside the CLIP's recall in `evaluate`
    ridge_train_samples: int = 8192  # at most this many training pairs are kept to fit it


@register_stage("clip")
class ClipStage(Stage):
    Config: ClassVar[type[ClipStageConfig]] = ClipStageConfig
    image_sizes: ClassVar[tuple[int, ...]] = (SOURCE_SIZE,)
    needs_embeddings: ClassVar[bool] = False
    samples_images: ClassVar[bool] = False

    def __init__(self, config: ClipStageConfig):
        super().__init__(config)
        self.encoder = ClipEncoder(ClipEncoderConfig(**{k: getattr(config, k)
                                                        for k in ClipEncoderConfig.model_fields}))
        self.clip_loss = _open_clip().ClipLoss()
        self._seen = _TRAIN_PAIRS.setdefault(config.model_dump_json(), {})
        self._baseline: tuple[int, dict[str, float]] | None = None
        cacheable = config.cache_locked_image_features and self.encoder.image_trunk_locked
        self._trunk_cache: dict[str, torch.Tensor] | None = {} if cacheable else None

    # the encoder interface, so a trained stage can stand in for a loaded encoder
    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def token_dim(self) -> int:
        return self.encoder.token_dim

    @property
    def max_text_len(self) -> int:
        return self.encoder.max_text_len

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(images)

    def encode_text(self, texts: list[str]):
        return self.encoder.encode_text(texts)

    # training
    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        images, texts = batch[f"image_{SOURCE_SIZE}"], list(batch["txt"])
        if self.training and self.config.ridge_baseline:
            self._remember(batch["key"], images, texts)
        if self._trunk_cache is not None and self.training:
            image_features = self.encoder.model.visual.head(self._trunk_features(batch["key"], images))
        else:
            image_features = self.encoder.image_features(images)
        image_features = F.normalize(image_features, dim=-1)  # (B, D)
        text_features = F.normalize(self.encoder.text_features(texts)[0], dim=-1)  # (B, D)
        scale = self.encoder.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        return self.clip_loss(image_features, text_features, scale)

    def _trunk_features(self, keys: list[str], images: torch.Tensor) -> torch.Tensor:
        """The locked trunk's pooled features (B, F), computed only for keys not seen before."""
        missing = [i for i, key in enumerate(keys) if key not in self._trunk_cache]
        if len(self._trunk_cache) + len(missing) > MAX_CACHED_IMAGES:
            return self.encoder.backbone_image_features(images)
        if missing:
            computed = self.encoder.backbone_image_features(images[missing])  # (M, F)
            self._trunk_cache.update(zip([keys[i] for i in missing], computed))
        return torch.stack([self._trunk_cache[key] for key in keys])

    def _remember(self, keys: list[str], images: torch.Tensor, texts: list[str]) -> None:
        pixels = ((images.detach().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        for key, image, text in zip(keys, pixels, texts):
            if len(self._seen) >= self.config.ridge_train_samples:
                return
            self._seen.setdefault(key, (image, text))

    # evaluation
    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator) -> dict[str, float]:
        was_training = self.training
        self.eval()
        images, texts, image_emb, text_emb = [], [], [], []
        for batch in batches:
            x = batch[f"image_{SOURCE_SIZE}"].to(self.encoder.image_mean.device)
            images.append(x.cpu())
            texts.extend(batch["txt"])
            image_emb.append(self.encoder.encode_image(x).cpu())
            text_emb.append(self.encoder.encode_text(list(batch["txt"]))[0].cpu())
        self.train(was_training)
        if not texts:
            return {}
        metrics = retrieval.retrieval_metrics(torch.cat(image_emb), torch.cat(text_emb))
        metrics["logit_scale"] = float(self.encoder.logit_scale.exp())
        metrics["val_pairs"] = float(len(texts))
        if self.config.ridge_baseline and len(self._seen) >= 2:
            metrics.update(self._ridge_metrics(torch.cat(images), texts))
        return metrics

    def _ridge_metrics(self, val_images: torch.Tensor, val_texts: list[str]) -> dict[str, float]:
        """The baseline from the towers as loaded (never the trained ones), cached per training-set size."""
        if self._baseline is not None and self._baseline[0] == len(self._seen):
            return self._baseline[1]
        reference = ClipEncoder(self.encoder.config).eval()
        train_images = torch.stack([img for img, _ in self._seen.values()]).float().div(127.5).sub(1.0)
        train_texts = [text for _, text in self._seen.values()]
        features = {}
        for split, (imgs, txts) in {"train": (train_images, train_texts), "val": (val_images, val_texts)}.items():
            feats, embs = [], []
            for i in range(0, len(txts), 64):
                feats.append(reference.backbone_image_features(imgs[i:i + 64]))
                embs.append(reference.backbone_text_embedding(txts[i:i + 64]))
            features[split] = torch.cat(feats), torch.cat(embs)
        metrics = retrieval.ridge_baseline(*features["train"], *features["val"])
        metrics["ridge_train_pairs"] = float(len(train_texts))
        self._baseline = (len(self._seen), metrics)
        return metrics
