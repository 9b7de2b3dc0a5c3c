"""Intraoperative registration of one X-ray: initial pose (network, DICOM prior or given) + refinement.

The flow (method.md §4-5): resample the X-ray from its own intrinsics to the network's canonical
intrinsics with the homography of Eq. 26, predict a pose, then refine it by rendering at the
X-ray's *original* intrinsics. Poses are (B, 4, 4) camera-to-world in mm.

A network's worst initial poses (tens of degrees off on views it knows little about) lie outside
the refinement's capture range, so :func:`register` first runs a short **multi-start** on the two
coarsest scales: the initial pose plus the C-arm turned by ±15° (LAO/RAO) and ±10° (CRA/CAU)
about the isocenter, all refined at once, and continues from the candidate with the best
similarity. Replay of the 100-frame session bag (bench_replay), 12 hard frames re-registered:
9 far starts (43-120 mm) 0 -> 6 under ~1 mm, the 3 good ones unchanged, 3.6 s instead of 6.0 s
per frame (better starts converge sooner).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.io.xray_dicom import positioner_prior
from xvr_ros.core.model.checkpoint import Checkpoint
from xvr_ros.core.model.inference import predict_initial_pose
from xvr_ros.core.register.refine import RefineResult, auto_scales, refine
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
    scales = tuple(auto_scales(detector) if scales in (None, "auto") else scales)
    angles, xyz = carm_parameters(init_pose.reshape(1, 4, 4).double())
    offs = torch.tensor(offsets, dtype=torch.float64)
    candidates = carm_pose(torch.rad2deg(angles) + offs, xyz.expand(len(offs), 3), degrees=True)
    result = refine(renderer, image, detector, candidates.to(init_pose.dtype), mask=mask, scales=scales[:2],
                    max_plateaus=1, max_iterations=max_iterations, time_budget=time_budget)
    similarity = torch.nan_to_num(result.similarity.detach().float().cpu(), nan=-math.inf)
    best = int(similarity.argmax())
    return result.pose[best : best + 1].to(init_pose.dtype), similarity


@dataclass
class Registration:
    """The outcome of :func:`register` for one X-ray."""

    initial_pose: torch.Tensor  # (1, 4, 4) mm
    refinement: RefineResult
    initial_source: str  # "network", "positioner" or "given"
    seconds: float  # total, prediction included

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
    **refine_options,
) -> Registration:
    """Register one X-ray: initial pose from ``init_pose``, else the network, else the DICOM prior.

    ``multistart_offsets``: the :func:`multistart` candidates (``()`` = refine the initial pose
    only). ``refine_options`` go to :func:`refine.refine` (e.g. ``time_budget``, ``scales``); the
    X-ray's validity mask (collimation, padding) is honoured. Raises ValueError only for invalid
    input.
    """
    t0 = time.perf_counter()
    if init_pose is not None:
        source, pose = "given", init_pose
    elif checkpoint is not None:
        source, pose = "network", predict_initial_pose(checkpoint, xray.image, xray.detector)
    elif xray.positioner is not None:
        source, pose = "positioner", initial_pose_from_positioner(xray)
    else:
        raise ValueError("no initial pose: give init_pose, a network checkpoint, or an X-ray with positioner angles")
    pose = pose.to(device=renderer.device, dtype=torch.float32).reshape(-1, 4, 4)
    image = xray.image.to(device=renderer.device, dtype=torch.float32)
    mask = None if xray.valid_mask is None else xray.valid_mask.to(renderer.device)
    start = pose
    if multistart_offsets and refine_options.get("max_iterations", 1) > 0 and len(pose) == 1:
        budget = refine_options.get("time_budget")
        start, _ = multistart(renderer, image, xray.detector, pose, mask=mask, offsets=multistart_offsets,
                              scales=refine_options.get("scales"), time_budget=None if budget is None else budget / 3)
        if budget is not None:
            refine_options = {**refine_options, "time_budget": max(budget - (time.perf_counter() - t0), 1e-3)}
    result = refine(renderer, image, xray.detector, start, mask=mask, **refine_options)
    return Registration(pose, result, source, time.perf_counter() - t0)
