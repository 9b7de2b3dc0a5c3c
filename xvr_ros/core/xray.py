"""X-ray images: reading (DICOM, PNG/TIFF/NumPy) into line integrals + intrinsics, Eq. 26
resampling between intrinsics, the DICOM positioner prior (M.8), and display conversion.

Everything here returns **line integrals** ``L = ∫ μ ds`` (linear attenuation x length, higher =
more attenuation, 0 = unattenuated), the quantity the renderer produces, as a ``(1, 1, H, W)``
float32 tensor, together with a :class:`~xvr_ros.core.geometry.Detector` holding the intrinsics.

From stored DICOM pixels to line integrals (:func:`read_xray_dicom`)
------------------------------------------------------------------
1. Stored values -> Modality LUT (``RescaleSlope``/``RescaleIntercept`` or a Modality LUT
   Sequence). VOI LUTs / windows are display-only and ignored.
2. Two independent questions decide the conversion; both answers are recorded in
   ``metadata["intensity"]``:

   *relationship* -- are the values proportional to the transmitted X-ray intensity ``I``
   (``"log"`` mode: ``L = -log(I / I0)``) or already logarithmic, i.e. linear in ``L``
   (``"linear"`` mode)? With ``intensity="auto"``: PixelIntensityRelationship (0028,1040)
   ``LIN`` -> ``"log"``, ``LOG`` -> ``"linear"``; otherwise (``DISP``, absent, other) by modality:
   XA/RF -> ``"log"`` (fluoroscopy stores detector intensity; xvr linearises these the same way),
   DX/CR -> ``"linear"`` (processed radiographs are log-exposure images), with a warning.

   *direction* -- do higher values mean more transmitted X-rays (``"transmission"``) or more
   attenuation (``"attenuation"``)? With ``higher="auto"``: PixelIntensityRelationshipSign
   (0028,1041) ``+1`` -> transmission, ``-1`` -> attenuation. Without it, from the photometric
   interpretation and each modality's display convention:

   - XA/RF are shown *fluoroscopy-like*: bright = more transmitted X-rays (vessels, bone dark).
     MONOCHROME2 (high values bright) -> transmission; MONOCHROME1 (high values dark) -> attenuation.
   - DX/CR are shown *film-like*: bright = attenuating (bone white). MONOCHROME1 (high values
     dark = much exposure = little attenuation) -> transmission; MONOCHROME2 -> attenuation.

   MONOCHROME1 is only a display inversion: it never changes the stored values, only which end
   of them is shown dark, which is why it enters through the display convention above.
3. Conversion (per frame, then frames are reduced, so "max" is the most attenuating frame):

   - log, transmission: ``L = -log(clip(I / I0, r_min, 1))``, ``I0`` = the 99.9th percentile of
     ``I`` over the valid pixels (a robust maximum: the unattenuated level, if the image has
     air in it) or ``i0=``; ``r_min`` = the smallest positive ratio (at least 1e-6).
   - log, attenuation (values fall linearly with intensity, e.g. an inverted LIN image):
     ``I = lo + hi - v`` with ``[lo, hi]`` the representable range through the Modality LUT,
     then as above.
   - linear, attenuation: ``L = v`` (kept, rescaled by the Modality LUT only).
   - linear, transmission (log of intensity): ``L = max(ref - v, 0)``, ``ref`` the 99.9th
     percentile (the unattenuated level), or ``i0=`` in the value units.

   In ``"linear"`` mode ``L`` is known only up to the unknown gain of the logarithmic LUT
   (unless the Modality LUT calibrates it); NCC-type similarities are invariant to it.

Intrinsics
----------
Pixel spacing: ImagerPixelSpacing (0018,1164) (spacing *at the detector*: what the cone-beam
pinhole model needs). Else PixelSpacing (0028,0030), which may be calibrated to the patient
plane (isocenter): if EstimatedRadiographicMagnificationFactor (0018,1114) is present the
detector spacing is ``PixelSpacing x factor``; else if PixelSpacingCalibrationType (0028,0A02)
says it is calibrated, ``PixelSpacing x SDD / DistanceSourceToPatient``; else it is used as is
with a warning in ``metadata``. DICOM orders spacing as (row, column) = (dely, delx).
SDD: DistanceSourceToDetector (0018,1110). The principal point is assumed at the image centre
(x0 = y0 = 0); DetectorActiveOrigin (0018,7028) is not a principal point and is not used.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .files import atomic_path
from .geometry import Detector

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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _tag(keyword: str) -> str:
    """'DistanceSourceToDetector' -> 'DistanceSourceToDetector (0018,1110)'."""
    from pydicom.datadict import tag_for_keyword

    t = tag_for_keyword(keyword)
    return keyword if t is None else f"{keyword} ({t >> 16:04X},{t & 0xFFFF:04X})"


def _finite_float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _check_sdd(value, path, origin: str) -> float:
    lo, hi = SDD_RANGE_MM
    sdd = _finite_float(value)
    if sdd is None or not lo <= sdd <= hi:
        raise XrayError(
            f"{path}: source-to-detector distance from {origin} is {value!r}, outside the plausible "
            f"{lo:g}..{hi:g} mm (zero, negative, or metres instead of mm?); pass sdd=<mm>"
        )
    return sdd


def _spacing_pair(value, path, origin: str) -> tuple[float, float]:
    """A spacing value (scalar or (row, col)) -> (dely, delx), validated."""
    lo, hi = SPACING_RANGE_MM
    vals = [value] if np.isscalar(value) else list(value)
    if len(vals) == 1:
        vals = vals * 2
    floats = [_finite_float(v) for v in vals]
    if len(floats) != 2 or any(f is None or not lo <= f <= hi for f in floats):
        raise XrayError(
            f"{path}: pixel spacing from {origin} is {value!r}, outside the plausible {lo:g}..{hi:g} mm "
            f"(zero, negative or malformed?); pass pixel_spacing=<mm> or (row, column) mm"
        )
    return floats[0], floats[1]


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


def _check_crop(crop, shape, path) -> int:
    if isinstance(crop, bool) or not isinstance(crop, (int, np.integer)) or crop < 0:
        raise XrayError(f"{path}: crop= must be a non-negative number of pixels, got {crop!r}")
    if 2 * crop >= min(shape):
        raise XrayError(f"{path}: crop={crop} removes the whole {shape[0]}x{shape[1]} image; use a smaller crop=")
    return int(crop)


def _robust_max(values: np.ndarray, mask: np.ndarray | None) -> float:
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


def _log_transform(intensity: np.ndarray, i0: float, path) -> tuple[np.ndarray, dict]:
    """Intensity -> line integrals -log(clip(I / I0, r_min, 1))."""
    if not (math.isfinite(i0) and i0 > 0):
        raise XrayError(f"{path}: no positive unattenuated intensity I0 ({i0!r}); pass i0= or intensity='linear'")
    ratio = intensity / i0
    positive = ratio[ratio > 0]
    r_min = max(float(positive.min()) if positive.size else _MIN_RATIO, _MIN_RATIO)
    clamped = float(np.mean((ratio < r_min) | (ratio > 1)))
    return -np.log(np.clip(ratio, r_min, 1.0)), {"i0": i0, "r_min": r_min, "clamped_fraction": clamped}


def _to_tensor(L: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(L, dtype=np.float32))[None, None]


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------
def _shutter_mask(ds, shape, warnings) -> tuple[np.ndarray | None, list[str]]:
    """Rectangular/circular display shutter and collimator (1-based pixel coords) -> valid mask."""
    h, w = shape
    rows, cols = np.arange(1, h + 1)[:, None], np.arange(1, w + 1)[None, :]
    mask = np.ones(shape, dtype=bool)
    used = []
    for kind in ("Shutter", "Collimator"):
        shape_kw = f"{kind}Shape"
        shapes = ds.get(shape_kw)
        if not shapes:
            continue
        shapes = shapes.split("\\") if isinstance(shapes, str) else list(shapes)
        for s in (str(s).strip().upper() for s in shapes):
            if s == "RECTANGULAR":
                edges = ("LeftVerticalEdge", "RightVerticalEdge", "UpperHorizontalEdge", "LowerHorizontalEdge")
                kws = [f"{kind}{e}" for e in edges]
                vals = [_finite_float(ds.get(k)) for k in kws]
                if None in vals:
                    warnings.append(f"{_tag(shape_kw)} is RECTANGULAR but its edges are missing: ignored")
                    continue
                left, right, upper, lower = vals
                mask &= (cols >= left) & (cols <= right) & (rows >= upper) & (rows <= lower)
                used.append(f"{kind.lower()} rectangular")
            elif s == "CIRCULAR":
                centre = ds.get(f"CenterOfCircular{kind}")
                radius = _finite_float(ds.get(f"RadiusOfCircular{kind}"))
                if centre is None or len(centre) != 2 or radius is None:
                    warnings.append(f"{_tag(shape_kw)} is CIRCULAR but its centre/radius are missing: ignored")
                    continue
                cr, cc = float(centre[0]), float(centre[1])
                mask &= (rows - cr) ** 2 + (cols - cc) ** 2 <= radius**2
                used.append(f"{kind.lower()} circular")
            else:
                warnings.append(f"{_tag(shape_kw)} {s} is not supported: ignored")
    return (mask if used else None), used


def _decide_intensity(ds, modality, photometric, intensity, higher, warnings) -> dict:
    rel = ds.get("PixelIntensityRelationship")
    rel = str(rel).strip().upper() if rel else None
    if intensity == "auto":
        if rel == "LIN":
            mode, why = "log", f"{_tag('PixelIntensityRelationship')} = LIN (values proportional to intensity)"
        elif rel == "LOG":
            mode, why = "linear", f"{_tag('PixelIntensityRelationship')} = LOG (values already logarithmic)"
        else:
            mode = "log" if modality in ("XA", "RF") else "linear"
            why = (
                f"{_tag('PixelIntensityRelationship')} is {rel or 'absent'}: assumed "
                + ("intensity (fluoroscopy)" if mode == "log" else "log-exposure (processed radiograph)")
                + f" for {modality}"
            )
            warnings.append(why + "; pass intensity='log' or 'linear' if that is wrong")
    else:
        mode, why = intensity, f"option intensity={intensity!r}"

    sign = ds.get("PixelIntensityRelationshipSign")
    if higher != "auto":
        direction, dwhy = higher, f"option higher={higher!r}"
    elif sign is not None and int(sign) in (1, -1):
        direction = "transmission" if int(sign) == 1 else "attenuation"
        dwhy = f"{_tag('PixelIntensityRelationshipSign')} = {int(sign):+d}"
    else:
        fluoro = modality in ("XA", "RF")
        bright_is_high = photometric == "MONOCHROME2"
        # fluoroscopy display: bright = transmitted; radiograph display: bright = attenuating.
        direction = "transmission" if bright_is_high == fluoro else "attenuation"
        dwhy = (
            f"{_tag('PhotometricInterpretation')} = {photometric} with the "
            + ("fluoroscopy (bright = more transmitted X-rays)" if fluoro else "radiograph (bright = attenuating)")
            + f" display convention of {modality}"
        )
    return {
        "mode": mode,
        "mode_reason": why,
        "higher_values_mean": direction,
        "direction_reason": dwhy,
        "pixel_intensity_relationship": rel,
        "pixel_intensity_relationship_sign": None if sign is None else int(sign),
    }


def _representable_range(ds) -> tuple[float, float]:
    from pydicom.pixels import apply_modality_lut

    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    out = np.asarray(apply_modality_lut(np.array([lo, hi], dtype=np.int64), ds), dtype=np.float64)
    return float(out.min()), float(out.max())


def _pixel_spacing(ds, path, sdd, spd, option, warnings) -> tuple[float, float, str]:
    if option is not None:
        dely, delx = _spacing_pair(option, path, "option pixel_spacing=")
        return dely, delx, "option pixel_spacing="
    imager = ds.get("ImagerPixelSpacing")
    pixel = ds.get("PixelSpacing")
    if imager is not None:
        dely, delx = _spacing_pair(imager, path, _tag("ImagerPixelSpacing"))
        if pixel is not None:
            other = [_finite_float(v) for v in ([pixel] if np.isscalar(pixel) else pixel)]
            if None not in other and len(other) == 2 and (abs(other[0] - dely) > 1e-6 or abs(other[1] - delx) > 1e-6):
                warnings.append(
                    f"{_tag('PixelSpacing')} {other} differs from {_tag('ImagerPixelSpacing')} "
                    f"({dely}, {delx}): calibrated elsewhere than the detector; the detector spacing is used"
                )
        return dely, delx, _tag("ImagerPixelSpacing")
    if pixel is None:
        raise XrayError(
            f"{path}: no pixel spacing: neither {_tag('ImagerPixelSpacing')} nor {_tag('PixelSpacing')} "
            "is present; pass pixel_spacing=<mm at the detector>"
        )
    row, col = _spacing_pair(pixel, path, _tag("PixelSpacing"))
    mag_value = ds.get("EstimatedRadiographicMagnificationFactor")
    calibration = ds.get("PixelSpacingCalibrationType")
    if mag_value is not None:
        mag = _finite_float(mag_value)
        mlo, mhi = MAGNIFICATION_RANGE
        if mag is None or not mlo <= mag <= mhi:
            raise XrayError(
                f"{path}: {_tag('EstimatedRadiographicMagnificationFactor')} is {mag_value!r}, outside "
                f"{mlo:g}..{mhi:g}; pass pixel_spacing=<mm at the detector>"
            )
        how = (
            f"{_tag('PixelSpacing')} (patient plane) x {_tag('EstimatedRadiographicMagnificationFactor')} "
            f"= {mag:g}"
        )
    elif calibration:
        if spd is None:
            raise XrayError(
                f"{path}: {_tag('PixelSpacing')} is calibrated ({_tag('PixelSpacingCalibrationType')} = "
                f"{calibration}) but neither {_tag('EstimatedRadiographicMagnificationFactor')} nor "
                f"{_tag('DistanceSourceToPatient')} is present to bring it to the detector; "
                "pass pixel_spacing=<mm at the detector>"
            )
        mag = sdd / spd
        how = (
            f"{_tag('PixelSpacing')} (calibrated: {calibration}) x SDD / {_tag('DistanceSourceToPatient')} "
            f"= {mag:g}"
        )
    else:
        mag = 1.0
        how = f"{_tag('PixelSpacing')} used as the detector spacing"
        warnings.append(
            f"no {_tag('ImagerPixelSpacing')}: {_tag('PixelSpacing')} used as the detector pixel spacing; "
            "if it is calibrated at the isocenter, pass pixel_spacing=<mm at the detector>"
        )
    dely, delx = _spacing_pair([row * mag, col * mag], path, how)
    return dely, delx, how


def read_xray_dicom(
    path: str | os.PathLike,
    *,
    frames: str | int = "max",
    crop: int = 0,
    sdd: float | None = None,
    pixel_spacing: float | tuple[float, float] | None = None,
    reverse_x_axis: bool = True,
    intensity: str = "auto",
    higher: str = "auto",
    i0: float | None = None,
    modality: str | None = None,
    orientation: str | None = "AP",
) -> Xray:
    """Read an XA/RF/DX/CR DICOM file into line integrals + intrinsics (see the module docstring).

    frames: multi-frame reduction of the per-frame line integrals: "max", "sum" or a 0-based index.
    crop: pixels dropped on every side (collimator edges); the detector is updated to match.
    sdd, pixel_spacing: override DistanceSourceToDetector / the pixel spacing tags (mm; spacing a
        scalar or (row, column)). Values are checked against ``SDD_RANGE_MM`` / ``SPACING_RANGE_MM``.
    intensity: "auto" | "log" (values proportional to intensity) | "linear" (values linear in L).
    higher: "auto" | "transmission" | "attenuation": what higher values (after the Modality LUT) mean.
    i0: the unattenuated level (intensity in "log" mode, value in "linear"/transmission mode)
        instead of the 99.9th percentile of the valid pixels.
    modality: treat the file as this modality (when (0008,0060) is missing or wrong).
    Raises :class:`XrayError` for every input problem.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = str(path)
    if intensity not in ("auto", "log", "linear"):
        raise XrayError(f"{path}: intensity= must be 'auto', 'log' or 'linear', got {intensity!r}")
    if higher not in ("auto", "transmission", "attenuation"):
        raise XrayError(f"{path}: higher= must be 'auto', 'transmission' or 'attenuation', got {higher!r}")
    if not (frames in ("max", "sum") or (isinstance(frames, (int, np.integer)) and not isinstance(frames, bool))):
        raise XrayError(f"{path}: frames= must be 'max', 'sum' or a frame index, got {frames!r}")
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise XrayError(f"{path}: no such file") from exc
    except Exception as exc:  # InvalidDicomError and friends
        raise XrayError(f"{path}: not a readable DICOM file ({exc})") from exc

    warnings: list[str] = []
    mod = (modality or str(ds.get("Modality", "") or "")).strip().upper()
    if not mod:
        raise XrayError(f"{path}: {_tag('Modality')} is missing; pass modality= (one of {', '.join(DICOM_MODALITIES)})")
    if mod not in DICOM_MODALITIES:
        raise XrayError(
            f"{path}: {_tag('Modality')} is {mod!r}; only {', '.join(DICOM_MODALITIES)} are X-ray projections "
            "(pass modality= to override, or use read_xray_image for other images)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise XrayError(
            f"{path}: {_tag('PhotometricInterpretation')} is {photometric or 'missing'!r}; "
            "only MONOCHROME1/MONOCHROME2 X-rays are supported"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise XrayError(f"{path}: {_tag('SamplesPerPixel')} is {ds.SamplesPerPixel}; a monochrome image has 1")

    # --- geometry tags (before the pixels: fail fast and cheap) ---
    if sdd is not None:
        sdd_mm, sdd_from = _check_sdd(sdd, path, "option sdd="), "option sdd="
    else:
        value = ds.get("DistanceSourceToDetector")
        if value is None:
            raise XrayError(f"{path}: {_tag('DistanceSourceToDetector')} is missing; pass sdd=<mm>")
        sdd_mm, sdd_from = _check_sdd(value, path, _tag("DistanceSourceToDetector")), _tag("DistanceSourceToDetector")
    spd = None
    spd_value = ds.get("DistanceSourceToPatient")
    if spd_value is not None:
        spd = _finite_float(spd_value)
        if spd is None or not 0 < spd < sdd_mm:
            warnings.append(f"{_tag('DistanceSourceToPatient')} = {spd_value!r} is not in (0, SDD): ignored")
            spd = None
    dely, delx, spacing_from = _pixel_spacing(ds, path, sdd_mm, spd, pixel_spacing, warnings)
    positioner = None
    angles = [ds.get("PositionerPrimaryAngle"), ds.get("PositionerSecondaryAngle")]
    if all(a is not None for a in angles):
        vals = [_finite_float(a) for a in angles]
        if None in vals:
            warnings.append(f"positioner angles {angles!r} are not numbers: ignored")
        else:
            positioner = (vals[0], vals[1])
    if ds.get("PositionerPrimaryAngleIncrement") is not None:
        warnings.append(f"{_tag('PositionerPrimaryAngleIncrement')} present: positioner angles are the first frame's")

    # --- pixels ---
    if "PixelData" not in ds:
        raise XrayError(f"{path}: {_tag('PixelData')} is missing")
    try:
        raw = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise XrayError(
            f"{path}: cannot decode {_tag('PixelData')} ({_tag('TransferSyntaxUID')} = {ts}): {exc}"
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    stack = np.asarray(raw)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.shape[0] != n_frames:
        raise XrayError(
            f"{path}: pixel array of shape {raw.shape} does not match {_tag('NumberOfFrames')} = {n_frames}"
        )
    if isinstance(frames, (int, np.integer)):
        if not 0 <= frames < n_frames:
            raise XrayError(
                f"{path}: frames={frames} is out of range: {_tag('NumberOfFrames')} = {n_frames}; "
                "pass frames= as 0-based index, 'max' or 'sum'"
            )
        stack = stack[int(frames) : int(frames) + 1]
    values = np.asarray(apply_modality_lut(stack, ds), dtype=np.float64)
    modality_lut = (
        "ModalityLUTSequence"
        if ds.get("ModalityLUTSequence")
        else (
            f"RescaleSlope {float(ds.get('RescaleSlope', 1))}, RescaleIntercept {float(ds.get('RescaleIntercept', 0))}"
            if ds.get("RescaleSlope") is not None or ds.get("RescaleIntercept") is not None
            else None
        )
    )

    height, width = values.shape[-2:]
    c = _check_crop(crop, (height, width), path)
    mask, shutters = _shutter_mask(ds, (height, width), warnings)
    if c:
        values = values[:, c:-c, c:-c]
        mask = None if mask is None else mask[c:-c, c:-c]
    if mask is not None and not mask.any():
        raise XrayError(f"{path}: the shutter/collimator tags leave no valid pixel inside the (cropped) image")

    decision = _decide_intensity(ds, mod, photometric, intensity, higher, warnings)
    mode, direction = decision["mode"], decision["higher_values_mean"]
    per_frame = []
    out = np.empty_like(values)
    for k, v in enumerate(values):
        if mode == "log":
            if direction == "attenuation":
                lo, hi = _representable_range(ds)
                v = lo + hi - v
                decision["inverted_with_range"] = (lo, hi)
            ref = i0 if i0 is not None else _robust_max(v, mask)
            out[k], info = _log_transform(v, float(ref), path)
        elif direction == "transmission":
            ref = float(i0) if i0 is not None else _robust_max(v, mask)
            out[k], info = np.maximum(ref - v, 0.0), {"reference": ref}
        else:
            out[k], info = v, {}
        per_frame.append(info)
    if frames == "max":
        L = out.max(axis=0)
    elif frames == "sum":
        L = out.sum(axis=0)
    else:
        L = out[0]
    decision["per_frame"] = per_frame
    if not np.isfinite(L).all():
        raise XrayError(f"{path}: the converted image has non-finite values")

    detector = crop_detector(
        Detector(sdd_mm, height, width, delx, dely, reverse_x_axis=reverse_x_axis, orientation=orientation),
        c, c, c, c,
    )
    metadata = {
        "modality": mod,
        "photometric_interpretation": photometric,
        "frames": n_frames,
        "frame_reduction": frames if n_frames > 1 else None,
        "modality_lut": modality_lut,
        "intensity": decision,
        "sdd_source": sdd_from,
        "pixel_spacing_source": spacing_from,
        "principal_point": "image centre (x0 = y0 = 0)",
        "original_shape": (height, width),
        "crop": c,
        "shutters": shutters,
        "patient_orientation": list(ds.get("PatientOrientation") or []) or None,
        "warnings": warnings,
    }
    return Xray(
        image=_to_tensor(L),
        detector=detector,
        valid_mask=None if mask is None else torch.from_numpy(mask.copy())[None, None],
        positioner=positioner,
        source_to_patient=spd,
        source=path,
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------------
# Plain images
# --------------------------------------------------------------------------------------------
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
    sdd_mm = _check_sdd(sdd, name, "option sdd=")
    dely, delx = _spacing_pair(pixel_spacing, name, "option pixel_spacing=")
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
    c = _check_crop(crop, (height, width), name)
    if c:
        values = values[c:-c, c:-c]
        mask = None if mask is None else mask[c:-c, c:-c]
    if intensity == "log":
        ref = float(i0) if i0 is not None else _robust_max(values, mask)
        L, info = _log_transform(values, ref, name)
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
        image=_to_tensor(L),
        detector=detector,
        valid_mask=None if mask is None else torch.from_numpy(mask.copy())[None, None],
        source=name,
        metadata=metadata,
    )


# --------------------------------------------------------------------------------------------
# Eq. 26: resampling between intrinsics
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# M.8: the DICOM positioner prior
# --------------------------------------------------------------------------------------------
def positioner_prior(
    xray: Xray, isocenter_distance: float | None = None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """C-arm parameters for :func:`~xvr_ros.core.geometry.carm_pose` from the DICOM positioner.

    ``angles_deg = [[PositionerPrimaryAngle, PositionerSecondaryAngle, 0]]`` (alpha ~ LAO/RAO,
    beta ~ CRA/CAU, gamma = 0) and ``xyz_mm = [[0, d, 0]]`` with ``d = isocenter_distance`` or the
    DistanceSourceToPatient (source-to-isocenter) tag, negated for ``orientation="PA"`` (as xvr).

    **A weak initialiser only** (M.8): the angles describe the C-arm relative to the *table*, not
    the patient, and ignore patient position and orientation, table motion and the volume's own
    frame; expect errors of many degrees and centimetres. Use it to seed a search, never as a pose.
    """
    if xray.positioner is None:
        raise XrayError(
            f"{xray.source}: no positioner angles ({_tag('PositionerPrimaryAngle')}, "
            f"{_tag('PositionerSecondaryAngle')}); there is no option to supply them here"
        )
    d = isocenter_distance if isocenter_distance is not None else xray.source_to_patient
    if d is None or _finite_float(d) is None or float(d) <= 0:
        raise XrayError(
            f"{xray.source}: no usable {_tag('DistanceSourceToPatient')} ({d!r}); pass isocenter_distance=<mm>"
        )
    d = -float(d) if xray.detector.orientation == "PA" else float(d)
    angles = torch.tensor([[xray.positioner[0], xray.positioner[1], 0.0]], dtype=dtype)
    xyz = torch.tensor([[0.0, d, 0.0]], dtype=dtype)
    return angles, xyz


# --------------------------------------------------------------------------------------------
# Display
# --------------------------------------------------------------------------------------------
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
    d = torch.as_tensor(np.asarray(drr.detach().cpu() if isinstance(drr, torch.Tensor) else drr), dtype=torch.float32)[None, None]
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
