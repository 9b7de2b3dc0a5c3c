"""Inference: an X-ray at its own intrinsics -> the network's pose estimate (method.md §4).

Poses are (B, 4, 4) camera-to-world in mm.

A network trained on what a C-arm shows (``metadata["network_input"] == "field_of_view"``, see
:mod:`xvr_ros.core.train.augment`) sees only the X-ray's field of view: the field is detected
(:func:`~xvr_ros.core.register.fov.detect_field_of_view`, as the registration does), resampled
to the canonical detector with the image, and everything outside it (collimator blades, the
intensifier's rim, text, the canonical field beyond the X-ray) is set to the field's lowest line
integral, i.e. to the darkest the network's min-max scaling makes of the anatomy. Training builds
its inputs with the same :func:`network_input`. Older checkpoints get the whole resampled image.
"""

from __future__ import annotations

import torch

from xvr_ros.core.geometry import Detector, invert
from xvr_ros.core.intrinsics import resample_to_intrinsics
from xvr_ros.core.model.checkpoint import Checkpoint
from xvr_ros.core.model.network import normalize_xray
from xvr_ros.core.register.fov import field_of_view

#: ``metadata["network_input"]`` of a checkpoint whose network sees only the field of view.
FIELD_OF_VIEW_INPUT = "field_of_view"


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


def uses_field_of_view(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's network was trained on field-of-view-masked inputs."""
    return checkpoint.metadata.get("network_input") == FIELD_OF_VIEW_INPUT


def fill_outside(image: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) line integrals with the pixels where ``valid`` (B, 1, H, W) bool is False set to
    each image's lowest valid value (0 when nothing is valid)."""
    top = torch.finfo(image.dtype).max
    lo = torch.where(valid, image, torch.full_like(image, top)).flatten(1).amin(1).view(-1, 1, 1, 1)
    lo = torch.where(lo == top, torch.zeros_like(lo), lo)
    return torch.where(valid, image, lo)


def network_input(
    image: torch.Tensor, detector: Detector, canonical: Detector, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, H, W) line integrals at ``detector`` and their field of view ``mask`` (B or 1, 1, H, W)
    bool (None: all of the image) -> (B, 1, h, w) at ``canonical`` (Eq. 26) with everything outside
    the field or the X-ray filled by :func:`fill_outside`, and the (B, 1, h, w) bool field there."""
    resampled, valid = resample_to_intrinsics(image, detector, canonical, mask=mask)
    return fill_outside(resampled, valid), valid


def detected_field_of_view(image: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) line integrals -> (B, 1, H, W) bool detected field of view (all True where the
    detection keeps almost nothing, as the registration does)."""
    masks = []
    for x in image:
        fov = field_of_view(x[0].cpu())
        masks.append(torch.ones(x.shape[-2:], dtype=torch.bool) if fov is None else torch.from_numpy(fov))
    return torch.stack(masks)[:, None].to(image.device)


def predict_initial_pose(
    checkpoint: Checkpoint, image: torch.Tensor, detector: Detector, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, 1, H, W) X-ray at ``detector``'s intrinsics -> (B, 4, 4) network pose estimate (mm).

    The image is first resampled to the network's canonical intrinsics (Eq. 26; pixels that fall
    outside the X-ray are left at zero), which also mirrors it when the network was trained with
    the other x-axis convention. A field-of-view network (:func:`uses_field_of_view`) gets
    :func:`network_input` with ``mask`` (B or 1, 1, H, W) bool, the X-ray's field of view, detected
    here when None.
    """
    device = next(checkpoint.model.parameters()).device
    image = image.to(device=device, dtype=torch.float32)
    mask = None if mask is None else mask.to(device=device, dtype=torch.bool)
    x = initial_input(image, detector, canonical_detector(checkpoint), uses_field_of_view(checkpoint), mask)
    return predict(checkpoint, x)


def initial_input(
    image: torch.Tensor,
    detector: Detector,
    canonical: Detector,
    field_of_view: bool,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 1, H, W) X-ray at ``detector`` -> (B, 1, h, w) at ``canonical``, as the network takes it:
    :func:`network_input` with ``mask`` (detected when None) if ``field_of_view``, else the whole
    image resampled (zeros outside the X-ray)."""
    if field_of_view:
        mask = detected_field_of_view(image) if mask is None else mask
        return network_input(image, detector, canonical, mask)[0]
    return resample_to_intrinsics(image, detector, canonical)[0]


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

