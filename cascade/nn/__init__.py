"""Layers shared by the cascade's networks (prior transformer, decoder and super-resolution U-Nets).

- `timestep_embedding(t, dim)`, `TimestepEmbedding(emb_dim)`: sinusoidal features + MLP (embeddings.py)
- `ResBlock(in_ch, out_ch, emb_dim, dropout)`: ADM block with adaptive group norm (resblock.py)
- `Downsample(in_ch, out_ch=in_ch)` (strided conv), `Upsample(in_ch, out_ch=in_ch)` (nearest 2x + conv, run as four 2x2 phase convolutions):
  the resampling between U-Net levels (resample.py)
- `SelfAttention2d(channels, head_dim, context_dim)`: attention over a feature map, optionally also to
  context tokens with a key mask (GLIDE), and a learned position embedding given `size`;
  `CrossAttention(dim, context_dim)` (attention.py)
- `TransformerBlock(dim, head_dim, mlp_ratio, causal=, context_dim=)`: pre-norm block (transformer.py)
- `run_block(block, *args, checkpoint=)`: a block call, recomputed in backward when checkpointing (recompute.py)

Masks are bool with True meaning "may attend". Every attention runs F.scaled_dot_product_attention.
"""
from cascade.nn.attention import CrossAttention, SelfAttention2d
from cascade.nn.embeddings import TimestepEmbedding, timestep_embedding
from cascade.nn.recompute import run_block
from cascade.nn.resample import Downsample, Upsample
from cascade.nn.resblock import ResBlock, group_norm, zero_module
from cascade.nn.transformer import SelfAttention, TransformerBlock

__all__ = [
    "CrossAttention", "Downsample", "ResBlock", "SelfAttention", "SelfAttention2d", "TimestepEmbedding",
    "TransformerBlock", "Upsample", "group_norm", "run_block", "timestep_embedding", "zero_module",
]
