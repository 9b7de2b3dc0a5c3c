"""A constant-velocity Kalman filter on the pose of a fluoroscopy track: the depth from several frames.

One tracked frame pins the pose down well across the image (rotations, in-plane translation) but
poorly along the beam: a depth change barely magnifies the image, and on a 64 px tracking level
single frames scatter by a millimetre or two in depth. Consecutive frames see nearly the same
pose, so weighing each frame's pose by its own covariance (the Laplace covariance of its
refinement, ``uncertainty``) against what the frames before predict averages the depth over
several frames while the well-determined directions follow each frame.

The state is the pose ``T`` and a velocity ``w``, both in the twist about the volume's isocenter
(``T P se3_exp(xi) P^-1``, ``P`` the translation from the X-ray source to the isocenter, as
``uncertainty.IsocenterObjective``: rotations and translations barely couple there, so a turning
C-arm is a rotation alone): ``xi`` mm x3 then rad x3, ``w`` per second. Between frames the
velocity is kept and the pose moved by it; a white-noise acceleration (``acceleration_mm``,
``acceleration_rad``: its spectral density's square root, per s^1.5) lets both drift, which
bounds how far back the filter looks: a breathing patient or a C-arm starting to turn is followed
after a frame or two. A frame further from the prediction than the covariances allow
(``gate``, a chi-square on 6 degrees of freedom) restarts the filter from that frame, and so does
one whose covariance bounds a direction no better than ``max_sd_mm`` / ``max_sd_rad``: a Hessian
computed away from the optimum (a track's shared one, :class:`~.tracking.Tracker`) can have a flat
direction (``uncertainty.MAX_SD``, 100 mm) where the frame's pose is in fact fine, and weighed by
it the filter ignored good depths and drifted on its velocity (README: tracking).
"""

from __future__ import annotations

import math

import torch

from xvr_ros.core.geometry import invert
from xvr_ros.core.register.uncertainty import isocenter_adjoint, isocenter_twist, to_isocenter
from xvr_ros.core.rotations import se3_exp

__all__ = ["CHI2_6DOF_9999", "PoseFilter"]

#: The 99.99 % quantile of the chi-square distribution with 6 degrees of freedom.
CHI2_6DOF_9999 = 27.856


class PoseFilter:
    """Kalman filter on one track's pose (see the module docstring; not thread-safe).

    isocenter: (3,) mm, the volume's isocenter in world coordinates (``Renderer.isocenter``).
    acceleration_mm, acceleration_rad: the white-noise acceleration's density, mm / s^1.5 and
        rad / s^1.5 (per axis).
    velocity_mm, velocity_rad: the standard deviation of the velocity when a filter starts, mm/s
        and rad/s (per axis): how fast the table, breathing or the C-arm may move.
    gate: the innovation's chi-square (6 dof) beyond which the filter restarts from the frame.
    max_sd_mm, max_sd_rad: a frame whose standard deviation about the isocenter exceeds either (on
        any axis) restarts the filter from it.
    """

    def __init__(self, isocenter: torch.Tensor, acceleration_mm: float = 3.0, acceleration_rad: float = 0.1,
                 velocity_mm: float = 10.0, velocity_rad: float = 0.1, gate: float = CHI2_6DOF_9999,
                 max_sd_mm: float = 10.0, max_sd_rad: float = 0.05):
        values = (acceleration_mm, acceleration_rad, velocity_mm, velocity_rad, gate, max_sd_mm, max_sd_rad)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"the filter's noise densities, velocity spreads, gate and sd limits must be positive, "
                             f"got {values}")
        self.isocenter = torch.as_tensor(isocenter, dtype=torch.float64).cpu().reshape(3)
        self._q = torch.tensor([acceleration_mm ** 2] * 3 + [acceleration_rad ** 2] * 3, dtype=torch.float64)
        self._v0 = torch.tensor([velocity_mm ** 2] * 3 + [velocity_rad ** 2] * 3, dtype=torch.float64)
        self.gate = float(gate)
        self._max_var = torch.tensor([max_sd_mm ** 2] * 3 + [max_sd_rad ** 2] * 3, dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        """Forget the track: the next :meth:`update` starts the filter from its frame."""
        self._time: float | None = None
        self._pose: torch.Tensor | None = None  # (4, 4) float64 mm
        self._velocity = torch.zeros(6, dtype=torch.float64)  # isocenter twist per s
        self._cov = torch.zeros(12, 12, dtype=torch.float64)  # of (xi, w) about _pose
        self.frames = 0  # fused since it (re)started

    @property
    def started(self) -> bool:
        return self._pose is not None

    def predict(self, t: float) -> torch.Tensor | None:
        """The (4, 4) float64 pose the filter expects at ``t`` s; None before the first frame."""
        if self._pose is None:
            return None
        return self._moved(self._pose, self._velocity * max(t - self._time, 0.0))

    def update(self, t: float, pose: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse a frame at ``t`` s: its (4, 4) pose mm and the (6, 6) covariance of its error
        (``uncertainty.PoseUncertainty.covariance``: mm, rad, a right perturbation along the C-arm's
        axes) -> (the filtered (4, 4) float64 pose, its (6, 6) covariance in the same convention).
        The first frame, one at or before the last (a restarted stream), one too uncertain
        (``max_sd_*``) and one outside the gate restart the filter."""
        pose, R = self._measurement(pose, covariance)
        if not self._weighable(t, R):
            return self._start(t, pose, R)
        predicted, P = self._predicted(t)
        z = isocenter_twist(self, predicted, pose)
        S = P[:6, :6] + R
        if float(z @ torch.linalg.solve(S, z)) > self.gate:
            return self._start(t, pose, R)
        K = torch.linalg.solve(S, P[:6, :]).T  # P H^T S^-1, S symmetric
        delta = K @ z
        self._time, self._pose = float(t), self._moved(predicted, delta[:6])
        self._velocity = self._velocity + delta[6:]
        self.frames += 1
        I_KH = torch.eye(12, dtype=torch.float64)
        I_KH[:, :6] -= K
        self._cov = I_KH @ P @ I_KH.T + K @ R @ K.T  # Joseph form: stays symmetric positive
        return self._pose.clone(), self._along_carm(self._pose, self._cov[:6, :6])

    def surprise(self, t: float, pose: torch.Tensor, covariance: torch.Tensor) -> float:
        """How far a frame (as :meth:`update` takes it) lies from what the filter expects at ``t``:
        the innovation's chi-square on 6 degrees of freedom (inf when the filter cannot weigh it:
        not started, ``t`` not after its last frame, or the frame too uncertain). Changes nothing."""
        pose, R = self._measurement(pose, covariance)
        if not self._weighable(t, R):
            return math.inf
        predicted, P = self._predicted(t)
        z = isocenter_twist(self, predicted, pose)
        return float(z @ torch.linalg.solve(P[:6, :6] + R, z))

    def bounded(self, pose: torch.Tensor, covariance: torch.Tensor) -> bool:
        """Whether a frame's covariance (as :meth:`update` takes it) bounds every direction within
        ``max_sd_*``: else the filter restarts from the frame instead of weighing it."""
        return not self._too_uncertain(self._measurement(pose, covariance)[1])

    def _measurement(self, pose: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ((4, 4) float64 pose, (6, 6) its covariance in the isocenter twist)."""
        pose = torch.as_tensor(pose).detach().to("cpu", torch.float64).reshape(4, 4)
        return pose, self._about_isocenter(pose, torch.as_tensor(covariance, dtype=torch.float64).cpu().reshape(6, 6))

    def _weighable(self, t: float, R: torch.Tensor) -> bool:
        return self._pose is not None and t > self._time and not self._too_uncertain(R)

    def _too_uncertain(self, R: torch.Tensor) -> bool:
        return bool((R.diagonal() > self._max_var).any())

    def _predicted(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the (4, 4) pose predicted at ``t``, the (12, 12) covariance of the state there)."""
        dt = t - self._time
        F = torch.eye(12, dtype=torch.float64)
        F[:6, 6:] = dt * torch.eye(6, dtype=torch.float64)
        return self.predict(t), F @ self._cov @ F.T + self._process_noise(dt)

    def _start(self, t: float, pose: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._time, self._pose = float(t), pose
        self._velocity = torch.zeros(6, dtype=torch.float64)
        self._cov = torch.block_diag(R, torch.diag(self._v0))
        self.frames = 1
        return pose.clone(), self._along_carm(pose, R)

    def _about_isocenter(self, pose: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
        """A covariance along the C-arm's axes at ``pose`` -> in the isocenter twist (``xi = Ad_P xi'``)."""
        Ad_inv = torch.linalg.inv(isocenter_adjoint(self, pose))
        return Ad_inv @ covariance @ Ad_inv.T

    def _along_carm(self, pose: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_about_isocenter`."""
        Ad = isocenter_adjoint(self, pose)
        return Ad @ covariance @ Ad.T

    def _process_noise(self, dt: float) -> torch.Tensor:
        """(12, 12) white-noise acceleration over ``dt`` s, per axis ``q [[dt^3/3, dt^2/2], [dt^2/2, dt]]``."""
        q = torch.diag(self._q)
        return torch.cat([torch.cat([q * dt ** 3 / 3, q * dt ** 2 / 2], 1),
                          torch.cat([q * dt ** 2 / 2, q * dt], 1)], 0)

    def _moved(self, pose: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        """``pose`` moved by the isocenter twist ``xi`` (6,) (the inverse of ``isocenter_twist``)."""
        P = to_isocenter(self, pose)
        return pose @ P @ se3_exp(xi[None])[0] @ invert(P)
