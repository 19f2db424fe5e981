"""The decoder's model config (the `model:` section of configs/*/decoder.yaml)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from cascade.stage import DiffusionConfig


class DecoderConfig(DiffusionConfig):
    """Sizes of the U-Net and its conditioning, the diffusion set-up and the evaluation settings; the
    diffusion fields (schedule, prediction, snr_gamma, p_drop_text, sampler, steps, guidance, ...) are
    `DiffusionConfig`'s."""

    renamed_keys: ClassVar[dict[str, str]] = {**DiffusionConfig.renamed_keys, "preview_guidance": "guidance"}

    image_size: int = 64
    # What the decoder reads: "unclip" (DALL-E 2: the CLIP image embedding z_i, from the prior at sampling
    # time, and the CLIP text tokens) or "imagen" (Imagen, Saharia et al. 2022: no image embedding and no
    # prior; a frozen language model's token states through cross-attention at every attention resolution
    # and its pooled embedding added to the timestep embedding; classifier-free guidance drops the text).
    conditioning: Literal["unclip", "imagen"] = "unclip"
    text_encoder: Literal["minilm_l6"] = "minilm_l6"  # imagen: the frozen language model (cascade.encoders)
    text_len: int = Field(48, ge=1)  # imagen: tokens kept of each caption (3-object shapes captions need ~40)
    clip_dim: int = Field(256, gt=0)  # D of the CLIP image embedding
    text_dim: int = Field(384, gt=0)  # Dt of the CLIP text token states (imagen: of the frozen model's)
    # U-Net (ADM): base width, width multiplier and ResBlock count per resolution level.
    channels: int = Field(64, gt=0)
    channel_mult: list[int] = [1, 2, 3, 4]
    num_res_blocks: int | list[int] = 2
    attention_resolutions: list[int] = [16, 8]  # feature-map sizes that get attention blocks
    head_dim: int = Field(64, gt=0)
    emb_dim: int | None = None  # timestep/conditioning embedding width; 4 * channels when None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    patch_size: Literal[1, 2, 4] = 1  # space-to-depth stem: the first level runs at image_size / patch_size
    # Channels of a full-resolution head after the stem's net (decoder.unet.PixelHead); 0: none. It reads x_t and
    # the net's output, a short path back to single pixels: on the quick demo, half the pixel noise a
    # 1,000-step decoder on the 2x2 stem left, at the same speed (docs/results.md, 2026-12-07).
    pixel_head: int = Field(0, ge=0)
    # What the U-Net's 3x3 convolutions see beyond the image's edges: zeros, or the opposite edge ("circular").
    # With zeros an edge pixel is a different denoising problem from an inner one: its neighbours beyond the edge
    # hold no noise to compare its own with, and a short-trained net leaves a speckled frame (reflect or
    # replicate padding repeat a neighbour's noise: no better). Circular padding shows an edge pixel independent
    # noise, as an inner one sees. On the quick demo the pixel head's padding alone (`pixel_head_padding`)
    # took the outer ring's noise from 4x the inside's to 1.2-1.3x at 2-5% more training time; the whole net's
    # to 0.9x at 33% more (docs/results.md, 2026-12-07, session 40).
    padding: Literal["zeros", "circular"] = "zeros"
    pixel_head_padding: Literal["zeros", "circular"] | None = None  # the pixel head's; None: `padding`
    # Two input channels holding each pixel's (x, y) in [-1, 1] ("CoordConv", Liu et al. 2018): where a pixel
    # is, which zero-padded convolutions only learn slowly, for text like "at the top left" to act on.
    coord_channels: bool = False
    # A learned absolute position embedding (ViT; initialised to 2D sines and cosines) added to the
    # features each attention block computes its queries from: where a query is, for "at the top left".
    attention_positions: bool = False
    # Conditioning: text tokens projected to context_dim, optionally refined by a GLIDE-style transformer.
    context_dim: int | None = None  # width of the context tokens; the widest level when None
    text_layers: int = Field(0, ge=0)
    image_tokens: int = Field(4, ge=1)  # extra context tokens projected from the CLIP image embedding (unclip)
    # Classifier-free dropout (DALL-E 2 section 2.1): the image embedding 10% and the text 50% of the time.
    p_drop_image: float = Field(0.1, ge=0.0, le=1.0)
    p_drop_text: float = Field(0.5, ge=0.0, le=1.0)
    # Diffusion (the U-Net predicts eps, x0 or v). x0 leaves the least pixel noise after a short training run,
    # but blurs (docs/results.md, the quick demo's pictures).
    prediction: Literal["eps", "x0", "v"] = "eps"
    # Probability that a sample's t is drawn logit-normal (with mean 0: mid noise, where shapes are
    # finished; the layout is decided at the noisiest steps) rather than uniform; 0 = uniform.
    t_logit_normal: float = Field(0.0, ge=0.0, le=1.0)
    t_logit_mean: float = 0.0  # where those t centre: median t/T = sigmoid(t_logit_mean); > 0 is noisier
    # Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits", section 3.2): the U-Net also sees an x0
    # estimate (3 more input channels). In training, half the samples get the net's own no-grad estimate
    # at the same x_t (the rest zeros), so it learns to refine a guess; sampling passes each step the
    # previous step's estimate. Costs one extra forward pass on half the batch per training step.
    self_condition: bool = False
    # GLIDE-style inpainting (Nichol et al. 2022, section 3.5): 4 more input channels hold the image with
    # the repainted region zeroed and the mask (1 = repaint). Training draws random boxes and brush strokes,
    # and masks the whole image `inpaint_whole` of the time, so the model still generates from nothing.
    # Fine-tune an existing decoder into one with `train_stage.py --init-from BUNDLE/decoder`.
    inpaint: bool = False
    inpaint_whole: float = Field(0.25, ge=0.0, le=1.0)
    learned_variance: bool = False
    # Token grounding (imagen; decoder.grounding, after TokenCompose, Wang et al. 2024): this weight times a
    # loss asking each shapes object's colour and shape tokens to be attended from inside that object, in
    # every attention block. 0: off (the attention then runs on SDPA's fused path).
    grounding_loss: float = Field(0.0, ge=0.0)
    # and the words that name an object's cell ("top left", "center"), where the caption names it, as its tokens
    grounding_places: bool = False
    # Colour dropout (imagen; a caption augmentation for held-out colour-shape pairs): each shapes object's
    # colour word is cut from the training caption with this probability ("a big star at the top left"),
    # so its shape word is also read without a colour beside it. The image keeps its colours. Tried at 0.3
    # (configs/levers/decoder-imagen-colour-dropout.yaml): worse on every binding number; off by default.
    p_drop_colour: float = Field(0.0, ge=0.0, le=1.0)
    # Sampling defaults (previews, evaluation and the cascade): DDIM, 50 steps, guidance 3.
    guidance: float = Field(3.0, ge=0.0)
    # x0 clipping while sampling: None, "static" ([-1, 1]) or a dynamic thresholding percentile in (0, 1)
    # (Imagen).
    threshold: Literal["static"] | float | None = 0.995
    # Per-object guidance (imagen; `generate --regions`) runs only at the noisiest share of the schedule's
    # timesteps, t >= (1 - region_share) T, where the layout is decided; plain guidance after. At every
    # step (1) it cost a model that binds by itself 0.857 -> 0.630 on the binding benchmark; at 0.25 that
    # model keeps 0.836 (placement 0.997) and the demo's decoder binds 0.151 against 0.109 and 0.089
    # without (docs/results.md, 2026-12-06).
    region_share: float = Field(0.25, gt=0.0, le=1.0)
    eval_guidance: list[float] = [1.0, 3.0]
    eval_samples: int = Field(64, ge=2)

    @model_validator(mode="after")
    def _check(self):
        from cascade.encoders.frozen_text import FROZEN_TEXT_ENCODERS

        if self.conditioning == "imagen" and self.text_dim != FROZEN_TEXT_ENCODERS[self.text_encoder]:
            raise ValueError(f"text_dim {self.text_dim}: the frozen {self.text_encoder} gives "
                             f"{FROZEN_TEXT_ENCODERS[self.text_encoder]}-wide token states")
        if self.grounding_loss and self.conditioning != "imagen":
            raise ValueError("grounding_loss needs conditioning: imagen (it grounds the caption's own tokens)")
        if self.p_drop_colour and self.conditioning != "imagen":
            raise ValueError("p_drop_colour rewrites the captions the decoder reads: it needs conditioning: imagen "
                             "(unclip reads stored CLIP embeddings)")
        if self.grounding_places and not self.grounding_loss:
            raise ValueError("grounding_places adds words to the grounding loss: set grounding_loss too")
        if self.grounding_loss and self.gradient_checkpointing:
            raise ValueError("grounding_loss records attention maps in the forward pass: it cannot be combined "
                             "with gradient_checkpointing")
        levels = len(self.channel_mult)
        blocks = self.block_counts
        if len(blocks) != levels:
            raise ValueError(f"num_res_blocks has {len(blocks)} entries for {levels} levels of channel_mult")
        first = self.image_size // self.patch_size
        sizes = [first // 2**i for i in range(levels)]
        if self.image_size % (self.patch_size * 2 ** (levels - 1)):
            raise ValueError(f"image_size {self.image_size} does not halve {levels - 1} times after patch_size "
                             f"{self.patch_size}")
        missing = [r for r in self.attention_resolutions if r not in sizes]
        if missing:
            raise ValueError(f"attention_resolutions {missing} are not among the U-Net's feature sizes {sizes}")
        for width in [self.channels * m for m in self.channel_mult]:
            if width % self.head_dim:
                raise ValueError(f"level width {width} is not a multiple of head_dim {self.head_dim}")
        return self

    @property
    def block_counts(self) -> list[int]:
        if isinstance(self.num_res_blocks, int):
            return [self.num_res_blocks] * len(self.channel_mult)
        return list(self.num_res_blocks)

    @property
    def embedding_dim(self) -> int:
        return self.emb_dim or 4 * self.channels

    @property
    def context_width(self) -> int:
        return self.context_dim or self.channels * max(self.channel_mult)
