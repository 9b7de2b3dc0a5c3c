"""Plain X-ray images (PNG/TIFF 8/16-bit or float, .npy, arrays) with explicit intrinsics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from xvr_ros.core.geometry import Detector
from xvr_ros.core.intrinsics import crop_detector
from xvr_ros.core.io.xray import (
    Xray,
    XrayError,
    as_image_tensor,
    check_crop,
    check_sdd,
    clipped_mask,
    log_transform,
    robust_max,
    spacing_pair,
)


def _load_plain(source, name: str) -> np.ndarray:
    if isinstance(source, torch.Tensor):
        return source.detach().cpu().numpy()
    if isinstance(source, np.ndarray):
        return source
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError as exc:
            raise XrayError(f"{name}: no such file") from exc
        except Exception as exc:
            raise XrayError(f"{name}: not a readable .npy array ({exc})") from exc
    if suffix not in (".png", ".tif", ".tiff"):
        raise XrayError(f"{name}: unsupported image type {suffix!r} (PNG, TIFF, .npy; DICOM: read_xray_dicom)")
    from PIL import Image

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise XrayError(f"{name}: {im.n_frames} pages/frames; save the one to register as its own file")
            mode = im.mode
            arr = np.array(im)
    except XrayError:
        raise
    except FileNotFoundError as exc:
        raise XrayError(f"{name}: no such file") from exc
    except Exception as exc:
        raise XrayError(f"{name}: not a readable image ({exc})") from exc
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
        if not (colour == colour[..., :1]).all():
            raise XrayError(f"{name}: a colour ({mode}) image; an X-ray must be greyscale")
        arr = colour[..., 0]
    return arr


def read_xray_image(
    source: str | os.PathLike | np.ndarray | torch.Tensor,
    *,
    sdd: float,
    pixel_spacing: float | tuple[float, float],
    intensity: str = "log",
    i0: float | None = None,
    crop: int = 0,
    x0: float = 0.0,
    y0: float = 0.0,
    reverse_x_axis: bool = True,
    orientation: str | None = "AP",
    valid_mask: np.ndarray | torch.Tensor | None = None,
    mask_clipped: bool = False,
) -> Xray:
    """Read a PNG/TIFF (8/16-bit or float) / .npy image, or take an array, with explicit intrinsics.

    intensity: "log" -- values are transmitted intensity (higher = more X-rays), converted to
    ``-log(clip(I / I0, r_min, 1))`` with ``I0 = i0`` or the 99.9th percentile of the valid pixels;
    "linear" -- values already are line integrals (higher = more attenuation), kept as they are.
    pixel_spacing: mm at the detector, scalar or (row, column). x0, y0: principal point offset, mm.
    mask_clipped: also exclude pixels at a clipped extreme value (:func:`clipped_mask`) from
    ``valid_mask`` (the image keeps them; only the similarity ignores them).
    """
    name = "<array>" if isinstance(source, (np.ndarray, torch.Tensor)) else str(source)
    if intensity not in ("log", "linear"):
        raise XrayError(f"{name}: intensity= must be 'log' or 'linear', got {intensity!r}")
    sdd_mm = check_sdd(sdd, name, "option sdd=")
    dely, delx = spacing_pair(pixel_spacing, name, "option pixel_spacing=")
    arr = np.asarray(_load_plain(source, name))
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.dtype.kind not in "biuf":
        raise XrayError(f"{name}: expected a 2D greyscale image, got shape {arr.shape} dtype {arr.dtype}")
    values = arr.astype(np.float64)
    if not np.isfinite(values).all():
        raise XrayError(f"{name}: the image contains NaN or infinite values")
    height, width = values.shape
    mask = None
    if valid_mask is not None:
        if isinstance(valid_mask, torch.Tensor):
            valid_mask = valid_mask.detach().cpu().numpy()
        mask = np.asarray(valid_mask).astype(bool)
        mask = mask.reshape(mask.shape[-2:]) if mask.size == height * width else None
        if mask is None:
            raise XrayError(f"{name}: valid_mask= does not have the image's shape {values.shape}")
    c = check_crop(crop, (height, width), name)
    if c:
        values = values[c:-c, c:-c]
        mask = None if mask is None else mask[c:-c, c:-c]
    if intensity == "log":
        ref = float(i0) if i0 is not None else robust_max(values, mask)
        L, info = log_transform(values, ref, name)
    else:
        L, info = values, {}
    if mask_clipped:
        # After I0: a saturated level is the best estimate of the unattenuated intensity.
        clipped = clipped_mask(values)
        if clipped is not None:
            info["clipped_fraction"] = float(1.0 - clipped.mean())
            mask = clipped if mask is None else mask & clipped
            if not mask.any():
                raise XrayError(f"{name}: every pixel is at a clipped value: nothing to register")
    detector = crop_detector(
        Detector(sdd_mm, height, width, delx, dely, x0, y0, reverse_x_axis=reverse_x_axis, orientation=orientation),
        c, c, c, c,
    )
    metadata = {
        "modality": None,
        "photometric_interpretation": None,
        "frames": 1,
        "frame_reduction": None,
        "dtype": str(arr.dtype),
        "intensity": {"mode": intensity, "mode_reason": f"option intensity={intensity!r}", **info},
        "sdd_source": "option sdd=",
        "pixel_spacing_source": "option pixel_spacing=",
        "original_shape": (height, width),
        "crop": c,
        "warnings": [],
    }
    return Xray(
        image=as_image_tensor(L),
        detector=detector,
        valid_mask=None if mask is None else torch.from_numpy(mask.copy())[None, None],
        source=name,
        metadata=metadata,
    )
