"""Frozen CLIP and text encoders behind one small interface; open_clip and transformers live here only.

    enc = load_encoder("bundle/clip")          # a CLIP stage folder exported by the engine
    enc = load_encoder("ViT-L-14:openai")      # or any open_clip model[:pretrained tag or file]
    z_i = enc.encode_image(images)             # (B, D) L2-normalised; images (B, 3, H, W) in [-1, 1]
    z_t, tokens, mask = enc.encode_text(texts) # (B, D), (B, L, Dt), (B, L) bool

`enc.embed_dim`, `enc.token_dim` and `enc.max_text_len` give D, Dt and L. See `clip_model`.

    lm = frozen_text_encoder("minilm_l6")      # a frozen language model (the Imagen-style decoder's)
    pooled, tokens, mask = lm.encode(texts)    # (B, D), (B, L, D), (B, L) bool; see `frozen_text`
"""
from cascade.encoders.clip_model import ClipEncoder, ClipEncoderConfig
from cascade.encoders.frozen_text import FROZEN_TEXT_ENCODERS, FrozenTextEncoder, frozen_text_encoder
from cascade.encoders.loading import encoder_identity, load_encoder

__all__ = ["FROZEN_TEXT_ENCODERS", "ClipEncoder", "ClipEncoderConfig", "FrozenTextEncoder", "encoder_identity",
           "frozen_text_encoder", "load_encoder"]
