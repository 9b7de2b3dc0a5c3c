"""An X-ray image as line integrals with its intrinsics, and the checks every reader shares.

Every reader (:mod:`.xray_dicom`, :mod:`.xray_image`) returns **line integrals**
``L = ∫ μ ds`` (linear attenuation x length, higher = more attenuation, 0 = unattenuated), the
quantity the renderer produces, as a ``(1, 1, H, W)`` float32 tensor, together with a
:class:`~xvr_ros.core.geometry.Detector` holding the intrinsics (mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xvr_ros.core.geometry import Detector

DICOM_MODALITIES = ("XA", "RF", "DX", "CR")
SDD_RANGE_MM = (300.0, 2000.0)
SPACING_RANGE_MM = (0.01, 5.0)
MAGNIFICATION_RANGE = (1.0, 5.0)
I0_PERCENTILE = 99.9
_MIN_RATIO = 1e-6


class XrayError(ValueError):
    """An X-ray input problem: names the file, the DICOM tag and the option that can supply it."""


@dataclass
class Xray:
    """An X-ray image as line integrals with its intrinsics.

    image: (1, 1, H, W) float32 line integrals (higher = more attenuation).
    detector: intrinsics (``detector.shape == (H, W)``).
    valid_mask: (1, 1, H, W) bool (False outside a shutter/collimator), or None (all valid).
    positioner: (primary, secondary) C-arm angles in degrees, or None.
    source_to_patient: source-to-isocenter distance in mm, or None.
    source: where the image came from (a path, or "<array>").
    metadata: modality, photometric interpretation, frames, the conversion applied, warnings.
    """

    image: torch.Tensor
    detector: Detector
    valid_mask: torch.Tensor | None = None
    positioner: tuple[float, float] | None = None
    source_to_patient: float | None = None
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        shape = (1, 1, *self.detector.shape)
        if tuple(self.image.shape) != shape:
            raise ValueError(f"image shape {tuple(self.image.shape)} does not match the detector {shape}")
        if self.valid_mask is not None and (
            tuple(self.valid_mask.shape) != shape or self.valid_mask.dtype != torch.bool
        ):
            raise ValueError(f"valid_mask must be a bool tensor of shape {shape}")


def finite_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def check_sdd(value, path, origin: str) -> float:
    lo, hi = SDD_RANGE_MM
    sdd = finite_float(value)
    if sdd is None or not lo <= sdd <= hi:
        raise XrayError(
            f"{path}: source-to-detector distance from {origin} is {value!r}, outside the plausible "
            f"{lo:g}..{hi:g} mm (zero, negative, or metres instead of mm?); pass sdd=<mm>"
        )
    return sdd


def spacing_pair(value, path, origin: str) -> tuple[float, float]:
    """A spacing value (scalar or (row, col)) -> (dely, delx), validated."""
    lo, hi = SPACING_RANGE_MM
    vals = [value] if np.isscalar(value) else list(value)
    if len(vals) == 1:
        vals = vals * 2
    floats = [finite_float(v) for v in vals]
    if len(floats) != 2 or any(f is None or not lo <= f <= hi for f in floats):
        raise XrayError(
            f"{path}: pixel spacing from {origin} is {value!r}, outside the plausible {lo:g}..{hi:g} mm "
            f"(zero, negative or malformed?); pass pixel_spacing=<mm> or (row, column) mm"
        )
    return floats[0], floats[1]


def check_crop(crop, shape, path) -> int:
    if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 0:
        raise XrayError(f"{path}: crop= must be a non-negative number of pixels, got {crop!r}")
    if 2 * crop >= min(shape):
        raise XrayError(f"{path}: crop={crop} removes the whole {shape[0]}x{shape[1]} image; use a smaller crop=")
    return int(crop)


def robust_max(values: np.ndarray, mask: np.ndarray | None) -> float:
    sel = values if mask is None else values[mask]
    return float(np.percentile(sel, I0_PERCENTILE)) if sel.size else float("nan")


def clipped_mask(values: np.ndarray, min_fraction: float = 0.005) -> np.ndarray | None:
    """(H, W) bool, False where a pixel sits at the image's minimum or maximum value and that
    exact value covers at least ``min_fraction`` of the image: saturated pixels, and shutters or
    collimated areas that the imaging chain delivers as one constant value. Such pixels say
    nothing about the anatomy. None when no value qualifies (a noisy image rarely repeats an
    extreme)."""
    valid = np.ones(values.shape, dtype=bool)
    for extreme in (values.min(), values.max()):
        at = values == extreme
        if at.mean() >= min_fraction:
            valid &= ~at
    return None if valid.all() else valid


def log_transform(intensity: np.ndarray, i0: float, path) -> tuple[np.ndarray, dict]:
    """Intensity -> line integrals -log(clip(I / I0, r_min, 1))."""
    if not (math.isfinite(i0) and i0 > 0):
        raise XrayError(f"{path}: no positive unattenuated intensity I0 ({i0!r}); pass i0= or intensity='linear'")
    ratio = intensity / i0
    positive = ratio[ratio > 0]
    r_min = max(float(positive.min()) if positive.size else _MIN_RATIO, _MIN_RATIO)
    clamped = float(np.mean((ratio < r_min) | (ratio > 1)))
    return -np.log(np.clip(ratio, r_min, 1.0)), {"i0": i0, "r_min": r_min, "clamped_fraction": clamped}


def as_image_tensor(L: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(L, dtype=np.float32))[None, None]
