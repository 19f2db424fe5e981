"""cascade: a trainable DALL-E 2 / Imagen-style text-to-image cascade."""

__version__ = "0.1.0"
