"""Super-resolution stages `sr256` (64 -> 256) and `sr1024` (256 -> 1024); importing registers both.

  stage.py         SR256 / SR1024: config, loss with noise-conditioning augmentation, sample, evaluate
  unet.py          Imagen's Efficient U-Net, fully convolutional (no self-attention, per-pixel norms)
  blocks.py        the local layers it is built from (PixelNorm, LocalResBlock, text cross-attention)
  augmentation.py  the forward-diffusion corruption of the low-res input at a level s in [0, 1]
  tiling.py        overlapping, blended tiles for whole-image inference at 1024x1024
  metrics.py       PSNR, SSIM (Wang et al. 2004), the bicubic baseline
"""
from superres.stage import SR256, SR1024, SRConfig, SR1024Config, SuperResStage

__all__ = ["SR256", "SR1024", "SR1024Config", "SRConfig", "SuperResStage"]
