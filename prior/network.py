"""The diffusion prior's network: DALL-E 2's decoder-only causal transformer (Ramesh et al. 2022, sec. 2.2).

The sequence is, in order,
    [text token states (L), text embedding, timestep embedding, noised image embedding, learned query]
each projected to the model width, plus a learned position embedding. Causal attention lets the query,
last in line, see everything; its output predicts the clean (scaled) image embedding. For classifier-free
guidance the text conditioning (token states and text embedding) of a row can be swapped for learned
null values, which training does 10% of the time.
"""
from __future__ import annotations

import torch
from torch import nn

from cascade.nn import TimestepEmbedding, TransformerBlock, run_block
from prior.config import PriorConfig

EXTRA_TOKENS = 4  # text embedding, timestep, noised image embedding, query


class PriorTransformer(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"prior width {cfg.width} is not a multiple of heads {cfg.heads}")
        w = cfg.width
        self.token_proj = nn.Linear(cfg.token_dim, w)
        self.text_proj = nn.Linear(cfg.embed_dim, w)
        self.time_embed = TimestepEmbedding(w)
        self.x_proj = nn.Linear(cfg.embed_dim, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.null_tokens = nn.Parameter(torch.randn(cfg.max_text_len, w) * 0.02)
        self.null_text = nn.Parameter(torch.randn(w) * 0.02)
        self.pos = nn.Parameter(torch.randn(cfg.max_text_len + EXTRA_TOKENS, w) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(w, w // cfg.heads, cfg.ff_mult, causal=True, dropout=cfg.dropout)
            for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.embed_dim)
        self.gradient_checkpointing = cfg.gradient_checkpointing  # recompute each block in backward

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, tokens: torch.Tensor,
                mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x_t (B, D) noised scaled image embedding, t (B,) timesteps, text (B, D), tokens (B, L, Dt),
        mask (B, L) bool, keep (B,) bool: rows whose text conditioning is kept (None: all).
        Returns the predicted clean scaled image embedding (B, D)."""
        dtype = self.out.weight.dtype  # inputs in the weights' dtype (bf16 under mixed precision)
        tok = self.token_proj(tokens.to(dtype))  # (B, L, W)
        txt = self.text_proj(text.to(dtype))  # (B, W)
        if keep is not None:
            k = keep[:, None]
            tok = torch.where(k[..., None], tok, self.null_tokens.to(tok.dtype))
            txt = torch.where(k, txt, self.null_text.to(txt.dtype))
            # The null tokens are all visible; a dropped caption must not leak its length through the mask.
            mask = mask | ~k
        b = x_t.shape[0]
        seq = torch.cat([
            tok,
            txt[:, None],
            self.time_embed(t)[:, None],
            self.x_proj(x_t.to(dtype))[:, None],
            self.query.expand(b, 1, -1),
        ], dim=1) + self.pos  # (B, L + 4, W)
        key_mask = torch.cat([mask, mask.new_ones(b, EXTRA_TOKENS)], dim=1)  # (B, L + 4)
        for block in self.blocks:
            seq = run_block(block, seq, key_mask, checkpoint=self.gradient_checkpointing)
        return self.out(self.norm_out(seq[:, -1]))  # (B, D)
