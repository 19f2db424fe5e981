"""`Sample`: what every data source yields and `cascade data build` writes as one shard entry."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Sample:
    key: str
    images: dict[int, Image.Image]  # size -> RGB image of that size
    txt: str
    json: dict[str, Any] = field(default_factory=dict)
