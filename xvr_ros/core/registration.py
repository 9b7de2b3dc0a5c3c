"""Intraoperative registration of one X-ray: initial pose (network, DICOM prior or given) + refinement.

The flow (method.md §4-5): resample the X-ray from its own intrinsics to the network's canonical
intrinsics with the homography of Eq. 26, predict a pose, then refine it by rendering at the
X-ray's *original* intrinsics. Poses are (B, 4, 4) camera-to-world in mm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .geometry import Detector, carm_pose
from .refine import RefineResult, refine
from .render import Renderer
from .train import predict
from .xray import Xray, positioner_prior, resample_to_intrinsics


def canonical_detector(checkpoint: Checkpoint) -> Detector:
    """The detector a checkpoint's network was trained on (xvr config: sdd, height, delx, ...)."""
    c = checkpoint.config
    meta = checkpoint.metadata.get("intrinsics", {})
    height = int(meta.get("height", c["height"]))
    return Detector(
        sdd=float(meta.get("sdd", c.get("sdd", 1020.0))),
        height=height,
        width=int(meta.get("width", height)),
        delx=float(meta.get("delx", c.get("delx", 2.0))),
        dely=float(meta.get("dely", meta.get("delx", c.get("delx", 2.0)))),
        reverse_x_axis=bool(meta.get("reverse_x_axis", c.get("reverse_x_axis", False))),
        orientation=meta.get("orientation", c.get("orientation", "AP")),
    )


def predict_initial_pose(checkpoint: Checkpoint, image: torch.Tensor, detector: Detector) -> torch.Tensor:
    """(B, 1, H, W) X-ray at ``detector``'s intrinsics -> (B, 4, 4) network pose estimate (mm).

    The image is first resampled to the network's canonical intrinsics (Eq. 26; pixels that fall
    outside the X-ray are left at zero), which also mirrors it when the network was trained with
    the other x-axis convention.
    """
    device = next(checkpoint.model.parameters()).device
    canonical = canonical_detector(checkpoint)
    resampled, _ = resample_to_intrinsics(image.to(device=device, dtype=torch.float32), detector, canonical)
    return predict(checkpoint, resampled)


def initial_pose_from_positioner(xray: Xray) -> torch.Tensor:
    """A weak (1, 4, 4) prior from the DICOM positioner angles and source-to-patient distance."""
    angles, xyz = positioner_prior(xray)
    return carm_pose(angles, xyz, degrees=True)


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
    **refine_options,
) -> Registration:
    """Register one X-ray: initial pose from ``init_pose``, else the network, else the DICOM prior.

    ``refine_options`` go to :func:`refine.refine` (e.g. ``time_budget``); the X-ray's validity
    mask (collimation, padding) is honoured. Raises ValueError only for invalid input.
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
    result = refine(renderer, image, xray.detector, pose, mask=mask, **refine_options)
    return Registration(pose, result, source, time.perf_counter() - t0)
