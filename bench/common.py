"""Shared by the benchmark scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def guide_image(size: int) -> Image.Image:
    """A smooth random square picture: blobs rather than pixel noise, like a photo's layout."""
    pixels = np.random.default_rng(0).integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
