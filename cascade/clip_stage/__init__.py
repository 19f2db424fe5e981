"""The `clip` stage: DALL·E 2's CLIP (Ramesh et al. 2022, section 2), trained LiT-style here.

The network is a `cascade.encoders.ClipEncoder`; the loss is CLIP's symmetric InfoNCE (open_clip's
`ClipLoss`) with a learned temperature clipped at 100. Evaluation reports image->text and text->image
recall@1/5/10 on the val batches beside the ridge-regression baseline of `retrieval`, fit on up to
`ridge_train_samples` train pairs: given ones, or else the train split beside the val shards.
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

# encoder config JSON -> {sample key: pooled features of the locked trunk}. Shared by every stage built
# with the same config in this process: the engine evaluates a separate copy holding the EMA weights,
# and the ridge baseline reads the same frozen features.
_TRUNK_CACHES: dict[str, dict[str, torch.Tensor]] = {}


class ClipStageConfig(ClipEncoderConfig):
    # With the image trunk fully locked (LiT), its pooled features of a training image never change:
    # compute them once per sample key and train the head on the stored ones.
    cache_locked_image_features: bool = True
    ridge_baseline: bool = True  # report the ridge baseline beside the CLIP's recall in `evaluate`
    ridge_train_samples: int = 4096  # at most this many train pairs fit it


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
        self._baseline: tuple[Any, dict[str, float]] | None = None  # (train batches, metrics)
        # Only packaged weights make two trunks built from one config equal; random ones differ.
        cacheable = (config.cache_locked_image_features and config.pretrained_towers
                     and self.encoder.image_trunk_locked)
        self._trunk_cache = (_TRUNK_CACHES.setdefault(self.encoder.config.model_dump_json(), {})
                             if cacheable else None)

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
        if self._trunk_cache is not None and self.training:
            trunk = self._trunk_features(batch["key"], images).to(self.encoder.logit_scale.dtype)
            image_features = self.encoder.model.visual.head(trunk)
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

    # evaluation
    @torch.no_grad()
    def evaluate(self, batches, generator: torch.Generator, train_batches=None) -> dict[str, float]:
        """Recall of this CLIP on `batches`, and of the ridge baseline fit on `train_batches` (omitted
        without them)."""
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
        if self.config.ridge_baseline and train_batches is not None:
            metrics.update(self._ridge_metrics(train_batches, torch.cat(images), texts))
        return metrics

    def _ridge_metrics(self, train_batches, val_images: torch.Tensor, val_texts: list[str]) -> dict[str, float]:
        """The baseline from the towers as loaded (never the trained ones); cached while the same train
        batches object is passed again (the engine passes one per run)."""
        if self._baseline is not None and self._baseline[0] is train_batches:
            return self._baseline[1]
        reference = ClipEncoder(self.encoder.config).eval()
        limit = self.config.ridge_train_samples
        features = {"train": ([], []), "val": ([], [])}
        for batch in train_batches:
            room = limit - sum(len(f) for f in features["train"][0])
            if room <= 0:
                break
            keys, images = list(batch["key"])[:room], batch[f"image_{SOURCE_SIZE}"][:room]
            if self._trunk_cache is not None and all(k in self._trunk_cache for k in keys):
                # the locked trunk is the reference's trunk: reuse its features from training
                features["train"][0].append(torch.stack([self._trunk_cache[k] for k in keys]).cpu())
            else:
                features["train"][0].append(reference.backbone_image_features(images))
            features["train"][1].append(reference.backbone_text_embedding(list(batch["txt"])[:room]))
        for i in range(0, len(val_texts), 64):
            features["val"][0].append(reference.backbone_image_features(val_images[i:i + 64]))
            features["val"][1].append(reference.backbone_text_embedding(val_texts[i:i + 64]))
        train_x, train_y = (torch.cat(f) for f in features["train"])
        if len(train_x) < 2:
            return {}
        metrics = retrieval.ridge_baseline(train_x, train_y, *(torch.cat(f) for f in features["val"]))
        metrics["ridge_train_pairs"] = float(len(train_x))
        self._baseline = (train_batches, metrics)
        return metrics
