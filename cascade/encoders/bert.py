"""A BERT encoder in plain torch, for the frozen text encoder of the Imagen-style decoder (`frozen_text`).

all-MiniLM-L6-v2 is a 6-layer BERT (Devlin et al. 2019). Loading it through transformers cost about 4.5 s
of every Imagen-style `cascade generate` on this machine: importing transformers imports its image code,
which imports torchvision, which imports torch's compiler stack, before the first weight is read. The
encoder itself is a few dozen lines, so it lives here: the same weights (the package's safetensors), the
same tokenizer (its tokenizer.json, through the `tokenizers` library transformers uses too) and the same
last hidden states as transformers' `BertModel` to float rounding (a test compares the two).

    tokenizer, model = load_bert(path)   # path: a folder with config.json, model.safetensors, tokenizer.json
    ids, mask = tokenizer.batch(["a red star"], max_len=48)
    states = model(ids, mask)            # (B, L, hidden): the last hidden states
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _Uninitialised:
    """A layer that skips its initialisation, for a model whose every parameter is loaded next (`load_bert`):
    the parameters stay `torch.empty`, which costs no pass over their memory. (Building on the meta device
    would do the same, but initialising there imports torch's compiler stack, 1.1 s.)"""

    def reset_parameters(self) -> None:
        pass


class _UninitialisedLinear(_Uninitialised, nn.Linear):
    pass


class _UninitialisedEmbedding(_Uninitialised, nn.Embedding):
    pass


class BertLayer(nn.Module):
    """Post-norm transformer layer: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, init: bool = True):
        super().__init__()
        linear = nn.Linear if init else _UninitialisedLinear
        self.heads = heads
        self.query, self.key, self.value = (linear(hidden, hidden) for _ in range(3))
        self.attn_out = linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.fc1 = linear(hidden, intermediate)
        self.fc2 = linear(intermediate, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # keys where mask is True
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, n, c)))
        return self.mlp_norm(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    """Token, position and segment-0 embeddings, LayerNorm, then the layers. (ids, mask) -> states.
    With `init=False` the linear and embedding weights are left uninitialised, for loading."""

    def __init__(self, vocab_size: int, hidden_size: int, num_hidden_layers: int, num_attention_heads: int,
                 intermediate_size: int, max_position_embeddings: int, type_vocab_size: int,
                 layer_norm_eps: float, init: bool = True):
        super().__init__()
        embedding = nn.Embedding if init else _UninitialisedEmbedding
        self.word = embedding(vocab_size, hidden_size)
        self.position = embedding(max_position_embeddings, hidden_size)
        self.token_type = embedding(type_vocab_size, hidden_size)
        self.embed_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(hidden_size, num_attention_heads, intermediate_size, layer_norm_eps,
                                              init) for _ in range(num_hidden_layers))

    @classmethod
    def from_config(cls, config: dict, init: bool = True) -> "Bert":
        if config.get("hidden_act", "gelu") != "gelu" or config.get("position_embedding_type",
                                                                     "absolute") != "absolute":
            raise ValueError("only BERT with GELU and absolute position embeddings is implemented")
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps")
        return cls(**{k: config[k] for k in keys}, init=init)

    @classmethod
    def from_folder(cls, path: str | Path, init: bool = True) -> "Bert":
        """Built (not loaded) from the config.json of a transformers-format BERT folder."""
        return cls.from_config(json.loads((Path(path) / "config.json").read_text()), init)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L) long, mask (B, L) bool (True: a real token) -> last hidden states (B, L, hidden)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions) + self.token_type.weight[0]
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# transformers' BertModel parameter names -> ours (the first match of each name is replaced)
_RENAMES = [(r"^embeddings\.word_embeddings\.", "word."), (r"^embeddings\.position_embeddings\.", "position."),
            (r"^embeddings\.token_type_embeddings\.", "token_type."), (r"^embeddings\.LayerNorm\.", "embed_norm."),
            (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.\2."),
            (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attn_out."),
            (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attn_norm."),
            (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
            (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
            (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.mlp_norm.")]
_UNUSED = re.compile(r"^(pooler\.|embeddings\.position_ids$)")  # the pooler head; a buffer of 0..511


def _rename(name: str) -> str:
    name = name.removeprefix("bert.")
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(f"unexpected BERT parameter '{name}'")


class Tokenizer:
    """A tokenizer.json's tokenizer (`tokenizers`), with the calls this project makes of transformers' one:
    `tokenizer(texts, truncation=True, max_length=n, return_offsets_mapping=True)` (lists, unpadded) and
    `convert_ids_to_tokens(ids)`; and `batch(texts, max_len)`, the padded tensors the encoder reads."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()

    def _encode(self, texts: list[str], max_length: int | None):
        if max_length is None:
            self._tokenizer.no_truncation()
        else:
            self._tokenizer.enable_truncation(max_length=max_length)
        return self._tokenizer.encode_batch(list(texts))

    def __call__(self, texts: list[str], truncation: bool = False, max_length: int | None = None,
                 return_offsets_mapping: bool = False) -> dict[str, list]:
        encodings = self._encode(texts, max_length if truncation else None)
        out = {"input_ids": [e.ids for e in encodings], "attention_mask": [[1] * len(e.ids) for e in encodings]}
        if return_offsets_mapping:  # (start, end) characters of each token in its text; (0, 0) for [CLS], [SEP]
            out["offset_mapping"] = [e.offsets for e in encodings]
        return out

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tokenizer.id_to_token(i) for i in ids]

    def batch(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) long, mask (B, L) bool) for `texts`: [CLS] ... [SEP], cut to `max_len` tokens and
        padded to the longest, as transformers' tokenizer(texts, padding="longest", truncation=True, ...)."""
        encodings = self._encode(texts, max_len)
        length = max((len(e.ids) for e in encodings), default=0)
        ids = torch.zeros(len(encodings), length, dtype=torch.long)  # [PAD] is 0 in BERT vocabularies
        mask = torch.zeros(len(encodings), length, dtype=torch.bool)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = True
        return ids, mask


def load_bert(path: str | Path, device: str | torch.device = "cpu") -> tuple[Tokenizer, Bert]:
    """(tokenizer, model in eval mode without gradients) from a transformers-format BERT folder."""
    from safetensors.torch import load_file

    path = Path(path)
    model = Bert.from_folder(path, init=False)  # every parameter is assigned below (strict)
    weights = {_rename(k): v for k, v in load_file(path / "model.safetensors").items() if not _UNUSED.match(k)}
    model.load_state_dict(weights, strict=True, assign=True)
    return Tokenizer(path / "tokenizer.json"), model.to(device).eval().requires_grad_(False)
