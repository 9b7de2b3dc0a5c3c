"""Differentiable DRR rendering (method.md §2): a volume + poses + a detector -> X-ray images.

Each pixel's value is the log-transformed Beer-Lambert line integral from the source to the
pixel centre, ``I = ||p - s|| * integral_0^1 V(s + a (p - s)) da`` (Eq. 12), in (attenuation x mm).
Two integrators share one contract (``trilinear.py`` and ``siddon.py``: compiled kernels on the
CPU, pure torch elsewhere):

- ``"trilinear"`` (Eq. 14): midpoint samples every ``step`` mm along each ray, clipped to the
  volume, trilinear interpolation. Differentiable and fast; the default for training and
  refinement. The volume is averaged down to a resolution matched to the detector's pixel
  footprint at the isocenter (``resolution="auto"``): a 128x128 DRR of a 0.7 mm CT only needs
  ~1.7 mm voxels, and sampling the full-resolution CT would cost several times more for the same image.
- ``"siddon"`` (Eq. 13): the exact integral of the nearest-neighbour volume at full resolution;
  the reference and the renderer for simulated target X-rays.

Poses are ``(B, 4, 4)`` camera-to-world in mm (``geometry.py``); images are ``(B, C, H, W)`` with
one channel, or one channel per selected label when ``label_channels`` is set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from xvr_ros.core.geometry import Detector, transform_points
from xvr_ros.core.intrinsics import crop_detector
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render import siddon, trilinear

METHODS = ("trilinear", "siddon")


@dataclass
class _Level:
    """One pyramid level, prepared for the integrators."""

    data: torch.Tensor  # (D0, D1, D2, C) on the renderer's device, contiguous
    world_to_index: torch.Tensor  # (4, 4) world mm -> continuous voxel index
    spacing: tuple[float, float, float]  # mm


class Renderer(torch.nn.Module):
    """Renders DRRs of one volume.

    Args:
        volume: the CT/MR (``volume.Volume``), attenuation in 1/mm.
        labels: render only voxels whose label is in this list (structure-specific rendering).
        label_channels: render each label in ``labels`` to its own channel.
        method: ``"trilinear"`` or ``"siddon"``.
        step: trilinear sample spacing in mm; default ``step_ratio`` x the level's smallest voxel
            (finer steps buy nothing measurable on CT: the error against Siddon is the difference
            between the trilinear and nearest-neighbour interpolants, see ``make bench``).
        resolution: ``"auto"`` (match the detector's pixel footprint), ``"full"``, or a tuple of
            integer downsampling factors per volume axis.
        footprint_ratio: with ``"auto"``, voxels may grow up to this multiple of the pixel
            footprint at the isocenter (the error against Siddon is measured by ``make bench``).
        device, dtype: where and in what precision to render.
        backend: ``"auto"`` (the compiled kernel on the CPU when it is built, torch otherwise) or
            ``"torch"`` (always the pure-torch integrators, e.g. to compare).

    """

    def __init__(
        self,
        volume: Volume,
        *,
        labels: list[int] | None = None,
        label_channels: bool = False,
        method: str = "trilinear",
        step: float | None = None,
        step_ratio: float = 1.0,
        resolution: str | tuple[int, int, int] = "auto",
        footprint_ratio: float = 1.5,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if label_channels and not labels:
            raise ValueError("label_channels needs a list of labels to render")
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
        if step is not None and not step > 0:
            raise ValueError(f"step must be a positive length in mm, got {step}")
        self.method = method
        self.backend = backend
        self.step = step
        self.step_ratio = step_ratio
        self.resolution = resolution
        self.footprint_ratio = footprint_ratio
        self.device = torch.device(device)
        self.dtype = dtype
        self.labels = list(labels) if labels else None
        self.label_channels = label_channels

        if self.labels:
            mask = volume.label_mask(self.labels)
            volume = replace(volume, data=volume.data * mask)
        # Voxels that are exactly zero (air) contribute nothing: clip rays to the content's box.
        self.volume = volume.crop()
        self.isocenter = volume.isocenter.to(torch.float64)
        self._levels: dict[tuple[int, int, int], _Level] = {}

    def with_footprint_ratio(self, ratio: float) -> Renderer:
        """This renderer choosing its volume levels with another ``footprint_ratio`` (finer levels
        for a smaller one); it shares this one's volume and level cache."""
        if not ratio > 0:
            raise ValueError(f"footprint_ratio must be positive, got {ratio}")
        other = copy.copy(self)
        other.footprint_ratio = float(ratio)
        return other

    @property
    def channels(self) -> int:
        return len(self.labels) if self.label_channels else 1

    # ----------------------------------------------------------------------------------------
    def level_factors(self, detector: Detector, source: torch.Tensor) -> tuple[int, int, int]:
        """Per-axis integer downsampling factors for rendering ``detector`` from ``source`` (B, 3)."""
        if self.method == "siddon" or self.resolution == "full":
            return (1, 1, 1)
        if self.resolution != "auto":
            return tuple(int(f) for f in self.resolution)
        # Pixel footprint at the isocenter = pixel size / magnification; the nearest source
        # sees the finest footprint, so it sets the level for the whole batch.
        sid = (source.detach().to(torch.float64) - self.isocenter.to(source.device)).norm(dim=-1).min()
        footprint = footprint_mm(detector, float(sid))
        spacing = self.volume.spacing.tolist()
        return tuple(max(1, int(self.footprint_ratio * footprint / s)) for s in spacing)

    def build_levels(self, max_voxel_mm: float = 20.0) -> int:
        """Build every level the ``"auto"`` resolution can choose with voxels up to ``max_voxel_mm``
        (along the coarsest axis) now, instead of on first use -> how many were built.

        The levels form one family (factors ``int(c / spacing)`` for a footprint ``c``), ~30 for a
        CT; built on demand, ~0.1 s each, they made a process's first registrations seconds slower.
        """
        if self.method == "siddon" or self.resolution != "auto":
            return 0
        spacing = self.volume.spacing.tolist()
        # The factors change only where the footprint crosses a multiple of a voxel spacing.
        edges = sorted({k * s for s in spacing for k in range(1, int(max_voxel_mm / s) + 1)})
        built = 0
        for c in edges:
            factors = tuple(max(1, int(c * (1 + 1e-9) / s)) for s in spacing)
            if factors not in self._levels:
                self.level(factors)
                built += 1
        return built

    def level(self, factors: tuple[int, int, int]) -> _Level:
        if factors not in self._levels:
            vol = self.volume if factors == (1, 1, 1) else None
            if self.label_channels:
                chans = []
                for label in self.labels:
                    v = replace(self.volume, data=self.volume.data * (self.volume.labels == label))
                    chans.append(v if factors == (1, 1, 1) else v.downsample(factors))
                vol = chans[0]
                data = torch.stack([c.data for c in chans], dim=-1)
            else:
                vol = vol or self.volume.downsample(factors)
                data = vol.data[..., None]
            self._levels[factors] = _Level(
                data=data.to(self.device, self.dtype).contiguous(),
                world_to_index=torch.linalg.inv(vol.affine.to(torch.float64)).to(self.device, self.dtype),
                spacing=tuple(float(s) for s in vol.spacing),
            )
        return self._levels[factors]

    # ----------------------------------------------------------------------------------------
    def forward(self, pose: torch.Tensor, detector: Detector) -> torch.Tensor:
        """Render (B, 4, 4) camera-to-world poses (mm) -> (B, C, H, W) line integrals."""
        pose = pose.to(self.device, self.dtype)
        if pose.dim() == 2:
            pose = pose[None]
        if pose.shape[-2:] != (4, 4):
            raise ValueError(f"pose must be (B, 4, 4), got {tuple(pose.shape)}")
        source, target = detector.rays(pose)
        return self.render_rays(source, target, detector).reshape(
            len(pose), self.channels, detector.height, detector.width
        )

    def render_rays(self, source: torch.Tensor, target: torch.Tensor, detector: Detector | None = None):
        """Line integrals from source (B, 3) to targets (B, N, 3), world mm -> (B, C, N)."""
        level = self.level(self.level_factors(detector, source) if detector else (1, 1, 1))
        length = (target - source[:, None]).norm(dim=-1)
        src = transform_points(level.world_to_index[None], source[:, None])[:, 0]
        tgt = transform_points(level.world_to_index[None], target)
        torch_only = self.backend == "torch"
        if self.method == "siddon":
            fn = siddon.line_integrals_reference if torch_only else siddon.line_integrals
            J = fn(level.data, src, tgt)
        else:
            fn = trilinear.line_integrals_reference if torch_only else trilinear.line_integrals
            step = self.step or self.step_ratio * min(level.spacing)
            J = fn(level.data, src, tgt, level.spacing, step)
        return (J * length[..., None]).transpose(1, 2)


def render_scored(renderer, pose: torch.Tensor, detector: Detector, mask: torch.Tensor | None) -> torch.Tensor:
    """``renderer(pose, detector)`` (any renderer: a :class:`Renderer`, a test's stand-in) for only
    the bounding box of ``mask`` ((B or 1, 1, H, W), True = scored), zeros elsewhere: all that a
    similarity that never reads an unscored pixel needs (``core.register.similarity``). A tightly
    collimated fluoroscopy frame scores a third of its pixels. None = every pixel."""
    if mask is None:
        return renderer(pose, detector)
    scored = (mask.reshape(-1, *detector.shape) > 0).any(0)
    rows, cols = scored.any(-1), scored.any(-2)
    if not bool(rows.any()):
        return renderer(pose, detector)
    (top, bottom), (left, right) = _span(rows), _span(cols)
    if (top, left, bottom, right) == (0, 0, detector.height, detector.width):
        return renderer(pose, detector)
    window = crop_detector(detector, top, detector.height - bottom, left, detector.width - right)
    return F.pad(renderer(pose, window), (left, detector.width - right, top, detector.height - bottom))


def _span(any_along: torch.Tensor) -> tuple[int, int]:
    """First index and one past the last where the (N,) bool tensor is True."""
    idx = torch.nonzero(any_along).flatten()
    return int(idx[0]), int(idx[-1]) + 1


def relative_rms_error(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """RMS(image - reference) / RMS(reference) per batch item: (B, ...) -> (B,)."""
    diff = (image - reference).flatten(1).square().mean(-1).sqrt()
    return diff / reference.flatten(1).square().mean(-1).sqrt()


def footprint_mm(detector: Detector, source_to_isocenter: float) -> float:
    """Pixel size back-projected to the isocenter (mm)."""
    return min(detector.delx, detector.dely) * source_to_isocenter / detector.sdd

