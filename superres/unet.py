"""The efficient super-resolution U-Net (Imagen, Saharia et al. 2022, appendix B.1 "Efficient U-Net").

Following Imagen's recipe for cheap high-resolution networks: few channels at the full resolution and
more at the coarse levels, more residual blocks at low resolution than at high, downsampling before a
level's blocks and upsampling after them, and no self-attention at all (at 64x64 and above one
attention block costs more than the whole convolution stack on a CPU). Conditioning:
  * the low-resolution image, upsampled to the output size and concatenated to x_t (SR3, Saharia et
    al. 2021; CDM, Ho et al. 2022);
  * the timestep and the noise-augmentation level, each embedded (sinusoid + MLP) and summed into one
    vector that modulates every block (CDM, section 4.2);
  * optionally text tokens, by cross-attention at the lowest resolution only (Imagen, section 2.4).
Every operation is local (see `superres.blocks`), so the network is fully convolutional: trained on
patches, it runs on whole images of any size divisible by `downsample_factor`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cascade.nn import Downsample, TimestepEmbedding, Upsample, run_block, zero_module
from superres.blocks import LocalResBlock, PixelNorm, TextCrossAttention

AUG_SCALE = 1000.0  # levels in [0, 1] are embedded on the timestep scale, so both share frequencies


class EfficientUNet(nn.Module):
    """eps/v-predicting U-Net on (x_t, upsampled low-res image, t, augmentation level[, text]).

    Level i has channels[i] = base * channel_mults[i] and num_res_blocks[i] blocks on the way down,
    the same number on the way up (after concatenating the level's skip), at resolution H / 2^i.
    The bottleneck holds two blocks with text cross-attention between them when `text_dim` is set.
    With `gradient_checkpointing`, every block and the cross-attention are recomputed in backward while training.
    """

    def __init__(self, *, base_channels: int, channel_mults: Sequence[int], num_res_blocks: Sequence[int],
                 image_channels: int = 3, text_dim: int | None = None, head_dim: int = 64,
                 dropout: float = 0.0, emb_mult: int = 4, gradient_checkpointing: bool = False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        if len(channel_mults) != len(num_res_blocks):
            raise ValueError("channel_mults and num_res_blocks need one entry per level")
        chans = [base_channels * m for m in channel_mults]
        emb_dim = base_channels * emb_mult
        self.levels = len(chans)
        self.time_embed = TimestepEmbedding(emb_dim)
        self.aug_embed = TimestepEmbedding(emb_dim)
        self.conv_in = nn.Conv2d(2 * image_channels, chans[0], 3, padding=1)

        self.down_samplers = nn.ModuleList()
        self.down_blocks = nn.ModuleList()
        for i, (ch, n) in enumerate(zip(chans, num_res_blocks)):
            self.down_samplers.append(Downsample(chans[i - 1], ch) if i else nn.Identity())
            self.down_blocks.append(nn.ModuleList(LocalResBlock(ch, ch, emb_dim, dropout) for _ in range(n)))

        bottom = chans[-1]
        self.mid1 = LocalResBlock(bottom, bottom, emb_dim, dropout)
        self.cross_attn = TextCrossAttention(bottom, text_dim, head_dim) if text_dim else None
        self.mid2 = LocalResBlock(bottom, bottom, emb_dim, dropout)

        self.up_blocks = nn.ModuleList()
        self.up_samplers = nn.ModuleList()
        for i, (ch, n) in enumerate(zip(chans, num_res_blocks)):
            blocks = [LocalResBlock(2 * ch, ch, emb_dim, dropout)]
            blocks += [LocalResBlock(ch, ch, emb_dim, dropout) for _ in range(max(n, 1) - 1)]
            self.up_blocks.append(nn.ModuleList(blocks))
            self.up_samplers.append(Upsample(ch, chans[i - 1]) if i else nn.Identity())

        self.norm_out = PixelNorm(chans[0])
        self.conv_out = zero_module(nn.Conv2d(chans[0], image_channels, 3, padding=1))

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.levels - 1)

    def embed(self, t: torch.Tensor, aug_level: torch.Tensor) -> torch.Tensor:
        """The vector every block is modulated by: timestep and augmentation level, (B,), (B,) -> (B, E)."""
        return self.time_embed(t.float()) + self.aug_embed(aug_level.float() * AUG_SCALE)

    def forward(self, x_t: torch.Tensor, low_res_up: torch.Tensor, t: torch.Tensor, aug_level: torch.Tensor,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x_t, low_res_up: (B, 3, H, W); t: (B,) timesteps; aug_level: (B,) in [0, 1];
        text: (B, L, D_text) with text_mask (B, L) bool, or None -> (B, 3, H, W)."""
        emb = self.embed(t, aug_level)
        # channels-last runs oneDNN's convolutions ~1.5x faster on this CPU than NCHW
        # in the weights' dtype (bf16 under mixed precision)
        h = torch.cat([x_t, low_res_up], dim=1).to(self.conv_in.weight.dtype).contiguous(memory_format=torch.channels_last)
        h = self.conv_in(h)
        ckpt = self.gradient_checkpointing
        skips = []
        for sampler, blocks in zip(self.down_samplers, self.down_blocks):
            h = sampler(h)
            for block in blocks:
                h = run_block(block, h, emb, checkpoint=ckpt)
            skips.append(h)
        h = run_block(self.mid1, h, emb, checkpoint=ckpt)
        if self.cross_attn is not None and text is not None:
            if text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            h = run_block(self.cross_attn, h, text.to(h.dtype), text_mask, checkpoint=ckpt)
        h = run_block(self.mid2, h, emb, checkpoint=ckpt)
        for i in reversed(range(self.levels)):
            h = torch.cat([h, skips[i]], dim=1)
            for block in self.up_blocks[i]:
                h = run_block(block, h, emb, checkpoint=ckpt)
            h = self.up_samplers[i](h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())).contiguous()
