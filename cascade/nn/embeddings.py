"""Timestep embeddings: the sinusoidal features of "Attention Is All You Need" (section 3.5), as used
for diffusion timesteps by DDPM (Ho et al. 2020, appendix B) and ADM (Dhariwal & Nichol 2021), followed
by a two-layer MLP.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps.

    t: (B,) -> (B, dim). Half the channels are cos(t * f_i), half sin(t * f_i), with frequencies
    f_i = max_period^(-i / half) spaced geometrically from 1 down to 1/max_period; an odd `dim` gets a
    zero last channel.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t, then Linear -> SiLU -> Linear (ADM's `time_embed`).

    t: (B,) -> (B, emb_dim).
    """

    def __init__(self, emb_dim: int, freq_dim: int | None = None, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim or emb_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # the sinusoids in the MLP's dtype (bf16 weights under mixed precision)
        return self.mlp(timestep_embedding(t, self.freq_dim, self.max_period).to(self.mlp[0].weight.dtype))
