"""X-ray images: display conversion and image files."""

from __future__ import annotations

import os

import numpy as np
import torch

from .files import atomic_path


def to_uint8(image: torch.Tensor | np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """(H, W) line integrals -> uint8 for display, windowed between two percentiles.

    Higher attenuation is brighter (bone white), as radiographs are shown.
    """
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    img = img.astype(np.float64)
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = np.percentile(img, [low, high])
    scaled = (img - lo) / max(hi - lo, np.finfo(np.float64).tiny)
    return (np.clip(scaled, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image: torch.Tensor | np.ndarray) -> None:
    """Write a (H, W) image (line integrals or uint8) as an 8-bit PNG, atomically."""
    from PIL import Image

    arr = np.asarray(image)
    data = arr if arr.dtype == np.uint8 else to_uint8(image)
    with atomic_path(path) as tmp:
        Image.fromarray(data).save(tmp, format="PNG")
