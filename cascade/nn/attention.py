"""Multi-head attention layers on F.scaled_dot_product_attention (Vaswani et al. 2017, eq. 1).

`SelfAttention2d` is ADM's attention block over the H*W positions of a feature map; given a context
(text token states, image-embedding tokens) it also attends to them by concatenating their keys and
values to the image's own, as GLIDE (Nichol et al. 2021, section 2.3) does. `CrossAttention` attends
from a token sequence to a context sequence only. Key masks are bool, True = may attend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cascade.nn.resblock import group_norm, zero_module


def _key_mask(mask: torch.Tensor | None, n_self: int = 0) -> torch.Tensor | None:
    """(B, L) key mask -> (B, 1, 1, n_self + L) for SDPA; the first n_self keys are always visible."""
    if mask is None:
        return None
    if n_self:
        mask = torch.cat([mask.new_ones(mask.shape[0], n_self), mask], dim=1)
    return mask[:, None, None, :]


# torch's fused CPU attention kernel and its backward, which also return and take the log-sum-exp of each
# query's logits; None where this torch build lacks them (then the explicit path below serves)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# from this many queries on the fused kernel beats materialising the probabilities (at 8x8 it does not)
_FUSED_SHARES_FROM = 256


class _AttentionLSE(torch.autograd.Function):
    """(out, lse) = attention(q, k, v) through the fused CPU kernel, lse (B, heads, N) the log of each
    query's softmax normaliser, differentiable in both. The kernel's backward takes no gradient for lse;
    since d lse_i / d logit_ij = p_ij, that gradient enters as an extra value column: v' = [v, 0],
    out' = [out, 1], dout' = [dout, -dlse] turn the kernel's p_ij (dout_i . v_j - dout_i . out_i) into
    p_ij (dout_i . v_j - dout_i . out_i + dlse_i), the exact gradient of both outputs."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, bias = ctx.saved_tensors  # dout, dlse: zeros where unused (materialised grads)

        def widen(t: torch.Tensor, value: float) -> torch.Tensor:  # the kernel wants one head size for q, k, v
            return F.pad(t, (0, 1), value=value)

        dout = torch.cat([dout, -dlse.unsqueeze(-1).to(dout.dtype)], dim=-1)
        dq, dk, dv = _FLASH_CPU_BACKWARD(dout, widen(q, 0.0), widen(k, 0.0), widen(v, 0.0), widen(out, 1.0), lse,
                                         0.0, False, attn_mask=bias, scale=ctx.scale)
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None


def attention_with_shares(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          n_self: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output for (B, heads, N, d) queries over keys whose first `n_self` are the image's own and
    the rest context tokens, and the (B, N, L) share of each query's attention on each context token,
    averaged over heads, both differentiable. On the CPU from `_FUSED_SHARES_FROM` queries through the
    fused kernel and its log-sum-exp (only the (N, L) context logits are formed); elsewhere from the
    explicit (N, n_self + L) probabilities."""
    scale = q.shape[-1] ** -0.5
    if q.device.type == "cpu" and _FLASH_CPU_BACKWARD is not None and q.shape[-2] >= _FUSED_SHARES_FROM:
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, float("-inf"))
        out, lse = _AttentionLSE.apply(q, k, v, bias, scale)
        logits = (q @ k[..., n_self:, :].transpose(-1, -2)) * scale  # (B, heads, N, L)
        if mask is not None:
            logits = logits.masked_fill(~mask[..., n_self:], float("-inf"))
        return out, torch.exp(logits - lse.unsqueeze(-1).to(logits.dtype)).mean(dim=1)
    logits = (q @ k.transpose(-1, -2)) * scale  # (B, heads, N, n_self + L), as SDPA computes
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = logits.softmax(dim=-1)
    return probs @ v, probs[..., n_self:].mean(dim=1)


def sincos_2d(size: int, channels: int, max_period: float = 100.0) -> torch.Tensor:
    """(size*size, channels) fixed 2D position features, row-major: the first half of the channels are
    sines and cosines of the column at geometric frequencies, the second half of the row."""
    if channels % 4:
        raise ValueError(f"2D sine-cosine features need channels divisible by 4, not {channels}")
    quarter = channels // 4
    freqs = max_period ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # (Q,)
    coords = torch.arange(size, dtype=torch.float32)
    angles = coords[:, None] * freqs[None, :]  # (S, Q)
    along = torch.cat([angles.sin(), angles.cos()], dim=1)  # (S, C/2)
    cols = along[None, :, :].expand(size, size, -1)  # [row, col] -> features of col
    rows = along[:, None, :].expand(size, size, -1)
    return torch.cat([cols, rows], dim=-1).reshape(size * size, channels)


def _heads(channels: int, head_dim: int) -> int:
    if channels % head_dim:
        raise ValueError(f"channels {channels} are not a multiple of head_dim {head_dim}")
    return channels // head_dim


class SelfAttention2d(nn.Module):
    """GN -> qkv (1x1) -> attention over positions [+ context tokens] -> proj (zero init), residual.

    x: (B, C, H, W); context: (B, L, context_dim) or None; context_mask: (B, L) bool or None.
    Returns (B, C, H, W). The residual branch starts at zero, so a new block is the identity.
    """

    def __init__(self, channels: int, head_dim: int = 64, context_dim: int | None = None, size: int | None = None):
        super().__init__()
        self.heads = _heads(channels, head_dim)
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = zero_module(nn.Linear(channels, channels))
        # Given the (square) feature-map size: a learned absolute position embedding added to the
        # normalised features before q, k, v (ViT), initialised to 2D sines and cosines, so every query
        # knows where it is from the first step.
        self.pos = nn.Parameter(sincos_2d(size, channels)) if size else None
        # A list to record into (decoder.grounding): each forward with a context and gradients then appends
        # the (B, HW, L) share of each query's attention that goes to each context token, averaged over heads.
        self.record: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        if self.pos is not None:
            if self.pos.shape[0] != h * w:
                raise ValueError(f"this block's position embedding is for {self.pos.shape[0]} positions, not {h}x{w}")
            tokens = tokens + self.pos.to(tokens.dtype)
        q, k, v = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        mask = None
        if context is not None and self.context_kv is not None:
            ck, cv = rearrange(self.context_kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
            k, v = torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)  # (B, heads, HW + L, d)
            mask = _key_mask(context_mask, n_self=h * w)
        if self.record is not None and context is not None and self.context_kv is not None and torch.is_grad_enabled():
            out, shares = attention_with_shares(q, k, v, mask, n_self=h * w)
            self.record.append(shares)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class CrossAttention(nn.Module):
    """Attention from tokens x to a context sequence (no residual, no norm: the caller's block adds them).

    x: (B, N, dim); context: (B, L, context_dim); mask: (B, L) bool, True = may attend -> (B, N, dim).
    A query whose keys are all masked gets a zero output rather than SDPA's NaN.
    """

    def __init__(self, dim: int, context_dim: int, head_dim: int = 64):
        super().__init__()
        self.heads = _heads(dim, head_dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(mask))
        out = rearrange(out, "b h n d -> b n (h d)")
        if mask is not None:
            out = out.masked_fill(~mask.any(dim=1)[:, None, None], 0.0)
        return self.proj(out)
