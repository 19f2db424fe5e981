"""The decoder's U-Net: ADM (Dhariwal & Nichol 2021) with GLIDE's text conditioning (Nichol et al. 2021,
section 2.3) and unCLIP's image-embedding conditioning (Ramesh et al. 2022, "Hierarchical Text-Conditional
Image Generation with CLIP Latents", section 2.1):

- the CLIP image embedding is projected and added to the timestep embedding, and projected into
  `image_tokens` extra context tokens placed beside the (projected) text token states;
- every attention block attends over its feature map and, GLIDE-style, to those context tokens;
- ResBlocks use adaptive group norm driven by the summed embedding.

Made cheap on CPU: an optional space-to-depth stem (`patch_size` 2 folds 2x2 pixels into channels, as in
"simple diffusion", Hoogeboom et al. 2023), so the costliest level runs at a quarter of the positions
with wider, better-utilised convolutions; a per-level block count, so the high-resolution levels can be
shallow; attention only at the low resolutions; channels_last memory throughout. With the stem, an optional
`pixel_head` of that many channels works at the full resolution after the last layer: two 3x3 convolutions,
modulated by the embedding, read the noisy image x_t and the net's output and add a correction to it. It gives
the net a short path back to single pixels; without it, a 1,000-step decoder on the 2x2 stem left twice the
pixel noise in its images (docs/results.md, 2026-12-07).

Optionally (`coord_channels`) two input channels hold each position's (x, y) ("CoordConv", Liu et al. 2018),
so absolute position, which zero-padded convolutions only infer slowly from the borders, is there from
the first layer for the cross-attention to tie words like "top left" to; and (`attention_positions`)
each attention block adds a learned position embedding to the features its queries come from (as a ViT
does). The coordinates alone did not get the text's positions learned on the shapes set; the embedding
in the attention blocks did (README, "What the decoder learns in an hour").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cascade.nn import (Downsample, ResBlock, SelfAttention2d, TimestepEmbedding, Upsample, group_norm, run_block,
                        zero_module)


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): each position's x and y in [-1, 1] (pixel centres), for the rows of `x` (B, C, H, W)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): [0] = x, [1] = y
    return grid.expand(b, 2, h, w)


class Level(nn.Module):
    """One ResBlock, optionally followed by attention to the feature map and the context tokens (with a
    learned position embedding when `size` is given)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, attention: bool,
                 head_dim: int, context_dim: int, size: int | None = None):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = SelfAttention2d(out_ch, head_dim, context_dim, size=size) if attention else None

    def forward(self, x, emb, context, context_mask):
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        return x


class UNet(nn.Module):
    """eps (or v) network: (x_t (B, C, S, S), t (B,), emb_cond (B, E), context (B, N, Dc), mask (B, N)) -> (B, C_out, S, S).

    `emb_cond` is added to the timestep embedding (the caller projects the image embedding into it);
    `context` are the tokens attention blocks may attend to, `mask` True where they may.
    With `gradient_checkpointing`, each level (ResBlock + attention) is recomputed in backward while training.
    """

    def __init__(self, *, image_size: int, in_channels: int, out_channels: int, channels: int,
                 channel_mult: list[int], num_res_blocks: list[int], attention_resolutions: list[int],
                 head_dim: int, context_dim: int, emb_dim: int, dropout: float = 0.0, patch_size: int = 1,
                 coord_channels: bool = False, attention_positions: bool = False, pixel_head: int = 0,
                 padding: str = "zeros", pixel_head_padding: str | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.gradient_checkpointing = gradient_checkpointing
        self.coord_channels = coord_channels
        self.time_embed = TimestepEmbedding(emb_dim, freq_dim=channels)
        self.stem = nn.Conv2d(in_channels * patch_size**2 + 2 * coord_channels, channels, 3, padding=1)

        def pos(size: int) -> int | None:
            return size if attention_positions else None

        widths = [channels * m for m in channel_mult]
        res = image_size // patch_size
        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for i, (width, n) in enumerate(zip(widths, num_res_blocks)):
            for _ in range(n):
                self.down.append(Level(ch, width, emb_dim, dropout, res in attention_resolutions, head_dim, context_dim,
                                        pos(res)))
                ch = width
                skips.append(ch)
            if i < len(widths) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([
            Level(ch, ch, emb_dim, dropout, True, head_dim, context_dim, pos(res)),
            Level(ch, ch, emb_dim, dropout, False, head_dim, context_dim),
        ])
        self.up = nn.ModuleList()
        for i, (width, n) in reversed(list(enumerate(zip(widths, num_res_blocks)))):
            for _ in range(n + 1):
                self.up.append(Level(ch + skips.pop(), width, emb_dim, dropout, res in attention_resolutions,
                                     head_dim, context_dim, pos(res)))
                ch = width
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.out_norm = group_norm(ch)
        self.out = zero_module(nn.Conv2d(ch, out_channels * patch_size**2, 3, padding=1))
        # reads x_t's 3 image channels (not the self-conditioning or inpainting inputs, so that --init-from's
        # added inputs leave its shape alone) beside the output; zero-initialised, it starts as the identity
        self.pixel_head = PixelHead(out_channels, pixel_head, emb_dim) if pixel_head else None
        # what the convolutions see beyond the image's edges (nn.Conv2d's padding_mode; the upsampling ones pad
        # their upsampled map alike): zeros, or the opposite edge (DecoderConfig.padding says why)
        pad_with(self, padding)
        if self.pixel_head is not None:
            pad_with(self.pixel_head, pixel_head_padding or padding)

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb_cond: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t) + emb_cond  # (B, E)
        x = x.to(self.stem.weight.dtype)  # the weights' dtype (bf16 under mixed precision)
        image = x[:, :3]  # x_t at the full resolution, for the pixel head
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        if self.coord_channels:
            x = torch.cat([x, coordinate_grid(x)], dim=1)
        # channels-last from the stem on, as in the SR U-Net (whose oneDNN convolutions run ~1.5x faster so on CPU)
        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        hs = [h]
        ckpt = self.gradient_checkpointing
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else run_block(layer, h, emb, context, mask, checkpoint=ckpt)
            hs.append(h)
        for layer in self.mid:
            h = run_block(layer, h, emb, context, mask, checkpoint=ckpt)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = run_block(layer, torch.cat([h, hs.pop()], dim=1), emb, context, mask, checkpoint=ckpt)
        h = self.out(F.silu(self.out_norm(h)))
        if self.patch_size > 1:
            h = F.pixel_shuffle(h, self.patch_size)
        if self.pixel_head is not None:
            h = self.pixel_head(image, h, emb)
        return h.contiguous()


def pad_with(module: nn.Module, mode: str) -> None:
    """Every padded convolution in `module` pads with `mode` (nn.Conv2d's padding_mode)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.padding) > 0:
            m.padding_mode = mode


class PixelHead(nn.Module):
    """out + conv2(SiLU(FiLM(conv1([x_t, out]), emb))) at the image's full resolution; conv2 starts at zero."""

    def __init__(self, out_channels: int, width: int, emb_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3 + out_channels, width, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.conv2 = zero_module(nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, image: torch.Tensor, out: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.conv1(torch.cat([image, out], dim=1))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        return out + self.conv2(F.silu(r * (1 + scale) + shift))
