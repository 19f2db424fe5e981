"""The decoder's conditioning (unCLIP, Ramesh et al. 2022, section 2.1, on top of GLIDE section 2.3).

The CLIP image embedding z_i is projected and added to the timestep embedding, and projected into
`image_tokens` context tokens; the CLIP text token states are projected to the context width (and
refined by a small transformer when `text_layers` > 0, like GLIDE's text encoder). For
classifier-free guidance either part can be dropped per sample: a dropped z_i is replaced by a learned
null embedding, dropped text by a learned null token (the text tokens are then masked out).

z_i arrives L2-normalised, so its entries are ~D^-1/2; it is multiplied by sqrt(D) (as the prior
scales the embeddings it diffuses) so that at initialisation its projection into the timestep
embedding is at least as large as the timestep's own. Unscaled (16x smaller at D = 256), it started
~4x weaker than the timestep at initialisation and the network learned to use it only slowly.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from cascade.nn import TransformerBlock, run_block
from decoder.config import DecoderConfig


class Conditioning(nn.Module):
    """(z_i, text tokens, keep flags) -> (emb (B, E), context (B, K + 1 + L, C), context mask (B, K + 1 + L)).

    Context layout: K image tokens (always visible), one null-text token (visible only when the text
    is dropped or absent), then the L text tokens (visible where their mask is True and text is kept).
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        width = config.context_width
        self.image_tokens = config.image_tokens
        self.image_scale = config.clip_dim**0.5
        self.null_image = nn.Parameter(torch.randn(config.clip_dim) * config.clip_dim**-0.5)
        self.null_text = nn.Parameter(torch.randn(1, width) * 0.02)
        self.image_to_emb = nn.Linear(config.clip_dim, config.embedding_dim)
        self.image_to_tokens = nn.Linear(config.clip_dim, config.image_tokens * width)
        self.text_proj = nn.Linear(config.text_dim, width)
        self.text_blocks = nn.ModuleList(TransformerBlock(width, config.head_dim) for _ in range(config.text_layers))
        self.norm = nn.LayerNorm(width)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, image_emb: torch.Tensor, tokens: torch.Tensor | None, token_mask: torch.Tensor | None,
                keep_image: torch.Tensor, keep_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = image_emb.shape[0]
        image_emb = image_emb.to(self.image_to_emb.weight.dtype)  # the weights' dtype (bf16 under mixed precision)
        image = torch.where(keep_image[:, None], image_emb, self.null_image.to(image_emb.dtype))  # (B, D)
        image = image * self.image_scale
        emb = self.image_to_emb(image)  # (B, E)
        parts = [rearrange(self.image_to_tokens(image), "b (k c) -> b k c", k=self.image_tokens),
                 self.null_text.expand(b, 1, -1)]
        visible = [keep_image.new_ones(b, self.image_tokens)]
        if tokens is None:
            visible.append(keep_image.new_ones(b, 1))
        else:
            if token_mask is None:
                token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            text = self.text_proj(tokens.to(image_emb.dtype))  # (B, L, C)
            for block in self.text_blocks:
                text = run_block(block, text, token_mask, checkpoint=self.gradient_checkpointing)
            text_visible = token_mask & keep_text[:, None]  # (B, L)
            parts.append(text)
            visible += [~text_visible.any(dim=1, keepdim=True), text_visible]
        return emb, self.norm(torch.cat(parts, dim=1)), torch.cat(visible, dim=1)


class TextConditioning(nn.Module):
    """Imagen's conditioning (Saharia et al. 2022, section 2.1 and appendix F): (pooled (B, Dt), tokens (B, L, Dt),
    token mask (B, L), keep flags (B,)) -> (emb (B, E), context (B, 1 + L, C), context mask (B, 1 + L)).

    The frozen model's pooled embedding is projected and added to the timestep embedding; its token states
    are layer-normed, projected to the context width (and refined by `text_layers` transformer blocks) for
    the attention blocks' cross-attention. Dropping the text (classifier-free guidance) replaces the pooled
    embedding by a learned null one and masks the tokens out, leaving a learned null token visible.
    Context layout: the null token, then the L text tokens.

    The pooled embedding arrives L2-normalised and is scaled by sqrt(Dt), as z_i is in `Conditioning`.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        width = config.context_width
        self.pooled_scale = config.text_dim**0.5
        self.null_pooled = nn.Parameter(torch.randn(config.text_dim) * config.text_dim**-0.5)
        self.null_text = nn.Parameter(torch.randn(1, width) * 0.02)
        self.pooled_to_emb = nn.Linear(config.text_dim, config.embedding_dim)
        self.token_norm = nn.LayerNorm(config.text_dim)
        self.text_proj = nn.Linear(config.text_dim, width)
        self.text_blocks = nn.ModuleList(TransformerBlock(width, config.head_dim) for _ in range(config.text_layers))
        self.norm = nn.LayerNorm(width)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor,
                keep_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = self.pooled_to_emb.weight.dtype  # the weights' dtype (bf16 under mixed precision)
        pooled = torch.where(keep_text[:, None], pooled.to(dtype), self.null_pooled.to(dtype))  # (B, Dt)
        emb = self.pooled_to_emb(pooled * self.pooled_scale)  # (B, E)
        text = self.text_proj(self.token_norm(tokens.to(dtype)))  # (B, L, C)
        for block in self.text_blocks:
            text = run_block(block, text, token_mask, checkpoint=self.gradient_checkpointing)
        text_visible = token_mask & keep_text[:, None]  # (B, L)
        context = torch.cat([self.null_text.expand(pooled.shape[0], 1, -1).to(dtype), text], dim=1)
        return emb, self.norm(context), torch.cat([~text_visible.any(dim=1, keepdim=True), text_visible], dim=1)
