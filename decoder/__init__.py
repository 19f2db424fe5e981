"""The 64x64 decoder of the cascade (unCLIP's decoder): CLIP image embedding (+ text) -> image.

- `Decoder` (stage "decoder"), `DecoderConfig`: the stage (stage.py, config.py)
- `UNet`: the ADM/GLIDE U-Net (unet.py); `Conditioning`: z_i and text into embedding + context (conditioning.py)
- `slerp`, `text_diff`: the embedding maths of DALL-E 2's manipulations (manipulation.py; the
  manipulations themselves are `cascade.pipeline.Cascade`'s vary, interpolate and textdiff)
- `evaluate_decoder`, FD-EffNet: evaluation (evaluation.py, fd_effnet.py)
"""
from decoder.config import DecoderConfig
from decoder.stage import Decoder

__all__ = ["Decoder", "DecoderConfig"]
