"""Between detectors: crops and Eq. 26, resampling an image from one pinhole to another."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from xvr_ros.core.geometry import Detector


def crop_detector(detector: Detector, top: int, bottom: int, left: int, right: int) -> Detector:
    """The detector of an image cropped by the given numbers of pixels on each side.

    Pixel ``(r, c)`` of the crop is pixel ``(r + top, c + left)`` of the original, and every ray
    keeps its direction: the principal point in pixel coordinates moves by ``(-left, -top)``.
    A symmetric crop therefore leaves ``x0``, ``y0`` unchanged.
    """
    height = detector.height - top - bottom
    width = detector.width - left - right
    if min(top, bottom, left, right) < 0 or height < 1 or width < 1:
        raise ValueError(f"cannot crop ({top}, {bottom}, {left}, {right}) from a {detector.shape} detector")
    sx = 1.0 if detector.reverse_x_axis else -1.0  # sign of x0 in K[0, 2]
    return replace(
        detector,
        height=height,
        width=width,
        x0=detector.x0 + sx * detector.delx * (right - left) / 2,
        y0=detector.y0 + detector.dely * (bottom - top) / 2,
    )


def intrinsics_homography(source: Detector, target: Detector, dtype=torch.float64) -> torch.Tensor:
    """(3, 3) ``H`` with ``x_target ~ H x_source`` in pixel coordinates (Eq. 26).

    ``H = K_t M K_s^-1`` where ``M = diag(-1, 1, 1)`` if the two detectors differ in
    ``reverse_x_axis`` (their image frames are mirrored in x relative to each other) and the
    identity otherwise. Both detectors must share the camera frame (same ``orientation``).
    """
    if source.orientation != target.orientation:
        raise ValueError(
            f"source and target orientations differ ({source.orientation!r} vs {target.orientation!r}): "
            "that is a change of camera frame, not of intrinsics"
        )
    mirror = -1.0 if source.reverse_x_axis != target.reverse_x_axis else 1.0
    M = torch.diag(torch.tensor([mirror, 1.0, 1.0], dtype=torch.float64))
    H = target.intrinsic_matrix(torch.float64) @ M @ torch.linalg.inv(source.intrinsic_matrix(torch.float64))
    return H.to(dtype)


def resample_to_intrinsics(
    image: torch.Tensor,
    source: Detector,
    target: Detector,
    *,
    mask: torch.Tensor | None = None,
    antialias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``(B, C, Hs, Ws)`` images taken with ``source`` intrinsics to ``target`` ones.

    Eq. 26: ``x_target = K_t K_s^-1 x_source`` (see :func:`intrinsics_homography`): the same rays,
    another pinhole. Each target pixel centre ``(c + 0.5, r + 0.5)`` is mapped back into the source
    and sampled bilinearly (``grid_sample``, ``align_corners=False``: source pixel coordinate ``u``
    is normalised as ``2 u / Ws - 1``), zeros outside.

    **Mirroring**: if ``source.reverse_x_axis != target.reverse_x_axis`` the output is mirrored
    left-right (for equal intrinsics otherwise, exactly ``image.flip(-1)``): the column direction
    of the image frame is part of what ``reverse_x_axis`` means, so the same rays land in mirrored
    columns. Both detectors must share ``orientation``.

    antialias: when a target pixel spans k >= 2 source pixels in both directions, the source is
    first averaged over k x k blocks (dropping the last rows/columns that do not fill a block, with
    the detector updated), so strong downsampling does not alias.
    mask: optional (B or 1, 1, Hs, Ws) bool validity of the source pixels.

    Returns the resampled ``(B, C, Ht, Wt)`` image and a ``(B, 1, Ht, Wt)`` bool mask, True where
    every pixel the bilinear interpolation used lies inside the source image (and is valid in
    ``mask``).
    """
    if image.ndim != 4 or tuple(image.shape[-2:]) != source.shape:
        raise ValueError(f"image must be (B, C, {source.height}, {source.width}), got {tuple(image.shape)}")
    batch = image.shape[0]
    if mask is not None:
        if mask.ndim != 4 or mask.shape[1] != 1 or tuple(mask.shape[-2:]) != source.shape:
            raise ValueError(f"mask must be (B, 1, {source.height}, {source.width}), got {tuple(mask.shape)}")
        weight = mask.to(image.dtype)
    else:
        weight = torch.ones(1, 1, *source.shape, dtype=image.dtype, device=image.device)

    if antialias:
        kx = (target.delx / target.sdd) / (source.delx / source.sdd)
        ky = (target.dely / target.sdd) / (source.dely / source.sdd)
        k = int(math.floor(min(kx, ky) + 1e-9))
        if k >= 2 and min(source.shape) >= k:
            bottom, right = source.height % k, source.width % k
            source = crop_detector(source, 0, bottom, 0, right).scaled(k)
            image = image[..., : image.shape[-2] - bottom, : image.shape[-1] - right]
            weight = weight[..., : weight.shape[-2] - bottom, : weight.shape[-1] - right]
            image = F.avg_pool2d(image, k)
            weight = -F.max_pool2d(-weight, k)  # a block is valid only if all its pixels are

    H_inv = torch.linalg.inv(intrinsics_homography(source, target))
    r = torch.arange(target.height, dtype=torch.float64, device=image.device) + 0.5
    c = torch.arange(target.width, dtype=torch.float64, device=image.device) + 0.5
    vv, uu = torch.meshgrid(r, c, indexing="ij")
    pts = torch.stack([uu, vv, torch.ones_like(uu)], dim=-1) @ H_inv.to(image.device).T
    us, vs = pts[..., 0] / pts[..., 2], pts[..., 1] / pts[..., 2]
    grid = torch.stack([2 * us / source.width - 1, 2 * vs / source.height - 1], dim=-1).to(image.dtype)

    def warp(x: torch.Tensor) -> torch.Tensor:
        g = grid[None].expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=False)

    out, w = warp(image), warp(weight)
    valid = (w >= 1 - 1e-4).expand(batch, -1, -1, -1)
    return out, valid
