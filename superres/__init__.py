"""Super-resolution stages `sr256` (64 -> 256) and `sr1024` (256 -> 1024); importing registers both.

  config.py        SRConfig / SR1024Config: the `model:` section (DiffusionConfig's fields and the SR ones)
  stage.py         SR256 / SR1024: degradation and crops, loss with noise-conditioning augmentation, sample
  evaluation.py    PSNR / SSIM against bicubic per source, over aug level and steps; detailed crops
  degradations.py  blur, resize and JPEG for the low-res input in training (BSR-style mix)
  unet.py          Imagen's Efficient U-Net, fully convolutional (no self-attention, per-pixel norms)
  blocks.py        the local layers it is built from (PixelNorm, LocalResBlock, text cross-attention)
  augmentation.py  the forward-diffusion corruption of the low-res input at a level s in [0, 1]
  tiling.py        overlapping, blended tiles for whole-image inference at 1024x1024
  metrics.py       PSNR, SSIM (Wang et al. 2004), the bicubic baseline
"""
from superres.config import SR1024Config, SRConfig
from superres.stage import SR256, SR1024, SuperResStage

__all__ = ["SR256", "SR1024", "SR1024Config", "SRConfig", "SuperResStage"]
