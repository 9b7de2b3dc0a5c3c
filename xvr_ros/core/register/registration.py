"""Intraoperative registration of one X-ray: initial pose (network, DICOM prior or given) + refinement.

The flow (method.md §4-5): resample the X-ray from its own intrinsics to the network's canonical
intrinsics with the homography of Eq. 26, predict a pose, then refine it by rendering at the
X-ray's *original* intrinsics. Poses are (B, 4, 4) camera-to-world in mm.

A network's worst initial poses (tens of degrees off on views it knows little about) lie outside
the refinement's capture range. When the refinement of the initial pose ends below
``MULTISTART_BELOW`` similarity, :func:`register` runs a short **multi-start** on the two
coarsest scales: the initial pose plus the C-arm turned by ±15° (LAO/RAO) and ±10° (CRA/CAU)
about the isocenter, all refined at once, refines the candidate with the best similarity and
keeps whichever of the two results scores higher. A start inside the capture range (the usual
case) thus costs one refinement, not a batch of nine on top of it.

Only pixels that show anatomy are scored: :func:`register` detects the field of view
(:func:`~xvr_ros.core.register.fov.detect_field_of_view`: collimator blades, an image
intensifier's circle, clipped values, burned-in text), merges it with the X-ray's own validity
mask (DICOM shutters), and keeps a margin of ``fov_margin_mm`` from its edges, whose penumbra is
not in the CT either. Metal (wires, screws: narrow peaks of attenuation that the CT does not
hold, :func:`~xvr_ros.core.register.fov.detect_outliers`) is left out of the similarity too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.io.xray_dicom import positioner_prior
from xvr_ros.core.model.checkpoint import Checkpoint
from xvr_ros.core.model.inference import predict_initial_pose
from xvr_ros.core.register import fov as fov_detection
from xvr_ros.core.register.fov import detect_outliers, erode
from xvr_ros.core.register.refine import COARSE_SIMILARITY, RefineResult, auto_scales, refine
from xvr_ros.core.render.renderer import Renderer


def initial_pose_from_positioner(xray: Xray) -> torch.Tensor:
    """A weak (1, 4, 4) prior from the DICOM positioner angles and source-to-patient distance."""
    angles, xyz = positioner_prior(xray)
    return carm_pose(angles, xyz, degrees=True)


#: C-arm angle offsets (alpha, beta, gamma; degrees) tried around the initial pose.
MULTISTART_OFFSETS: tuple[tuple[float, float, float], ...] = tuple(
    (a, b, 0.0) for a in (-15.0, 0.0, 15.0) for b in (-10.0, 0.0, 10.0)
)


def multistart(
    renderer: Renderer, image: torch.Tensor, detector: Detector, init_pose: torch.Tensor, *,
    mask: torch.Tensor | None = None, scales=None, offsets=MULTISTART_OFFSETS, max_iterations: int = 200,
    time_budget: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of ``init_pose`` (1, 4, 4) turned by each of ``offsets`` after a short refinement
    on the two coarsest of ``scales`` -> ((1, 4, 4) pose, (K,) similarity of every candidate)."""
    angles, xyz = carm_parameters(init_pose.reshape(1, 4, 4).double())
    offs = torch.tensor(offsets, dtype=torch.float64)
    candidates = carm_pose(torch.rad2deg(angles) + offs, xyz.expand(len(offs), 3), degrees=True)
    return best_start(renderer, image, detector, candidates.to(init_pose.dtype), mask=mask, scales=scales,
                      max_iterations=max_iterations, time_budget=time_budget)


def best_start(
    renderer: Renderer, image: torch.Tensor, detector: Detector, candidates: torch.Tensor, *,
    mask: torch.Tensor | None = None, scales=None, max_iterations: int = 200, time_budget: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of the (K, 4, 4) ``candidates`` after a short refinement on the two coarsest of
    ``scales`` -> ((1, 4, 4) refined pose, (K,) similarity of every candidate)."""
    scales = tuple(auto_scales(detector) if scales in (None, "auto") else scales)
    # The coarse scales' similarity throughout: the candidates are compared far from any optimum.
    result = refine(renderer, image, detector, candidates, mask=mask, scales=scales[:2],
                    similarity=COARSE_SIMILARITY, max_plateaus=1, max_iterations=max_iterations,
                    time_budget=time_budget)
    similarity = torch.nan_to_num(result.similarity.detach().float().cpu(), nan=-math.inf)
    best = int(similarity.argmax())
    return result.pose[best : best + 1].to(candidates.dtype), similarity


@dataclass
class Registration:
    """The outcome of :func:`register` for one X-ray."""

    initial_pose: torch.Tensor  # (1, 4, 4) mm
    refinement: RefineResult
    initial_source: str  # "network", "positioner" or "given"
    seconds: float  # total, prediction included
    field_of_view: torch.Tensor | None = None  # (1, 1, H, W) bool, anatomy shown (before the margin and metal)
    mask: torch.Tensor | None = None  # (1, 1, H, W) bool, the pixels the refinement scored (None = all)
    multistart_similarity: torch.Tensor | None = None  # (K,) the multi-start candidates' similarities, if it ran
    # A tracked frame's: the Hessian its Newton steps used (uncertainty.PoseUncertainty), which
    # its assessment carries to the refined pose instead of computing another.
    uncertainty: Any = None

    @property
    def pose(self) -> torch.Tensor:
        return self.refinement.pose


def register(
    renderer: Renderer,
    xray: Xray,
    *,
    checkpoint: Checkpoint | None = None,
    init_pose: torch.Tensor | None = None,
    multistart_offsets=MULTISTART_OFFSETS,
    multistart_below: float | None = None,
    good_enough: Callable[[Registration], bool] | None = None,
    other_starts: torch.Tensor | None = None,
    detect_fov: bool = True,
    fov_margin_mm: float = 3.0,
    mask_outliers: bool = True,
    **refine_options,
) -> Registration:
    """Register one X-ray: initial pose from ``init_pose``, else the network, else the DICOM prior.

    ``multistart_offsets``: the :func:`multistart` candidates (``()`` = refine the initial pose
    only), tried when the initial pose's refinement ends below ``multistart_below`` similarity
    (None = ``MULTISTART_BELOW``; above 1 = always) and ``good_enough`` (e.g. the quality gate),
    given the initial pose's registration, does not return True: on noisy images (256 px
    fluoroscopy) refinements in the capture range end below ``MULTISTART_BELOW`` too, and a
    multi-start that lands where the first refinement did doubles the time. ``detect_fov``:
    score only the detected field of view (see the module docstring), kept ``fov_margin_mm`` (at
    the detector) inside its edges; else only the X-ray's own validity mask.
    ``mask_outliers``: leave metal (narrow attenuation peaks up to ``OUTLIER_WIDTH_MM``) out.
    ``other_starts``: (K, 4, 4) further starting poses (e.g. the last accepted pose of a
    fluoroscopy run, when the network's estimate may be tens of mm off): the best of them and the
    initial pose after a short coarse refinement (:func:`best_start`) is refined.
    ``refine_options`` go to :func:`refine.refine` (e.g. ``time_budget``, ``scales``). Raises
    ValueError only for invalid input.
    """
    t0 = time.perf_counter()
    fov = field_of_view(xray) if detect_fov else xray.valid_mask
    if init_pose is not None:
        source, pose = "given", init_pose
    elif checkpoint is not None:
        source, pose = "network", predict_initial_pose(checkpoint, xray.image, xray.detector, mask=fov)
    elif xray.positioner is not None:
        source, pose = "positioner", initial_pose_from_positioner(xray)
    else:
        raise ValueError("no initial pose: give init_pose, a network checkpoint, or an X-ray with positioner angles")
    pose = pose.to(device=renderer.device, dtype=torch.float32).reshape(-1, 4, 4)
    image = xray.image.to(device=renderer.device, dtype=torch.float32)
    mask = scored_pixels(xray, fov, fov_margin_mm if detect_fov else 0.0, mask_outliers)
    mask = None if mask is None else mask.to(renderer.device)
    budget = refine_options.get("time_budget")

    def time_left() -> float | None:
        return None if budget is None else budget - (time.perf_counter() - t0)

    def with_budget(seconds: float | None) -> dict:
        return refine_options if seconds is None else {**refine_options, "time_budget": max(seconds, 0.0)}

    origin = pose  # where the registration started, as the quality features take it
    if other_starts is not None and len(other_starts) and len(pose) == 1:
        starts = torch.cat([pose, other_starts.to(pose).reshape(-1, 4, 4)])
        pose, _ = best_start(renderer, image, xray.detector, starts, mask=mask, scales=refine_options.get("scales"),
                             time_budget=None if time_left() is None else time_left() / 4)

    # The initial pose gets the whole budget: a start inside the capture range (the usual case)
    # is never cut short to keep time for the multi-start, which only runs with time left.
    result = refine(renderer, image, xray.detector, pose, mask=mask, **with_budget(time_left()))
    may_restart = bool(multistart_offsets) and refine_options.get("max_iterations", 1) > 0 and len(pose) == 1
    below = MULTISTART_BELOW if multistart_below is None else multistart_below
    left = time_left()
    candidates = None
    first = Registration(origin, result, source, time.perf_counter() - t0, fov, mask)
    if may_restart and (left is None or left > 0) and _needs_multistart(first, below, good_enough):
        start, candidates = multistart(renderer, image, xray.detector, pose, mask=mask, offsets=multistart_offsets,
                                       scales=refine_options.get("scales"),
                                       time_budget=None if left is None else left / 2)
        second = refine(renderer, image, xray.detector, start, mask=mask, **with_budget(time_left()))
        result = second if _similarity(second) > _similarity(result) else result
    return Registration(origin, result, source, time.perf_counter() - t0, fov, mask, candidates)


def coarse_scales(detector: Detector, scales=None) -> tuple[float, ...]:
    """``scales`` (None or ``"auto"``: :func:`~.refine.auto_scales`) but the finest, when there are
    two or more: a registration whose result tracking finishes at its own level (``tracking.finish``)
    stops there, which saves the finest scale's renders (half of a cold start's refinement)."""
    scales = tuple(auto_scales(detector) if scales in (None, "auto") else scales)
    return scales[:-1] if len(scales) > 1 else scales


#: A refinement that ends below this similarity (mNCC + gradNCC at the finest scale) is taken for
#: a start outside the capture range and triggers the multi-start.
MULTISTART_BELOW = 0.98


def _needs_multistart(first: Registration, below: float, good_enough) -> bool:
    """The initial pose's registration ends below ``below`` similarity and ``good_enough`` (if
    given) does not vouch for it."""
    return _similarity(first.refinement) < below and not (good_enough is not None and good_enough(first))


def _similarity(result: RefineResult) -> float:
    """A single item's final similarity; -inf when it could not be evaluated."""
    return float(torch.nan_to_num(result.similarity.detach().double().cpu(), nan=-math.inf).max())


#: Widest object (mm at the detector) :func:`scored_pixels` takes for metal: screws, wires.
OUTLIER_WIDTH_MM = 6.0


def scored_pixels(xray: Xray, fov: torch.Tensor | None, margin_mm: float, mask_outliers: bool) -> torch.Tensor | None:
    """The (1, 1, H, W) bool mask the similarity scores: ``fov`` shrunk by ``margin_mm``, without
    metal when ``mask_outliers``; None when every pixel counts. Never empty: a step that would
    leave nothing is skipped."""
    spacing = min(xray.detector.delx, xray.detector.dely)
    mask = np.ones(xray.detector.shape, dtype=bool) if fov is None else fov[0, 0].cpu().numpy()
    shrunk = erode(mask, round(margin_mm / spacing))
    mask = shrunk if shrunk.any() else mask
    if mask_outliers:
        clean = mask & ~detect_outliers(xray.image[0, 0].cpu(), mask, width_px=OUTLIER_WIDTH_MM / spacing)
        mask = clean if clean.any() else mask
    return None if mask.all() else torch.from_numpy(np.ascontiguousarray(mask))[None, None]


def field_of_view(xray: Xray) -> torch.Tensor | None:
    """The pixels of ``xray`` that show anatomy, (1, 1, H, W) bool, merged with its validity mask;
    the validity mask alone when the detection keeps almost nothing."""
    valid = None if xray.valid_mask is None else xray.valid_mask[0, 0].cpu().numpy()
    detected = fov_detection.field_of_view(xray.image[0, 0].cpu(), valid)
    if detected is None:
        return xray.valid_mask
    return torch.from_numpy(np.ascontiguousarray(detected))[None, None]
