"""A pre-norm transformer block (Vaswani et al. 2017, with the pre-LN placement of Xiong et al. 2020):
x + SelfAttn(LN(x)) [+ CrossAttn(LN(x), context)] + MLP(LN(x)), self-attention optionally causal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cascade.nn.attention import CrossAttention, _heads, _key_mask


class SelfAttention(nn.Module):
    """Multi-head self-attention over a sequence. x: (B, N, dim); mask: (B, N) bool key mask -> (B, N, dim).

    A sequence with no visible key at all gets a zero attention output rather than SDPA's NaN.
    """

    def __init__(self, dim: int, head_dim: int = 64, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads = _heads(dim, head_dim)
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attn_mask = _key_mask(mask)
        if self.causal and attn_mask is not None:
            n = x.shape[1]
            # Each position also sees itself, so a masked first token does not leave a row with no keys.
            attn_mask = (attn_mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()) | torch.eye(
                n, dtype=torch.bool, device=x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0)
        out = rearrange(out, "b h n d -> b n (h d)")
        if mask is not None and not self.causal:
            out = out.masked_fill(~mask.any(dim=1)[:, None, None], 0.0)  # no visible key: zero, not NaN
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block. x: (B, N, dim); mask: (B, N) key mask; context: (B, L, context_dim) -> (B, N, dim).

    With `context_dim`, a cross-attention sublayer sits between self-attention and the MLP.
    """

    def __init__(self, dim: int, head_dim: int = 64, mlp_ratio: float = 4.0, *, causal: bool = False,
                 context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, head_dim, causal=causal, dropout=dropout)
        self.cross = CrossAttention(dim, context_dim, head_dim) if context_dim else None
        self.norm_cross = nn.LayerNorm(dim) if context_dim else None
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        if self.cross is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return x + self.mlp(self.norm2(x))
