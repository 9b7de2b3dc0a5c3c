"""Display: line integrals -> 8-bit pictures, PNG files, the one registration overlay."""

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


#: Overlay colours: the DRR's edges and the boundary of the pixels the registration scored.
EDGE_RGB = (0, 255, 0)
FOV_RGB = (255, 128, 0)


@torch.no_grad()
def registration_overlay(
    renderer,
    xray,
    pose_mm: torch.Tensor,
    max_size: int = 512,
    field_of_view: torch.Tensor | np.ndarray | None = None,
    edge_fraction: float = 0.08,
) -> np.ndarray:
    """The registration overlay -> (H, W, 3) uint8 at the X-ray's size.

    The X-ray (bone white), the strongest ``edge_fraction`` of the gradient magnitude of the DRR
    at ``pose_mm`` ((4, 4) or (1, 4, 4) mm) in green, and the boundary of ``field_of_view`` ((H, W)
    bool, any leading singleton dims; e.g. ``Registration.field_of_view``) in orange. The DRR is
    rendered by ``renderer`` (``renderer(pose, detector) -> (1, C, h, w)``) at most ``max_size`` px
    on a side (the same physical detector, coarser pixels) and its edges upsampled.
    """
    det = xray.detector
    factor = max(1.0, max(det.height, det.width) / max(1, int(max_size)))
    small = det.scaled(factor) if factor > 1 else det
    drr = renderer(pose_mm.reshape(1, 4, 4).to(renderer.dtype), small).sum(1, keepdim=True).to(torch.float32).cpu()
    drr = gaussian_blur(drr, 1.0)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    pad = F.pad(drr, (1, 1, 1, 1), mode="replicate")
    mag = (F.conv2d(pad, kx.view(1, 1, 3, 3)).square() + F.conv2d(pad, kx.T.reshape(1, 1, 3, 3)).square()).sqrt()
    if small.shape != det.shape:
        mag = F.interpolate(mag, size=det.shape, mode="bilinear", align_corners=False)
    mag = mag[0, 0].numpy()
    rgb = np.repeat(to_uint8(xray.image[0, 0])[..., None], 3, axis=-1)
    if (mag > 0).any():
        rgb[mag >= max(float(np.quantile(mag[mag > 0], 1 - edge_fraction)), 1e-12)] = EDGE_RGB
    if field_of_view is not None:
        fov = np.asarray(field_of_view.cpu() if isinstance(field_of_view, torch.Tensor) else field_of_view, dtype=bool)
        fov = fov.reshape(det.shape)
        if not fov.all():
            p = np.pad(fov, 1, mode="edge")  # the image's own border is not a boundary
            inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
            rgb[fov & ~inner] = FOV_RGB
    return rgb


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images, sigma in pixels, edges replicated."""
    radius = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device).square() / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
