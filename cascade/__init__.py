"""cascade: a trainable DALL-E 2 / Imagen-style text-to-image cascade."""
import os as _os

# Nothing may reach a model hub at run time: every pretrained part ships in a package.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"
