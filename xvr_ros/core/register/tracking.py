"""Frame-to-frame tracking for continuous fluoroscopy: refine from the last accepted pose.

Consecutive fluoroscopy frames (7.5-30 frames/s) differ by a fraction of a degree and a
millimetre or two, so the previous frame's pose, extrapolated with the C-arm's recent velocity,
is a far better start than a network's estimate (tens of mm off). :func:`track` refines such a
start on the finest scales only, within a tight time budget; :class:`Tracker` holds the state
(the last accepted frames) and decides, frame by frame, whether tracking applies
(:meth:`Tracker.prior`) or the full registration must run: no accepted frame yet, the last one
too old (``max_gap``), other intrinsics (zoom, pan, another detector mode), or the network's
estimate of the new frame too far from the tracked pose (the C-arm was moved to another view).
A tracked result goes through the same accept/reject as a full registration; a rejection
clears the track, so the next frame takes the full path.

Times are seconds (any monotonic clock, e.g. the image stamps); poses (4, 4) camera-to-world in
mm, velocities in the C-arm parameters of :func:`~xvr_ros.core.geometry.carm_parameters`
(angles rad, xyz mm) per second.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.metrics import pose_errors
from xvr_ros.core.register import registration
from xvr_ros.core.register.refine import auto_scales, refine
from xvr_ros.core.render.renderer import Renderer

__all__ = ["TrackingOptions", "Tracker", "same_intrinsics", "track"]


@dataclass(frozen=True)
class TrackingOptions:
    """When to track and how (see the module docstring).

    max_gap: s after the last accepted frame beyond which the next one is registered afresh. The
        quality gate was calibrated on tracked starts within about a second of C-arm motion
        (``bench/fit_quality.py``); after longer gaps a moving C-arm leaves that range and the
        gate would be extrapolating: it can accept a tracked frame that is mm off.
    max_jump_deg, max_jump_mm: the network's estimate of a frame may differ from the tracked
        prior by at most this rotation (deg) and translation (mm); beyond either, the C-arm is
        taken to have moved to another view and the full path runs. None = no such check. The
        limits are wide: a CPU-trained network errs by tens of mm (most of it in depth), and
        only a view change, not its error, should end a track.
    extrapolate: start from the last pose moved by the last velocity (constant-velocity model),
        else from the last pose itself. The velocity is used only when it was measured, and is
        applied, over at most ``max_extrapolation`` s (an average over longer times says little).
    levels: how many of the finest refinement scales a tracked frame is refined on.
    time_budget: s allowed for one tracked refinement; max_iterations: its iteration cap.
    lr_rot, lr_xyz: Adam learning rates on the coarsest of those scales (rad, mm): the size of
        a frame-to-frame change.
    """

    max_gap: float = 1.0
    max_jump_deg: float | None = 35.0
    max_jump_mm: float | None = 250.0
    extrapolate: bool = True
    max_extrapolation: float = 1.0
    levels: int = 2
    time_budget: float = 0.5
    max_iterations: int = 60
    lr_rot: float = 0.005
    lr_xyz: float = 0.5

    def __post_init__(self):
        if not self.max_gap > 0 or self.levels < 1 or not self.time_budget > 0 or self.max_iterations < 1:
            raise ValueError(f"need max_gap > 0, levels >= 1 and time_budget > 0, got {self}")


@dataclass(frozen=True)
class _Accepted:
    time: float
    pose: torch.Tensor  # (4, 4) float64 mm
    detector: Detector


class Tracker:
    """The track of one image stream: its last two accepted frames (not thread-safe: one worker)."""

    def __init__(self, options: TrackingOptions = TrackingOptions()):
        self.options = options
        self._last: list[_Accepted] = []  # at most two, oldest first

    def reset(self) -> None:
        """Forget the track: the next frame takes the full path."""
        self._last = []

    def accepted(self, t: float, pose: torch.Tensor, detector: Detector) -> None:
        """Record an accepted frame (time ``t`` s, (4, 4) or (1, 4, 4) pose mm)."""
        if self._last and t <= self._last[-1].time:
            self._last = []  # time went backwards (a replayed bag restarted): start over
        entry = _Accepted(float(t), pose.detach().reshape(4, 4).to("cpu", torch.float64), detector)
        self._last = [*self._last[-1:], entry]

    def rejected(self) -> None:
        """A frame was rejected: its successor is registered afresh."""
        self.reset()

    def why_not(self, t: float, detector: Detector) -> str:
        """Why a frame at ``t`` s on ``detector`` cannot be tracked ("" = it can; the network's
        estimate is not checked here: see :meth:`prior`)."""
        if not self._last:
            return "no accepted frame to track from"
        last = self._last[-1]
        gap = t - last.time
        if not 0 < gap <= self.options.max_gap:
            return f"{gap:.2f} s since the last accepted frame (limit {self.options.max_gap:g} s)"
        if not same_intrinsics(detector, last.detector):
            return "the intrinsics changed (zoom, pan or another detector mode)"
        return ""

    def prior(self, t: float, detector: Detector, network_pose: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, str]:
        """The (1, 4, 4) float64 start for a frame at ``t`` s on ``detector`` -> (pose, "") when it
        can be tracked, else (None, why not). ``network_pose``: the network's estimate of this
        frame (or the latest one), for the jump check."""
        why = self.why_not(t, detector)
        if why:
            return None, why
        start = self._extrapolated(t)
        jump = self._jump(start, network_pose)
        if jump:
            return None, jump
        return start[None], ""

    def _extrapolated(self, t: float) -> torch.Tensor:
        last = self._last[-1]
        if not self.options.extrapolate or len(self._last) < 2:
            return last.pose
        before = self._last[0]
        span = self.options.max_extrapolation
        if not same_intrinsics(before.detector, last.detector) or max(last.time - before.time, t - last.time) > span:
            return last.pose
        a0, x0 = carm_parameters(before.pose)
        a1, x1 = carm_parameters(last.pose)
        k = (t - last.time) / (last.time - before.time)
        return carm_pose(a1 + k * _wrapped(a1 - a0), x1 + k * (x1 - x0))

    def _jump(self, start: torch.Tensor, network_pose: torch.Tensor | None) -> str:
        o = self.options
        if network_pose is None or (o.max_jump_deg is None and o.max_jump_mm is None):
            return ""
        rot, trans = pose_errors(start[None], network_pose.detach().reshape(1, 4, 4).to("cpu", torch.float64))
        rot, trans = float(rot[0]), float(trans[0])
        too_far = (o.max_jump_deg is not None and rot > o.max_jump_deg) or (
            o.max_jump_mm is not None and trans > o.max_jump_mm)
        if too_far:
            return (f"the network's estimate is {rot:.1f} deg / {trans:.0f} mm from the tracked pose "
                    f"(limits {o.max_jump_deg} deg / {o.max_jump_mm} mm): the view changed")
        return ""


def same_intrinsics(a: Detector, b: Detector, rtol: float = 1e-6) -> bool:
    """Whether two detectors image alike (size, spacing, principal point, SDD, axes), up to rounding."""
    if (a.height, a.width, a.reverse_x_axis, a.orientation) != (b.height, b.width, b.reverse_x_axis, b.orientation):
        return False
    scale = max(abs(a.sdd), 1.0)
    return all(abs(x - y) <= rtol * scale for x, y in
               ((a.sdd, b.sdd), (a.delx, b.delx), (a.dely, b.dely), (a.x0, b.x0), (a.y0, b.y0)))


def _wrapped(angles: torch.Tensor) -> torch.Tensor:
    """Angle differences (rad) brought into [-pi, pi)."""
    return torch.remainder(angles + math.pi, 2 * math.pi) - math.pi


def track(
    renderer: Renderer,
    xray: Xray,
    prior: torch.Tensor,
    *,
    field_of_view: torch.Tensor | None = None,
    fov_margin_mm: float = 3.0,
    mask_outliers: bool = True,
    options: TrackingOptions = TrackingOptions(),
    callback=None,
) -> registration.Registration:
    """Refine ``prior`` (1, 4, 4) mm on the finest ``options.levels`` scales of ``xray``
    -> a :class:`Registration` with ``initial_source="tracking"``.

    ``field_of_view``: (1, 1, H, W) bool, the field of view of an earlier frame of the track
    (the collimator does not move between fluoroscopy frames; its detection costs more than
    a tracked refinement); None = detect it in this frame. The scored pixels are made from it
    as :func:`registration.register` makes them (margin, metal left out).
    """
    t0 = time.perf_counter()
    fov = registration.field_of_view(xray) if field_of_view is None else field_of_view
    mask = registration.scored_pixels(xray, fov, fov_margin_mm, mask_outliers)
    mask = None if mask is None else mask.to(renderer.device)
    pose = prior.to(device=renderer.device, dtype=torch.float32).reshape(1, 4, 4)
    image = xray.image.to(device=renderer.device, dtype=torch.float32)
    result = refine(
        renderer, image, xray.detector, pose, mask=mask, scales=auto_scales(xray.detector)[-options.levels:],
        lr_rot=options.lr_rot, lr_xyz=options.lr_xyz, time_budget=options.time_budget,
        max_iterations=options.max_iterations, callback=callback,
    )
    return registration.Registration(pose, result, "tracking", time.perf_counter() - t0, fov, mask)
