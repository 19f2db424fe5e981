"""Layers of the super-resolution U-Net that keep every operation local in space.

`cascade.nn.ResBlock` normalises with GroupNorm, whose statistics span the whole feature map: a net
trained on 256x256 patches then sees different statistics on a 1024x1024 image, and tiles of one
image are normalised differently, so tiled and untiled runs disagree. These blocks normalise each
pixel over its channels instead (RMSNorm, Zhang & Sennrich 2019, applied per position), so the
network is translation-equivariant with a finite receptive field: patch-trained weights apply to any
size, and a tile with enough margin gives exactly the untiled output. They are also "norm-light":
one norm per block instead of ADM's two, which matters at 1024x1024 where every elementwise pass
over the feature map costs as much as a thin convolution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from cascade.nn import CrossAttention, zero_module


class PixelNorm(nn.Module):
    """x / rms_c(x) * g per pixel: RMSNorm over the channels of (B, C, H, W), learned gain g (C,)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            inv_rms = torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)  # (B, 1, H, W)
            return x * inv_rms * self.weight[:, None, None]
        # without autograd (sampling): the gain applied in place, so one fresh map fewer
        y, gain = torch.mul(x, self._inv_rms(x)), self.weight[:, None, None]
        return y.mul_(gain) if y.dtype == gain.dtype else y * gain  # (a bf16 map and fp32 gain give fp32)

    def normalise_(self, x: torch.Tensor) -> torch.Tensor:
        """`forward(x)` written over x (without autograd): for a map nothing else reads, such as a
        concatenation made for this norm, it saves the pass that writes a new map."""
        return x.mul_(self._inv_rms(x)).mul_(self.weight.to(x.dtype)[:, None, None])

    def _inv_rms(self, x: torch.Tensor) -> torch.Tensor:
        """1 / rms_c(x), (B, 1, H, W), without autograd: the mean square as one fused reduction (not a squared
        copy of x and its mean), the rest in place on the small map."""
        mean_sq = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_().div_(x.shape[1])
        return mean_sq.add_(self.eps).rsqrt_()


class LocalResBlock(nn.Module):
    """PixelNorm -> SiLU -> conv3x3 -> FiLM(emb) -> SiLU -> conv3x3 (zero init), plus skip.

    x: (B, in_ch, H, W), emb: (B, emb_dim) -> (B, out_ch, H, W). FiLM is (1 + scale) * h + shift from
    the embedding (timestep + augmentation level), as ADM's AdaGN but without the second norm.
    The residual branch starts at zero, so a new block is the identity on its skip path.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm = PixelNorm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # without autograd every map below is fresh and read once, so the SiLUs and the sum work in place
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm(x), inplace=inplace))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1) each
        h = torch.addcmul(shift, h, 1 + scale)
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)))
        skip = self.skip(x)
        return h.add_(skip) if inplace and skip.dtype == h.dtype else skip + h  # (autocast may mix dtypes)


class TextCrossAttention(nn.Module):
    """Residual cross-attention from every pixel to the text tokens (Imagen, section 2.4).

    x: (B, C, H, W), text: (B, L, D_text), mask: (B, L) bool (True = a real token) -> (B, C, H, W).
    Each pixel attends independently, so the block is as local as a 1x1 convolution. A row whose
    mask is all False (no caption, or dropped for classifier-free guidance) adds exactly zero.
    """

    def __init__(self, channels: int, text_dim: int, head_dim: int = 64):
        super().__init__()
        self.norm = PixelNorm(channels)
        self.attn = CrossAttention(channels, text_dim, head_dim)
        zero_module(self.attn.proj)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        out = self.attn(tokens, text, mask)  # (B, HW, C)
        # CrossAttention zeroes a fully masked row before its output projection, whose bias would
        # still leak in; "no text" must be exactly the unconditional network
        out = out * mask.any(dim=1).to(out.dtype)[:, None, None]
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)
