"""A frozen pretrained language model as the text encoder of an Imagen-style decoder (Saharia et al. 2022,
"Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding", section 2.1: a frozen
T5-XXL; here the all-MiniLM-L6-v2 sentence encoder the project installs from PyPI).

    enc = frozen_text_encoder("minilm_l6", max_len=48)
    pooled, tokens, mask = enc.encode(["a red star above a blue circle"])  # (B, D), (B, L, D), (B, L)

`pooled` is the sentence embedding the model was trained for (the masked mean of its token states,
L2-normalised); `tokens` are the last hidden states, zero where `mask` is False. Never trained: the
weights are the package's, so the same text gives the same features in every run, and none of this is
saved in a bundle (a decoder config names the encoder, `FROZEN_TEXT_ENCODERS`, and loading builds it).

It is not an `nn.Module` on purpose: a stage that holds one does not register its weights, so they stay
out of the stage's state_dict, optimizer, EMA, checkpoints and bundle. One copy per (name, length,
device) is shared by every stage of a process (`frozen_text_encoder`), and each copy remembers the
features of the last `CACHE_SIZE` texts, so a caption seen again in a later epoch costs nothing.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from cascade.errors import UserError

# name -> width of its token states (the decoder config's text_dim must match)
FROZEN_TEXT_ENCODERS: dict[str, int] = {"minilm_l6": 384}
CACHE_SIZE = 8192


class FrozenTextEncoder:
    """A frozen BERT-style encoder (`cascade.encoders.bert`) with its tokenizer, padded or cut to `max_len`
    tokens."""

    def __init__(self, name: str = "minilm_l6", max_len: int = 48, device: str | torch.device = "cpu"):
        from cascade.encoders.bert import load_bert

        self.name, self.max_len, self.width = name, max_len, FROZEN_TEXT_ENCODERS[name]
        self.tokenizer, self.model = load_bert(_model_path(name), device)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _run(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pooled (D,), tokens (n, D) of the n real tokens) per text, on the CPU."""
        ids, mask = self.tokenizer.batch(texts, self.max_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states = self.model(ids, mask).float() * mask[..., None]  # (B, L, D)
        pooled = F.normalize(states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1), dim=-1)
        lengths = mask.sum(1).tolist()
        return [(pooled[i].cpu(), states[i, :n].cpu()) for i, n in enumerate(lengths)]

    @torch.no_grad()
    def encode(self, texts: list[str], device: str | torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pooled (B, D) L2-normalised, tokens (B, max_len, D), mask (B, max_len) bool) on `device`."""
        texts = [str(t) for t in texts]
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for text, features in zip(missing, self._run(missing) if missing else []):
            self._cache[text] = features
        for text in texts:
            self._cache.move_to_end(text)
        while len(self._cache) > max(CACHE_SIZE, len(texts)):
            self._cache.popitem(last=False)
        b = len(texts)
        pooled = torch.stack([self._cache[t][0] for t in texts]) if b else torch.zeros(0, self.width)
        tokens = torch.zeros(b, self.max_len, self.width)
        mask = torch.zeros(b, self.max_len, dtype=torch.bool)
        for i, text in enumerate(texts):
            states = self._cache[text][1]
            tokens[i, :len(states)] = states
            mask[i, :len(states)] = True
        device = device or self.device
        return pooled.to(device), tokens.to(device), mask.to(device)


_SHARED: dict[tuple[str, int, str], FrozenTextEncoder] = {}


def _model_path(name: str) -> str:
    """The installed package's folder of frozen encoder `name`."""
    if name not in FROZEN_TEXT_ENCODERS:
        raise UserError(f"unknown frozen text encoder '{name}' (have: {', '.join(FROZEN_TEXT_ENCODERS)})")
    from cascade.encoders.clip_model import _minilm_path

    return _minilm_path()


def frozen_encoder_params(name: str = "minilm_l6") -> int:
    """The parameter count of frozen encoder `name`, from its config on the meta device (no weights read).
    Without BERT's pooler head, which the encoder does not use."""
    from cascade.encoders.bert import Bert

    with torch.device("meta"):
        model = Bert.from_folder(_model_path(name))
    return sum(p.numel() for p in model.parameters())


def frozen_text_encoder(name: str = "minilm_l6", max_len: int = 48,
                        device: str | torch.device = "cpu") -> FrozenTextEncoder:
    """The process's one `FrozenTextEncoder` for (name, max_len, device), built on first use."""
    key = (name, int(max_len), str(torch.device(device)))
    if key not in _SHARED:
        _SHARED[key] = FrozenTextEncoder(name, max_len, device)
    return _SHARED[key]
