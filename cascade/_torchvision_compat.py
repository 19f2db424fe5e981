"""Make PyPI's torchvision importable beside the CPU-only torch wheel we pin.

PyPI's torchvision wheel is a CUDA build. Next to torch's CPU wheel its compiled ops fail to load,
and ``import torchvision`` then dies registering fake kernels for ``torchvision::nms`` and
``torchvision::qnms``, operators that were never defined. open_clip and timm import torchvision at
import time, so without this the CLIP stage could not load at all.

When, and only when, the compiled ops are missing, we define those two operator schemas (no kernels)
and import again. Everything we use from torchvision (transforms, model code) is pure Python; its
detection ops keep raising torchvision's own "Couldn't load custom C++ ops" error, as they would
anyway. With a matched torch/torchvision pair this module does nothing.
"""
from __future__ import annotations

import sys

import torch

_LIBRARY = None  # keeps the schema registration alive for the life of the process


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing operator schemas first if its compiled ops did not load."""
    global _LIBRARY
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::" not in str(err) or _LIBRARY is not None:
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
