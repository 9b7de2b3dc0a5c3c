"""Display: line integrals -> 8-bit pictures, PNG files, the registration overlay."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from xvr_ros.core.io.files import atomic_path


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


def overlay_edges(xray: torch.Tensor | np.ndarray, drr: torch.Tensor | np.ndarray, quantile: float = 0.9) -> np.ndarray:
    """(H, W) X-ray and (H, W) DRR -> (H, W, 3) uint8: the X-ray in gray with the DRR's edges in green.

    Edges are the DRR's strongest Sobel gradients (above the ``quantile`` of the gradient
    magnitude), so a person sees at a glance whether the registered anatomy lines up.
    """
    gray = to_uint8(xray)
    d = torch.as_tensor(np.asarray(drr.detach().cpu() if isinstance(drr, torch.Tensor) else drr), dtype=torch.float32)[
        None, None
    ]
    if d.shape[-2:] != gray.shape:
        raise ValueError(f"overlay: X-ray {gray.shape} and DRR {tuple(d.shape[-2:])} differ in size")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    pad = torch.nn.functional.pad(d, (1, 1, 1, 1), mode="replicate")
    gx = torch.nn.functional.conv2d(pad, kx.view(1, 1, 3, 3))
    gy = torch.nn.functional.conv2d(pad, kx.T.reshape(1, 1, 3, 3))
    mag = (gx.square() + gy.square()).sqrt()[0, 0]
    edges = (mag > torch.quantile(mag.flatten(), quantile)) & (mag > 0)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[edges.numpy()] = (0, 255, 0)
    return rgb


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, sigma in pixels, edges replicated."""
    radius = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device).square() / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
