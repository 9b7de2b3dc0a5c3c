"""Inference: an X-ray at its own intrinsics -> the network's pose estimate (method.md §4).

Poses are (B, 4, 4) camera-to-world in mm.
"""

from __future__ import annotations

import torch

from xvr_ros.core.geometry import Detector, invert
from xvr_ros.core.intrinsics import resample_to_intrinsics
from xvr_ros.core.model.checkpoint import Checkpoint
from xvr_ros.core.model.network import normalize_xray


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


def predict(checkpoint: Checkpoint, image: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) X-rays already at the checkpoint's canonical intrinsics -> (B, 4, 4) poses (mm).

    Poses of a foundation model are in its template's frame; they are mapped into the patient's
    world through the inverse of the checkpoint's ``patient_to_template`` transform.
    """
    model = checkpoint.model
    with torch.no_grad():
        pose = model(normalize_xray(image, model.height))
    p2t = checkpoint.metadata.get("patient_to_template")
    if p2t is not None:
        pose = invert(torch.as_tensor(p2t, dtype=pose.dtype, device=pose.device)) @ pose
    return pose

