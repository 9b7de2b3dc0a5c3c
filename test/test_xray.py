"""X-ray reading (DICOM, plain images), Eq. 26 resampling and the positioner prior.

The DICOM files are written here with pydicom from a known line-integral image L, so every
conversion is checked against the analytic answer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xvr_ros.core import geometry as g
from xvr_ros.core.geometry import Detector
from xvr_ros.core.imaging import save_png, to_uint8
from xvr_ros.core.intrinsics import (
    crop_detector,
    intrinsics_homography,
    resample_to_intrinsics,
)
from xvr_ros.core.io.xray import Xray, XrayError, clipped_mask
from xvr_ros.core.io.xray_dicom import positioner_prior, read_xray_dicom
from xvr_ros.core.io.xray_image import read_xray_image

SOP = {
    "XA": "1.2.840.10008.5.1.4.1.1.12.1",
    "RF": "1.2.840.10008.5.1.4.1.1.12.2",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
}
H, W = 40, 56


def line_integrals(shift=0.0, scale=1.0):
    """A body (ellipse, L up to ~3) with a 'bone' inside and air (L = 0) around it."""
    r, c = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    body = np.clip(1 - ((c - W / 2 - shift) / (0.35 * W)) ** 2 - ((r - H / 2) / (0.35 * H)) ** 2, 0, None)
    bone = np.exp(-(((c - 0.6 * W) / 4) ** 2) - ((r - 0.45 * H) / 3) ** 2)
    return scale * (2.0 * body + 1.0 * bone * (body > 0))


def write_dicom(path, pixels, modality="XA", photometric="MONOCHROME2", **tags):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    for key, value in tags.items():
        if value is not None:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


XA_TAGS = dict(
    PixelIntensityRelationship="LIN",
    DistanceSourceToDetector=1000.0,
    DistanceSourceToPatient=750.0,
    ImagerPixelSpacing=[0.3, 0.25],
    PositionerPrimaryAngle=30.0,
    PositionerSecondaryAngle=-10.0,
)


def intensity_image(L, i0=60000.0):
    return np.round(i0 * np.exp(-L)).astype(np.uint16)


def xa_file(tmp_path, name="xa.dcm", **overrides):
    tags = {**XA_TAGS, **overrides}
    return write_dicom(tmp_path / name, intensity_image(line_integrals()), "XA", **tags)


# --------------------------------------------------------------------------------------------
# DICOM: intensity conversion
# --------------------------------------------------------------------------------------------
def test_xa_single_frame_intensity_and_intrinsics(tmp_path):
    L = line_integrals()
    x = read_xray_dicom(xa_file(tmp_path))
    assert isinstance(x, Xray) and x.image.shape == (1, 1, H, W) and x.image.dtype == torch.float32
    # quantisation of I = round(60000 exp(-L)) with L <= 3: |dL| <= 0.5 / 3000
    np.testing.assert_allclose(x.image[0, 0].numpy(), L, atol=3e-4)
    assert x.detector == Detector(1000.0, H, W, delx=0.25, dely=0.3, reverse_x_axis=True)
    assert x.positioner == (30.0, -10.0) and x.source_to_patient == 750.0
    meta = x.metadata
    assert meta["modality"] == "XA" and meta["photometric_interpretation"] == "MONOCHROME2"
    assert meta["intensity"]["mode"] == "log" and meta["intensity"]["higher_values_mean"] == "transmission"
    assert "(0028,1040)" in meta["intensity"]["mode_reason"]
    assert meta["intensity"]["per_frame"][0]["i0"] == 60000.0
    assert "(0018,1164)" in meta["pixel_spacing_source"] and meta["warnings"] == []
    assert x.valid_mask is None and x.source.endswith("xa.dcm")


def test_xa_auto_without_relationship_is_recorded(tmp_path):
    x = read_xray_dicom(xa_file(tmp_path, PixelIntensityRelationship=None))
    np.testing.assert_allclose(x.image[0, 0].numpy(), line_integrals(), atol=3e-4)
    assert x.metadata["intensity"]["mode"] == "log"
    assert any("assumed" in w and "(0028,1040)" in w for w in x.metadata["warnings"])
    # Forcing "linear" keeps the (intensity) values: L = v, no logarithm, direction still recorded.
    lin = read_xray_dicom(xa_file(tmp_path, PixelIntensityRelationship=None), intensity="linear")
    assert lin.metadata["intensity"]["mode"] == "linear"
    ref = lin.metadata["intensity"]["per_frame"][0]["reference"]
    np.testing.assert_allclose(lin.image[0, 0].numpy(), ref - intensity_image(line_integrals()), rtol=1e-6)


def test_rf_multiframe_max_sum_index(tmp_path):
    Ls = np.stack([line_integrals(shift=s, scale=k) for s, k in [(-4, 1.0), (0, 0.6), (5, 0.9)]])
    i0s = [60000.0, 35000.0, 48000.0]  # per-frame exposure: each frame gets its own I0
    pixels = np.stack([intensity_image(L, i0) for L, i0 in zip(Ls, i0s)])
    path = write_dicom(tmp_path / "rf.dcm", pixels, "RF", **XA_TAGS)
    tol = 0.5 / (35000 * math.exp(-3)) + 1e-5
    x = read_xray_dicom(path, frames="max")
    np.testing.assert_allclose(x.image[0, 0].numpy(), Ls.max(0), atol=tol)
    assert x.metadata["frames"] == 3 and x.metadata["frame_reduction"] == "max"
    assert [f["i0"] for f in x.metadata["intensity"]["per_frame"]] == i0s
    x = read_xray_dicom(path, frames="sum")
    np.testing.assert_allclose(x.image[0, 0].numpy(), Ls.sum(0), atol=3 * tol)
    x = read_xray_dicom(path, frames=1)
    np.testing.assert_allclose(x.image[0, 0].numpy(), Ls[1], atol=tol)
    assert not np.allclose(Ls.max(0), Ls.sum(0))  # the three answers differ
    with pytest.raises(XrayError, match=r"frames=3.*NumberOfFrames \(0028,0008\)"):
        read_xray_dicom(path, frames=3)
    with pytest.raises(XrayError, match="frames="):
        read_xray_dicom(path, frames="mean")


def test_dx_log_values_with_sign_and_rescale(tmp_path):
    L = line_integrals()
    stored = np.round(1000 * L + 100).astype(np.uint16)  # higher = more attenuation, LOG
    path = write_dicom(
        tmp_path / "dx.dcm", stored, "DX",
        PixelIntensityRelationship="LOG", PixelIntensityRelationshipSign=-1,
        RescaleSlope=0.001, RescaleIntercept=-0.1,
        DistanceSourceToDetector=1100.0, ImagerPixelSpacing=[0.15, 0.15], PixelSpacing=[0.1, 0.1],
    )
    x = read_xray_dicom(path)
    np.testing.assert_allclose(x.image[0, 0].numpy(), L, atol=6e-4)
    meta = x.metadata
    assert meta["intensity"]["mode"] == "linear" and meta["intensity"]["higher_values_mean"] == "attenuation"
    assert "(0028,1041)" in meta["intensity"]["direction_reason"] and "RescaleSlope" in meta["modality_lut"]
    assert (x.detector.delx, x.detector.dely, x.detector.sdd) == (0.15, 0.15, 1100.0)
    assert any("(0028,0030)" in w and "differs" in w for w in meta["warnings"])


def test_cr_monochrome1(tmp_path):
    # CR stores log exposure: high values = much exposure = shown dark under MONOCHROME1 = low
    # attenuation. Stored v = 1000 (4 - L), Modality LUT slope 1/1000.
    L = line_integrals()
    stored = np.round(1000 * (4 - L)).astype(np.uint16)
    tags = dict(RescaleSlope=0.001, RescaleIntercept=0.0, DistanceSourceToDetector=1000.0, PixelSpacing=[0.2, 0.2])
    x = read_xray_dicom(write_dicom(tmp_path / "cr1.dcm", stored, "CR", "MONOCHROME1", **tags))
    np.testing.assert_allclose(x.image[0, 0].numpy(), L, atol=6e-4)
    it = x.metadata["intensity"]
    assert it["mode"] == "linear" and it["higher_values_mean"] == "transmission"
    assert "MONOCHROME1" in it["direction_reason"]
    assert any("(0028,0030)" in w and "pixel_spacing=" in w for w in x.metadata["warnings"])
    # The same values declared MONOCHROME2 (shown bone white) mean attenuation: kept as they are.
    x2 = read_xray_dicom(write_dicom(tmp_path / "cr2.dcm", stored, "CR", "MONOCHROME2", **tags))
    np.testing.assert_allclose(x2.image[0, 0].numpy(), 4 - L, atol=6e-4)
    assert x2.metadata["intensity"]["higher_values_mean"] == "attenuation"
    # MONOCHROME1 CR storing linear intensity (LIN): -log(I / I0).
    path = write_dicom(
        tmp_path / "cr3.dcm", intensity_image(L), "CR", "MONOCHROME1",
        PixelIntensityRelationship="LIN", DistanceSourceToDetector=1000.0, ImagerPixelSpacing=[0.2, 0.2],
    )
    np.testing.assert_allclose(read_xray_dicom(path).image[0, 0].numpy(), L, atol=3e-4)
    # Overriding the direction to attenuation inverts through the representable range.
    inv = (65535 - intensity_image(L)).astype(np.uint16)
    path = write_dicom(
        tmp_path / "cr4.dcm", inv, "CR", "MONOCHROME2",
        PixelIntensityRelationship="LIN", DistanceSourceToDetector=1000.0, ImagerPixelSpacing=[0.2, 0.2],
    )
    x4 = read_xray_dicom(path)
    assert x4.metadata["intensity"]["higher_values_mean"] == "attenuation"
    np.testing.assert_allclose(x4.image[0, 0].numpy(), L, atol=3e-4)


def test_shutter_mask_and_i0_from_valid_region(tmp_path):
    L = line_integrals()
    pixels = intensity_image(L)
    pixels[:, :6] = 65535  # saturated outside the collimator: would bias a global I0
    pixels[:, -4:] = 65535
    path = write_dicom(
        tmp_path / "shut.dcm", pixels, "XA", **XA_TAGS, ShutterShape="RECTANGULAR",
        ShutterLeftVerticalEdge=7, ShutterRightVerticalEdge=W - 4,
        ShutterUpperHorizontalEdge=1, ShutterLowerHorizontalEdge=H,
    )
    x = read_xray_dicom(path)
    expected = np.zeros((H, W), bool)
    expected[:, 6 : W - 4] = True
    assert torch.equal(x.valid_mask[0, 0], torch.from_numpy(expected))
    np.testing.assert_allclose(x.image[0, 0].numpy()[expected], L[expected], atol=3e-4)
    assert x.metadata["shutters"] == ["shutter rectangular"]


# --------------------------------------------------------------------------------------------
# DICOM: intrinsics and errors
# --------------------------------------------------------------------------------------------
def test_pixel_spacing_at_the_patient_is_brought_to_the_detector(tmp_path):
    base = dict(XA_TAGS, ImagerPixelSpacing=None, PixelSpacing=[0.2, 0.2])
    x = read_xray_dicom(xa_file(tmp_path, **base, EstimatedRadiographicMagnificationFactor=1.5))
    assert x.detector.delx == pytest.approx(0.3) and x.detector.dely == pytest.approx(0.3)
    assert "(0018,1114)" in x.metadata["pixel_spacing_source"]
    x = read_xray_dicom(xa_file(tmp_path, **base, PixelSpacingCalibrationType="GEOMETRY"))
    assert x.detector.delx == pytest.approx(0.2 * 1000 / 750)
    with pytest.raises(XrayError, match=r"DistanceSourceToPatient \(0018,1111\).*pixel_spacing="):
        no_spd = dict(base, DistanceSourceToPatient=None)
        read_xray_dicom(xa_file(tmp_path, **no_spd, PixelSpacingCalibrationType="GEOMETRY"))
    x = read_xray_dicom(xa_file(tmp_path, **base))  # no hint: used as is, but said so
    assert x.detector.delx == pytest.approx(0.2)
    assert any("PixelSpacing (0028,0030)" in w for w in x.metadata["warnings"])


def test_missing_or_bad_tags_name_tag_and_option(tmp_path):
    path = xa_file(tmp_path, "nospacing.dcm", ImagerPixelSpacing=None)
    with pytest.raises(XrayError) as err:
        read_xray_dicom(path)
    msg = str(err.value)
    assert "nospacing.dcm" in msg and "ImagerPixelSpacing (0018,1164)" in msg
    assert "PixelSpacing (0028,0030)" in msg and "pixel_spacing=" in msg
    with pytest.raises(XrayError, match=r"zero.dcm.*ImagerPixelSpacing \(0018,1164\).*pixel_spacing="):
        read_xray_dicom(xa_file(tmp_path, "zero.dcm", ImagerPixelSpacing=[0.0, 0.0]))
    with pytest.raises(XrayError, match=r"nosdd.dcm.*DistanceSourceToDetector \(0018,1110\).*sdd="):
        read_xray_dicom(xa_file(tmp_path, "nosdd.dcm", DistanceSourceToDetector=None))
    with pytest.raises(XrayError, match=r"DistanceSourceToDetector \(0018,1110\).*sdd="):
        read_xray_dicom(xa_file(tmp_path, "metres.dcm", DistanceSourceToDetector=1.02))
    with pytest.raises(XrayError, match=r"option sdd=.*sdd="):
        read_xray_dicom(xa_file(tmp_path), sdd=-5.0)
    with pytest.raises(XrayError, match=r"Modality \(0008,0060\)"):
        read_xray_dicom(write_dicom(tmp_path / "ct.dcm", np.zeros((4, 4)), "CT", **XA_TAGS))
    with pytest.raises(XrayError, match="not a readable DICOM"):
        (tmp_path / "junk.dcm").write_bytes(b"not dicom")
        read_xray_dicom(tmp_path / "junk.dcm")
    with pytest.raises(XrayError, match="no such file"):
        read_xray_dicom(tmp_path / "absent.dcm")


def test_options_override_tags(tmp_path):
    path = xa_file(tmp_path, ImagerPixelSpacing=None, DistanceSourceToDetector=None)
    x = read_xray_dicom(path, sdd=1200.0, pixel_spacing=(0.4, 0.5), reverse_x_axis=False)
    assert x.detector == Detector(1200.0, H, W, delx=0.5, dely=0.4, reverse_x_axis=False)
    assert x.metadata["sdd_source"] == "option sdd=" and x.metadata["pixel_spacing_source"] == "option pixel_spacing="
    x = read_xray_dicom(xa_file(tmp_path), sdd=900.0, pixel_spacing=0.2, i0=30000.0)
    assert (x.detector.sdd, x.detector.delx, x.detector.dely) == (900.0, 0.2, 0.2)
    L = line_integrals()
    # I0 = 30000 < the air level: ratios above 1 clamp to L = 0.
    np.testing.assert_allclose(x.image[0, 0].numpy(), np.clip(L - math.log(2), 0, None), atol=3e-4)


@pytest.mark.parametrize("reverse", [True, False])
def test_crop_keeps_geometry(tmp_path, reverse):
    path = xa_file(tmp_path)
    full = read_xray_dicom(path, i0=60000.0, reverse_x_axis=reverse)
    c = 5
    cropped = read_xray_dicom(path, i0=60000.0, reverse_x_axis=reverse, crop=c)
    assert cropped.detector.shape == (H - 2 * c, W - 2 * c)
    torch.testing.assert_close(cropped.image, full.image[..., c:-c, c:-c])
    # A world point lands on the same physical pixel: uv shifts by exactly the crop.
    T = g.carm_pose(torch.tensor([[20.0, -5.0, 3.0]]), torch.tensor([[4.0, 750.0, -6.0]]), degrees=True).double()
    X = torch.randn(1, 20, 3, dtype=torch.float64) * 20
    uv_full = full.detector.project(T, X)
    uv_crop = cropped.detector.project(T, X)
    torch.testing.assert_close(uv_crop, uv_full - c)
    # An asymmetric crop moves the principal point as well.
    det = crop_detector(full.detector, 1, 3, 2, 7)
    torch.testing.assert_close(det.project(T, X), uv_full - torch.tensor([2.0, 1.0], dtype=torch.float64))
    with pytest.raises(XrayError, match="crop="):
        read_xray_dicom(path, crop=H // 2)


def test_positioner_prior(tmp_path):
    x = read_xray_dicom(xa_file(tmp_path))
    angles, xyz = positioner_prior(x)
    torch.testing.assert_close(angles, torch.tensor([[30.0, -10.0, 0.0]]))
    torch.testing.assert_close(xyz, torch.tensor([[0.0, 750.0, 0.0]]))
    T = g.carm_pose(angles, xyz, degrees=True)
    assert torch.linalg.norm(T[0, :3, 3]).item() == pytest.approx(750.0, rel=1e-6)  # source 750 mm from the isocenter
    _, xyz = positioner_prior(x, isocenter_distance=800.0)
    assert xyz[0, 1].item() == 800.0
    pa_det = Detector(1000.0, H, W, 0.25, 0.3, orientation="PA")
    pa = Xray(x.image, pa_det, positioner=(0.0, 0.0), source_to_patient=700.0)
    assert positioner_prior(pa)[1][0, 1].item() == -700.0
    bare = read_xray_dicom(xa_file(tmp_path, "bare.dcm", PositionerPrimaryAngle=None, DistanceSourceToPatient=None))
    with pytest.raises(XrayError, match=r"PositionerPrimaryAngle \(0018,1510\)"):
        positioner_prior(bare)
    no_d = read_xray_dicom(xa_file(tmp_path, "nod.dcm", DistanceSourceToPatient=None))
    with pytest.raises(XrayError, match=r"DistanceSourceToPatient \(0018,1111\).*isocenter_distance="):
        positioner_prior(no_d)


# --------------------------------------------------------------------------------------------
# Plain images
# --------------------------------------------------------------------------------------------
def test_read_xray_image_png16_tiff_npy(tmp_path):
    from PIL import Image

    L = line_integrals()
    intensity = intensity_image(L)
    Image.fromarray(intensity).save(tmp_path / "x.png")
    assert Image.open(tmp_path / "x.png").mode.startswith("I")  # really 16-bit
    x = read_xray_image(tmp_path / "x.png", sdd=1000.0, pixel_spacing=0.3)
    np.testing.assert_allclose(x.image[0, 0].numpy(), L, atol=3e-4)
    assert x.detector == Detector(1000.0, H, W, 0.3, 0.3)
    Image.fromarray(intensity).save(tmp_path / "x.tif")
    x = read_xray_image(tmp_path / "x.tif", sdd=1000.0, pixel_spacing=(0.3, 0.2), crop=2)
    np.testing.assert_allclose(x.image[0, 0].numpy(), L[2:-2, 2:-2], atol=3e-4)
    assert x.detector == Detector(1000.0, H - 4, W - 4, delx=0.2, dely=0.3)
    np.save(tmp_path / "x.npy", L.astype(np.float32))
    x = read_xray_image(
        tmp_path / "x.npy", sdd=1000.0, pixel_spacing=0.3, intensity="linear", x0=1.5, reverse_x_axis=False
    )
    np.testing.assert_array_equal(x.image[0, 0].numpy(), L.astype(np.float32))
    assert x.detector.x0 == 1.5 and not x.detector.reverse_x_axis
    x = read_xray_image(torch.from_numpy(intensity.astype(np.float32))[None, None], sdd=1000.0, pixel_spacing=0.3)
    assert x.source == "<array>" and x.image.shape == (1, 1, H, W)
    with pytest.raises(XrayError, match="pixel_spacing="):
        read_xray_image(tmp_path / "x.npy", sdd=1000.0, pixel_spacing=0.0)
    with pytest.raises(XrayError, match="sdd="):
        read_xray_image(tmp_path / "x.npy", sdd=1.0, pixel_spacing=0.3)
    rgb = np.stack([intensity // 256, intensity // 256 // 2, intensity // 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(XrayError, match="colour"):
        read_xray_image(tmp_path / "rgb.png", sdd=1000.0, pixel_spacing=0.3)
    with pytest.raises(XrayError, match="unsupported"):
        read_xray_image(tmp_path / "x.jpg2", sdd=1000.0, pixel_spacing=0.3)


def test_clipped_mask_leaves_out_constant_shutters_and_saturation():
    rng = np.random.default_rng(0)
    counts = rng.uniform(1000.0, 40000.0, size=(40, 50))  # a noisy exposure repeats no extreme
    assert clipped_mask(counts) is None
    shuttered = counts.copy()
    shuttered[:, :6] = 50000.0  # a shutter delivered at one (bright) value
    shuttered[30:, 20:25] = 0.0  # and a dark constant block
    valid = clipped_mask(shuttered)
    assert not valid[:, :6].any() and not valid[30:, 20:25].any()
    assert valid[:30, 6:].all() and valid[:, 25:].all()
    assert clipped_mask(shuttered, min_fraction=0.2) is None, "rarer extremes are kept"

    x = read_xray_image(shuttered, sdd=1000.0, pixel_spacing=1.0, mask_clipped=True)
    assert torch.equal(x.valid_mask[0, 0], torch.from_numpy(valid))
    assert x.metadata["intensity"]["i0"] == 50000.0, "I0 is taken before the clipped pixels are left out"
    assert x.metadata["intensity"]["clipped_fraction"] == pytest.approx(1 - valid.mean())
    plain = read_xray_image(shuttered, sdd=1000.0, pixel_spacing=1.0)
    assert plain.valid_mask is None and torch.equal(plain.image, x.image), "only the mask changes"
    with pytest.raises(XrayError, match="clipped"):
        read_xray_image(np.full((8, 8), 7.0), sdd=1000.0, pixel_spacing=1.0, mask_clipped=True)


def test_display_helpers_still_work(tmp_path):
    img = torch.from_numpy(line_integrals())
    u8 = to_uint8(img)
    assert u8.dtype == np.uint8 and u8.max() == 255 and u8.min() == 0
    save_png(tmp_path / "d.png", img)
    assert (tmp_path / "d.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# Eq. 26 resampling
# --------------------------------------------------------------------------------------------
def smooth(u, v):
    """A smooth analytic image in continuous pixel coordinates."""
    return torch.sin(u / 6.0) + 0.5 * torch.cos(v / 5.0 + 0.3) + 0.02 * u


def sample(det: Detector, fn=smooth, dtype=torch.float64):
    v, u = torch.meshgrid(
        torch.arange(det.height, dtype=dtype) + 0.5, torch.arange(det.width, dtype=dtype) + 0.5, indexing="ij"
    )
    return fn(u, v)[None, None]


@pytest.mark.parametrize("antialias", [False, True])
def test_resample_double_spacing_is_2x2_average(antialias):
    src = Detector(1000.0, 32, 48, 0.5, 0.5, x0=1.0, y0=-2.0)
    tgt = Detector(1000.0, 16, 24, 1.0, 1.0, x0=1.0, y0=-2.0)
    img = sample(src)
    out, valid = resample_to_intrinsics(img, src, tgt, antialias=antialias)
    torch.testing.assert_close(out, F.avg_pool2d(img, 2), atol=1e-6, rtol=0)
    assert valid.all() and valid.shape == (1, 1, 16, 24)


@pytest.mark.parametrize("reverse", [True, False])
def test_resample_principal_point_shift_is_a_roll(reverse):
    src = Detector(1000.0, 20, 30, 0.4, 0.6, x0=0.8, y0=0.3, reverse_x_axis=reverse)
    dx, dy = 3, 2
    sx = 1 if reverse else -1  # K[0, 2] = W/2 + sx x0 / delx
    tgt = Detector(1000.0, 20, 30, 0.4, 0.6, x0=0.8 + sx * dx * 0.4, y0=0.3 + dy * 0.6, reverse_x_axis=reverse)
    img = torch.rand(2, 3, 20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, valid = resample_to_intrinsics(img, src, tgt)
    rolled = torch.roll(img, shifts=(dy, dx), dims=(-2, -1))
    torch.testing.assert_close(out[..., dy:, dx:], rolled[..., dy:, dx:], atol=1e-9, rtol=0)
    expected = torch.zeros(20, 30, dtype=torch.bool)
    expected[dy:, dx:] = True
    assert valid.shape == (2, 1, 20, 30) and torch.equal(valid[0, 0], expected)
    assert out[..., :dy, :].abs().max() < 1.0 + 1e-9  # partly or wholly outside: zeros blended in


def test_resample_sdd_scales_about_principal_point():
    src = Detector(800.0, 40, 50, 0.5, 0.5, x0=2.0, y0=-1.5)
    tgt = Detector(1600.0, 40, 50, 0.5, 0.5, x0=2.0, y0=-1.5)
    K_s, K_t = src.intrinsic_matrix(), tgt.intrinsic_matrix()
    img = sample(src)
    out, valid = resample_to_intrinsics(img, src, tgt)
    # Magnified x2 about the principal point: u_s = c_s + (u_t - c_t) / 2.
    expected = sample(tgt, lambda u, v: smooth(K_s[0, 2] + (u - K_t[0, 2]) / 2, K_s[1, 2] + (v - K_t[1, 2]) / 2))
    assert valid.all()
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=0)
    # The principal point itself is a fixed point of the map.
    H_ = intrinsics_homography(src, tgt)
    c = H_ @ torch.tensor([K_s[0, 2], K_s[1, 2], 1.0], dtype=torch.float64)
    torch.testing.assert_close(c[:2] / c[2], K_t[:2, 2])


@pytest.mark.parametrize(
    "src, tgt",
    [
        (Detector(1000.0, 30, 40, 0.5, 0.4, 1.0, -2.0, True), Detector(1200.0, 26, 34, 0.55, 0.5, -3.0, 1.0, True)),
        (Detector(1000.0, 30, 40, 0.5, 0.4, 1.0, -2.0, True), Detector(900.0, 24, 28, 0.6, 0.45, 2.0, 0.5, False)),
        (Detector(950.0, 30, 40, 0.5, 0.4, -1.0, 2.0, False), Detector(1100.0, 28, 36, 0.5, 0.5, 1.0, 0.0, False)),
    ],
)
def test_resample_matches_projection_geometry(src, tgt):
    """Independent of K algebra: target pixel -> detector point (unproject) -> source pixel (project)."""
    T = g.carm_pose(torch.tensor([[15.0, 10.0, -5.0]]), torch.tensor([[3.0, 700.0, 8.0]]), degrees=True).double()
    v, u = torch.meshgrid(torch.arange(tgt.height) + 0.5, torch.arange(tgt.width) + 0.5, indexing="ij")
    uv_t = torch.stack([u, v], -1).reshape(1, -1, 2).double()
    uv_s = src.project(T, tgt.unproject(T, uv_t))[0]
    expected = smooth(uv_s[:, 0], uv_s[:, 1]).reshape(1, 1, tgt.height, tgt.width)
    out, valid = resample_to_intrinsics(sample(src), src, tgt, antialias=False)
    assert valid.float().mean() > 0.5
    inside = (uv_s[:, 0] > 0.5) & (uv_s[:, 0] < src.width - 0.5) & (uv_s[:, 1] > 0.5) & (uv_s[:, 1] < src.height - 0.5)
    assert torch.equal(valid.reshape(-1)[inside], torch.ones(int(inside.sum()), dtype=torch.bool))
    torch.testing.assert_close(out[valid], expected[valid], atol=8e-3, rtol=0)  # bilinear error <= |f''| / 8


def test_resample_round_trip():
    src = Detector(1000.0, 48, 64, 0.3, 0.3, x0=0.5, y0=-0.7)
    tgt = Detector(1150.0, 40, 52, 0.41, 0.37, x0=-1.2, y0=0.9)
    img = sample(src).float()
    mid, valid_mid = resample_to_intrinsics(img, src, tgt)
    back, valid_back = resample_to_intrinsics(mid, tgt, src, mask=valid_mid)
    assert 0.3 < valid_back.float().mean() < 1.0
    err = (back - img)[valid_back].abs().max()
    assert err < 0.02, err
    # Outside the mask the round trip is not meaningful (zeros blended in).
    assert (back - img)[~valid_back].abs().max() > 0.05


def test_resample_mirroring():
    src = Detector(1000.0, 20, 30, 0.4, 0.4, x0=1.2, y0=-0.8, reverse_x_axis=True)
    tgt = Detector(1000.0, 20, 30, 0.4, 0.4, x0=1.2, y0=-0.8, reverse_x_axis=False)
    img = torch.rand(1, 1, 20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, valid = resample_to_intrinsics(img, src, tgt)
    torch.testing.assert_close(out, img.flip(-1), atol=1e-9, rtol=0)
    assert valid.all()
    # The same rays: a world point lands in mirrored columns, u_t = W - u_s.
    T = g.carm_pose(torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[0.0, 800.0, 0.0]]), degrees=True).double()
    X = torch.randn(1, 10, 3, dtype=torch.float64) * 10
    uv_s, uv_t = src.project(T, X), tgt.project(T, X)
    torch.testing.assert_close(uv_t[..., 0], 30 - uv_s[..., 0])
    torch.testing.assert_close(uv_t[..., 1], uv_s[..., 1])
    with pytest.raises(ValueError, match="orientation"):
        resample_to_intrinsics(img, src, Detector(1000.0, 20, 30, 0.4, 0.4, orientation="PA"))


def test_resample_antialias_and_mask():
    src = Detector(1000.0, 64, 64, 0.25, 0.25)
    tgt = Detector(1000.0, 16, 16, 1.0, 1.0)
    img = torch.rand(1, 1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # antialiased: the mean of each 4x4 block; point-sampled: only the 2x2 block centre.
    out, _ = resample_to_intrinsics(img, src, tgt, antialias=True)
    torch.testing.assert_close(out, F.avg_pool2d(img, 4), atol=1e-12, rtol=0)
    aliased, _ = resample_to_intrinsics(img, src, tgt, antialias=False)
    torch.testing.assert_close(aliased, F.avg_pool2d(img[..., 1:, 1:], 2, stride=4), atol=1e-12, rtol=0)
    assert aliased.std() > 1.5 * out.std()  # white noise: less averaging, more (aliased) variance
    # A size that is not a multiple of the block: the last rows/columns are dropped, geometry kept.
    src2 = Detector(1000.0, 66, 67, 0.25, 0.25, x0=-0.25 * 1.5, y0=-0.25 * 1.0)  # same K[:, 2] as src
    assert crop_detector(src2, 0, 2, 0, 3) == src
    img2 = F.pad(img, (0, 3, 0, 2), value=100.0)  # the extra (right, bottom) pixels are never used
    out2, _ = resample_to_intrinsics(img2, src2, tgt, antialias=True)
    torch.testing.assert_close(out2, out, atol=1e-12, rtol=0)
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    mask[..., :8] = False
    _, valid = resample_to_intrinsics(img, src, tgt, mask=mask)
    assert not valid[..., :2].any() and valid[..., 3:].all()
