"""X-ray DICOM files (XA, RF, DX, CR) -> line integrals + intrinsics, and the DICOM positioner prior (M.8).

:func:`read_xray_dicom` returns **line integrals** ``L = ∫ μ ds`` (linear attenuation x length, higher =
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

import os

import numpy as np
import torch

from xvr_ros.core.geometry import Detector
from xvr_ros.core.intrinsics import crop_detector
from xvr_ros.core.io.xray import (
    DICOM_MODALITIES,
    MAGNIFICATION_RANGE,
    Xray,
    XrayError,
    as_image_tensor,
    check_crop,
    check_sdd,
    finite_float,
    log_transform,
    robust_max,
    spacing_pair,
)


def _tag(keyword: str) -> str:
    """'DistanceSourceToDetector' -> 'DistanceSourceToDetector (0018,1110)'."""
    from pydicom.datadict import tag_for_keyword

    t = tag_for_keyword(keyword)
    return keyword if t is None else f"{keyword} ({t >> 16:04X},{t & 0xFFFF:04X})"


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
                vals = [finite_float(ds.get(k)) for k in kws]
                if None in vals:
                    warnings.append(f"{_tag(shape_kw)} is RECTANGULAR but its edges are missing: ignored")
                    continue
                left, right, upper, lower = vals
                mask &= (cols >= left) & (cols <= right) & (rows >= upper) & (rows <= lower)
                used.append(f"{kind.lower()} rectangular")
            elif s == "CIRCULAR":
                centre = ds.get(f"CenterOfCircular{kind}")
                radius = finite_float(ds.get(f"RadiusOfCircular{kind}"))
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
        dely, delx = spacing_pair(option, path, "option pixel_spacing=")
        return dely, delx, "option pixel_spacing="
    imager = ds.get("ImagerPixelSpacing")
    pixel = ds.get("PixelSpacing")
    if imager is not None:
        dely, delx = spacing_pair(imager, path, _tag("ImagerPixelSpacing"))
        if pixel is not None:
            other = [finite_float(v) for v in ([pixel] if np.isscalar(pixel) else pixel)]
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
    row, col = spacing_pair(pixel, path, _tag("PixelSpacing"))
    mag_value = ds.get("EstimatedRadiographicMagnificationFactor")
    calibration = ds.get("PixelSpacingCalibrationType")
    if mag_value is not None:
        mag = finite_float(mag_value)
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
    dely, delx = spacing_pair([row * mag, col * mag], path, how)
    return dely, delx, how


def _check_options(path: str, frames, intensity: str, higher: str) -> None:
    if intensity not in ("auto", "log", "linear"):
        raise XrayError(f"{path}: intensity= must be 'auto', 'log' or 'linear', got {intensity!r}")
    if higher not in ("auto", "transmission", "attenuation"):
        raise XrayError(f"{path}: higher= must be 'auto', 'transmission' or 'attenuation', got {higher!r}")
    if not (frames in ("max", "sum") or (isinstance(frames, (int, np.integer)) and not isinstance(frames, bool))):
        raise XrayError(f"{path}: frames= must be 'max', 'sum' or a frame index, got {frames!r}")


def _open(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise XrayError(f"{path}: no such file") from exc
    except Exception as exc:  # InvalidDicomError and friends
        raise XrayError(f"{path}: not a readable DICOM file ({exc})") from exc


def _image_kind(ds, path: str, modality: str | None) -> tuple[str, str]:
    """(modality, photometric interpretation) of a monochrome X-ray projection, or XrayError."""
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
    return mod, photometric


def _source_distances(ds, path: str, sdd, warnings) -> tuple[float, str, float | None]:
    """(SDD mm, where it came from, source-to-patient distance mm or None)."""
    if sdd is not None:
        sdd_mm, sdd_from = check_sdd(sdd, path, "option sdd="), "option sdd="
    else:
        value = ds.get("DistanceSourceToDetector")
        if value is None:
            raise XrayError(f"{path}: {_tag('DistanceSourceToDetector')} is missing; pass sdd=<mm>")
        sdd_mm, sdd_from = check_sdd(value, path, _tag("DistanceSourceToDetector")), _tag("DistanceSourceToDetector")
    spd = None
    spd_value = ds.get("DistanceSourceToPatient")
    if spd_value is not None:
        spd = finite_float(spd_value)
        if spd is None or not 0 < spd < sdd_mm:
            warnings.append(f"{_tag('DistanceSourceToPatient')} = {spd_value!r} is not in (0, SDD): ignored")
            spd = None
    return sdd_mm, sdd_from, spd


def _positioner(ds, warnings) -> tuple[float, float] | None:
    """(PositionerPrimaryAngle, PositionerSecondaryAngle) in degrees, or None."""
    positioner = None
    angles = [ds.get("PositionerPrimaryAngle"), ds.get("PositionerSecondaryAngle")]
    if all(a is not None for a in angles):
        vals = [finite_float(a) for a in angles]
        if None in vals:
            warnings.append(f"positioner angles {angles!r} are not numbers: ignored")
        else:
            positioner = (vals[0], vals[1])
    if ds.get("PositionerPrimaryAngleIncrement") is not None:
        warnings.append(f"{_tag('PositionerPrimaryAngleIncrement')} present: positioner angles are the first frame's")
    return positioner


def _pixel_values(ds, path: str, frames) -> tuple[np.ndarray, int]:
    """Decoded pixels through the Modality LUT: ((F, H, W) float64, NumberOfFrames); F = 1 for a frame index."""
    from pydicom.pixels import apply_modality_lut

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
    return np.asarray(apply_modality_lut(stack, ds), dtype=np.float64), n_frames


def _modality_lut_name(ds) -> str | None:
    """How the Modality LUT was given, for the metadata."""
    if ds.get("ModalityLUTSequence"):
        return "ModalityLUTSequence"
    if ds.get("RescaleSlope") is not None or ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        return f"RescaleSlope {slope}, RescaleIntercept {intercept}"
    return None


def _crop_and_shutter(ds, path: str, values: np.ndarray, crop: int, warnings):
    """Drop ``crop`` pixels on every side; return (values, valid mask (H', W') or None, crop, shutters used)."""
    height, width = values.shape[-2:]
    c = check_crop(crop, (height, width), path)
    mask, shutters = _shutter_mask(ds, (height, width), warnings)
    if c:
        values = values[:, c:-c, c:-c]
        mask = None if mask is None else mask[c:-c, c:-c]
    if mask is not None and not mask.any():
        raise XrayError(f"{path}: the shutter/collimator tags leave no valid pixel inside the (cropped) image")
    return values, mask, c, shutters


def _line_integrals(ds, path: str, values: np.ndarray, mask, decision: dict, i0, frames) -> np.ndarray:
    """Convert each frame (module docstring, step 3), then reduce the frames -> (H, W) line integrals.

    Records each frame's reference level in ``decision["per_frame"]``.
    """
    mode, direction = decision["mode"], decision["higher_values_mean"]
    per_frame = []
    out = np.empty_like(values)
    for k, v in enumerate(values):
        if mode == "log":
            if direction == "attenuation":
                lo, hi = _representable_range(ds)
                v = lo + hi - v
                decision["inverted_with_range"] = (lo, hi)
            ref = i0 if i0 is not None else robust_max(v, mask)
            out[k], info = log_transform(v, float(ref), path)
        elif direction == "transmission":
            ref = float(i0) if i0 is not None else robust_max(v, mask)
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
    return L


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
    path = str(path)
    _check_options(path, frames, intensity, higher)
    ds = _open(path)
    warnings: list[str] = []
    mod, photometric = _image_kind(ds, path, modality)
    # Geometry tags before the pixels: fail fast and cheap.
    sdd_mm, sdd_from, spd = _source_distances(ds, path, sdd, warnings)
    dely, delx, spacing_from = _pixel_spacing(ds, path, sdd_mm, spd, pixel_spacing, warnings)
    positioner = _positioner(ds, warnings)

    values, n_frames = _pixel_values(ds, path, frames)
    height, width = values.shape[-2:]
    values, mask, c, shutters = _crop_and_shutter(ds, path, values, crop, warnings)
    decision = _decide_intensity(ds, mod, photometric, intensity, higher, warnings)
    L = _line_integrals(ds, path, values, mask, decision, i0, frames)

    detector = crop_detector(
        Detector(sdd_mm, height, width, delx, dely, reverse_x_axis=reverse_x_axis, orientation=orientation),
        c, c, c, c,
    )
    metadata = {
        "modality": mod,
        "photometric_interpretation": photometric,
        "frames": n_frames,
        "frame_reduction": frames if n_frames > 1 else None,
        "modality_lut": _modality_lut_name(ds),
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
        image=as_image_tensor(L),
        detector=detector,
        valid_mask=None if mask is None else torch.from_numpy(mask.copy())[None, None],
        positioner=positioner,
        source_to_patient=spd,
        source=path,
        metadata=metadata,
    )


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
    if d is None or finite_float(d) is None or float(d) <= 0:
        raise XrayError(
            f"{xray.source}: no usable {_tag('DistanceSourceToPatient')} ({d!r}); pass isocenter_distance=<mm>"
        )
    d = -float(d) if xray.detector.orientation == "PA" else float(d)
    angles = torch.tensor([[xray.positioner[0], xray.positioner[1], 0.0]], dtype=dtype)
    xyz = torch.tensor([[0.0, d, 0.0]], dtype=dtype)
    return angles, xyz
