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

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.metrics import pose_errors
from xvr_ros.core.register import registration
from xvr_ros.core.register.pose_filter import PoseFilter
from xvr_ros.core.register.refine import RefineResult, auto_scales, intra_op_threads
from xvr_ros.core.register.uncertainty import (
    MAX_SD,
    IsocenterObjective,
    PoseUncertainty,
    covariance_from_hessian,
    isocenter_twist,
    pose_uncertainty,
)
from xvr_ros.core.render.renderer import Renderer

__all__ = ["CATCH_UP_TIME_FACTOR", "TrackingOptions", "Tracker", "correction", "finish", "finished", "same_intrinsics",
           "screen",
           "similarity_gain", "started_far", "track", "track_hessian", "tracking_factor", "tracking_renderer",
           "unfinished"]


#: A caught-up frame (one the refiner tracks after a full registration, without a result) has
#: this many times ``TrackingOptions.time_budget`` (the same render cap): it has no latency of its
#: own, and while frames pour in at 15 frames/s renders slow down (in a replay two caught-up
#: frames in a row stopped on the budget after 7-9 renders, which ended the catch-up). So has the
#: frame after one cut short by the budget: it starts from the last accepted frame's pose, further
#: back, and with the same budget on a busy CPU the next ones were cut short too, 13 in a row,
#: their starts drifting 2-6 mm off (a 15 frames/s, 256 px replay). So has the finishing of a full
#: registration on the tracking level (:func:`finished`).
CATCH_UP_TIME_FACTOR = 4.0


@dataclass(frozen=True)
class TrackingOptions:
    """When to track and how (see the module docstring).

    max_gap: s after the last accepted frame beyond which the next one is registered afresh. A
        full registration takes seconds on a CPU, so the next frame it can take comes that much
        later: tracking from it costs one tracked refinement and succeeds when the C-arm held
        still meanwhile; when it moved, the tracked frame fails the quality gate (its model was
        fitted on such starts, ``track_moved`` in ``bench/fit_quality.py``) and the full path runs.
    max_jump_deg, max_jump_mm: the network's estimate of a frame may differ from the tracked
        prior by at most this rotation (deg) and translation (mm); beyond either, the C-arm is
        taken to have moved to another view and the full path runs. None = no such check. The
        limits are wide: a CPU-trained network errs by tens of mm (most of it in depth) and, for
        some views, by 35 deg (it ended good tracks in the replay at 35 deg), and only a view
        change, not its error, should end a track; a smaller view change fails the tracked
        frame's quality gate instead.
    extrapolate: start from the last pose moved by the last velocity (constant-velocity model),
        else from the last pose itself. The velocity is used only when it was measured, and is
        applied, over at most ``max_extrapolation`` s (an average over longer times says little).
    size: long side (px) of the pyramid level a tracked frame is refined and assessed on (the
        refinement's second-finest level by default). What sets a tracked frame's accuracy is
        the volume level it is rendered from (``footprint_ratio``) more than this size: on 4
        simulated runs tracked frame to frame without a gate, 64 px with 2.1 mm voxels was about
        as accurate as 96 px with 2.1 mm voxels, at half the cost, and 96 px with 2.8 mm voxels
        worse than both (``bench/compare_tracking.py``).
    time_budget: s allowed for the Newton steps of one tracked refinement (a Hessian computed at
        its start, on a track's first frame, and the field of view's detection come on top);
        max_iterations: its cap on renders.
    max_step_mm, max_step_rad: trust region of one Newton step, in the isocenter twist: at most
        this translation (mm) and rotation (rad); a frame-to-frame change is smaller.
    tolerance_mm, tolerance_rad: a Newton step smaller than both ends the refinement (converged).
    min_gain: a Newton step whose predicted gain in similarity (the quadratic model's) is below
        this ends the refinement (converged): nearer the optimum the image noise, not the pose,
        moves the similarity, and the steps' size alone (``tolerance_*``) ran every tracked frame
        to ``max_iterations``. 1e-4 stopped too soon (more frames over 1 mm).
    plateau_renders, plateau_tolerance: the refinement also ends (converged) when its similarity
        rose by less than ``plateau_tolerance`` over the last ``plateau_renders`` renders: on noisy
        frames (256 px fluoroscopy) the steps reach the noise floor in 2-4 renders and then wander
        within ~1e-4 of it, predicting gains above ``min_gain`` that do not come, until
        ``max_iterations``, and the quality gate read such frames as doubtful.
    footprint_ratio: the renderer's volume levels for tracked frames (:func:`tracking_renderer`):
        finer than the full path's at the same image size, since a coarse level's voxels bias
        the depth, which a frame-to-frame track then accumulates: for the demo CT (0.7 x 0.7 x
        2.5 mm) at 64 px, 0.75 renders 2.1 mm voxels where 1.0 rendered 2.8 mm ones, and tracked
        frames over 1 mm fell from 7-19 % to 0.7-5.5 % of the frames on simulated runs
        (``bench/compare_tracking.py``).
    hessian_frames: a Hessian (12 renders, several tracked frames' worth) serves this many
        tracked frames, then is computed anew at the next one's start.
    max_rejections: rejected frames in a row that end the track (the next frame takes the full
        path); until then the next frame is tracked again from the last accepted one. Measured
        with 3 (``bench_tracking.py``): frames tracked after a rejection start from an older pose,
        the gate accepted fewer of them, and one 2.4 mm off; hence 1.
    max_gain: a tracked frame whose similarity rose by more than this from its prior started too
        far for tracking (:func:`started_far`: the C-arm moved more than a fluoroscopy frame's
        worth, e.g. a sweep of single shots, or the first live frame after a catch-up): the
        Newton steps bring the image in line but the depth, which the image barely shows, lags
        by millimetres, and the quality model, fitted on near starts, does not see it. In
        replays, 8 of 53 accepted tracked frames above 0.005 were 2.5-5 mm off, none of 686
        below it. Such a frame is not published; the track goes on from it (the next frame
        starts near), and ``max_far`` of them in a row that rose by more than ``shot_gain`` end
        the track.
    shot_gain: a frame tracked from too far whose similarity rose by more than this is another
        shot (single shots of a sweep rose by 0.01-0.22, most above 0.02, in a replay) and counts
        towards ``max_far``; one below it is a fluoroscopy frame after frames a busy CPU skipped
        (0.005-0.019 at 15 frames/s and 512 px, where ending the track on two of them in a row
        cost a full registration, 3 s without a TF, three times in a 20 s replay): not
        published either, but the run of far frames starts over.
    filter: fuse the accepted frames of a track with a constant-velocity Kalman filter
        (:class:`~xvr_ros.core.register.pose_filter.PoseFilter`, each frame weighed by its
        covariance): the pose published is the filtered one. A single tracked frame's depth
        scatters on the 64 px level; the filter averages it over frames while the directions the
        image pins down follow each frame (README: tracking). The next frame still starts from
        the frames' own poses (``extrapolate``): from the filter's prediction, off the last
        frame's image optimum in depth, the next frames' similarity rose more and the far rule
        (``max_gain``) rejected more good frames.
    near_gap, near_frames: a frame tracked from too far whose similarity rose by at most
        ``shot_gain``, at most ``near_gap`` s after the last accepted frame while the track's filter
        has fused at least ``near_frames`` frames, is "near" (:func:`screen`): judged by the
        quality model as any tracked frame, and published when that accepts it and the filter
        expects its pose (:meth:`Tracker.surprise`); else it is handled as far. On simulated
        fluoroscopy, frames that rose by 0.005-0.05 were as accurate as the others (README: tracking);
        the frames tracked from too far that were millimetres off were single shots of a sweep,
        half a second or more apart and without a running filter. 0 = off.
    filter_acceleration_mm, filter_acceleration_rad: the filter's white-noise acceleration
        (mm / s^1.5, rad / s^1.5, per axis about the isocenter): how quickly it lets the velocity
        change; smaller smooths more and lags more.
    max_drop: a tracked frame whose final similarity is more than this below that of the last
        accepted frame (:meth:`Tracker.match_fell`) is stuck on another view or a local optimum:
        rejected. Consecutive fluoroscopy frames differ by under 0.002; in a replayed sweep of
        single shots the tracking model accepted a frame ending at 0.60 after a full registration
        at 0.98 (2.1 mm off: its features do not bound the match).
    """

    max_gap: float = 10.0
    max_jump_deg: float | None = 46.0
    max_jump_mm: float | None = 250.0
    extrapolate: bool = True
    max_extrapolation: float = 1.0
    size: int = 64
    time_budget: float = 0.25
    max_iterations: int = 10
    max_step_mm: float = 3.0
    max_step_rad: float = 0.03
    tolerance_mm: float = 0.05
    tolerance_rad: float = 5e-4
    min_gain: float = 3e-5
    plateau_renders: int = 3
    plateau_tolerance: float = 1e-4
    footprint_ratio: float = 0.75
    hessian_frames: int = 24
    max_rejections: int = 1
    max_gain: float = 0.005
    max_far: int = 2
    shot_gain: float = 0.02
    max_drop: float = 0.05
    filter: bool = True
    filter_acceleration_mm: float = 3.0
    filter_acceleration_rad: float = 0.1
    near_gap: float = 0.3
    near_frames: int = 3

    def __post_init__(self):
        positive = (self.max_gap, self.time_budget, self.max_step_mm, self.max_step_rad, self.footprint_ratio,
                    self.filter_acceleration_mm, self.filter_acceleration_rad)
        if not self.min_gain >= 0:
            raise ValueError(f"need min_gain >= 0, got {self.min_gain}")
        if not (self.plateau_tolerance >= 0 and self.near_gap >= 0 and self.near_frames >= 1):
            raise ValueError(f"need plateau_tolerance >= 0, near_gap >= 0 and near_frames >= 1, got "
                             f"{self.plateau_tolerance}, {self.near_gap}, {self.near_frames}")
        counts = (self.max_iterations, self.hessian_frames, self.max_rejections, self.plateau_renders, self.max_far)
        if not all(v > 0 for v in positive) or self.size < 8 or min(counts) < 1:
            raise ValueError(f"need max_gap, time_budget, footprint_ratio, the step limits and the filter's "
                             f"accelerations > 0, size >= 8, and "
                             f"max_iterations, hessian_frames, max_rejections, plateau_renders and max_far >= 1, "
                             f"got {self}")
        if not (self.max_gain > 0 and self.max_drop > 0 and self.shot_gain >= self.max_gain):
            raise ValueError(f"need max_gain and max_drop > 0 and shot_gain >= max_gain, got {self.max_gain}, "
                             f"{self.max_drop}, {self.shot_gain}")


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
        self._hessian: PoseUncertainty | None = None  # the track's Hessian ...
        self._hessian_uses = 0  # ... and how many accepted frames used it
        self._rejections = 0  # in a row, since the last accepted frame
        self._far = 0  # frames tracked from too far (started_far), in a row
        self._similarity: float | None = None  # the final similarity of the frame the track goes on from
        self._recent: _Accepted | None = None  # the last accepted frame, kept when the track ends
        self._filter: PoseFilter | None = None  # over the track's accepted frames (options.filter)

    @property
    def hessian(self) -> PoseUncertainty | None:
        """The Hessian for the next tracked frame's Newton steps; None = compute one."""
        return self._hessian if self._hessian_uses < self.options.hessian_frames else None

    def recent_pose(self, t: float, detector: Detector) -> torch.Tensor | None:
        """The (1, 4, 4) pose of the last accepted frame, even after the track ended, when it is at
        most ``max_gap`` s before ``t`` with the same intrinsics: a further start for the full path
        (``register(other_starts=...)``), nearer than a network estimate while the C-arm has moved
        little."""
        last = self._recent
        if last is None or not 0 < t - last.time <= self.options.max_gap:
            return None
        return last.pose[None] if same_intrinsics(detector, last.detector) else None

    def reset(self) -> None:
        """Forget the track: the next frame takes the full path."""
        self._last = []
        self._hessian, self._hessian_uses = None, 0
        self._rejections = self._far = 0
        self._similarity = None
        if self._filter is not None:
            self._filter.reset()

    def forget(self) -> None:
        """Forget the track and the last accepted pose (another volume: its poses mean nothing here)."""
        self.reset()
        self._recent = None

    def accepted(self, t: float, pose: torch.Tensor, detector: Detector,
                 hessian: PoseUncertainty | None = None, similarity: float | None = None,
                 covariance: torch.Tensor | None = None, isocenter: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Record an accepted frame (time ``t`` s, (4, 4) or (1, 4, 4) pose mm), the Hessian its
        refinement used (``Registration.uncertainty`` of a tracked frame; it serves the next ones)
        and its final similarity (for :meth:`match_fell`; None = no check) -> (the (4, 4) float64
        pose to publish, its (6, 6) covariance or None).

        ``covariance``: (6, 6) of the frame's pose (``PoseUncertainty.covariance``, calibrated),
        ``isocenter``: (3,) mm the volume's (``Renderer.isocenter``): with both and
        ``options.filter`` the frame is fused into the track's filter, which gives the pose to
        publish; else it is the frame's own. The next frame starts from the frame's own pose
        (:meth:`prior`)."""
        pose = pose.detach().reshape(4, 4).to("cpu", torch.float64)
        self._record(t, pose, detector, hessian, similarity)
        self._rejections = self._far = 0
        if not (self.options.filter and covariance is not None and isocenter is not None):
            if self._filter is not None:  # a frame it cannot weigh breaks its chain
                self._filter.reset()
            return pose, covariance
        f = self._filter_about(isocenter)
        if not f.bounded(pose, covariance):
            # A shared Hessian computed off the optimum, flat in a direction: the filter cannot weigh
            # the frames it serves (and their Newton steps are shaped by it): the next frame computes its own.
            self.forget_hessian()
        return f.update(t, pose, covariance)

    @property
    def fused(self) -> int:
        """How many accepted frames the last pose :meth:`accepted` gave combines (1: that frame alone)."""
        return self._filter.frames if self._filter is not None and self._filter.started else 1

    def _filter_about(self, isocenter: torch.Tensor) -> PoseFilter:
        """The track's filter, a new one for another volume's ``isocenter``."""
        o = self.options
        if self._filter is None or not torch.equal(self._filter.isocenter, torch.as_tensor(
                isocenter, dtype=torch.float64).cpu().reshape(3)):
            self._filter = PoseFilter(isocenter, o.filter_acceleration_mm, o.filter_acceleration_rad)
        return self._filter

    def next_far_ends(self, gain: float = math.inf) -> bool:
        """Whether one more frame tracked from too far (:meth:`far`), its similarity risen by
        ``gain`` (:func:`similarity_gain`), would end the track."""
        return gain > self.options.shot_gain and self._far + 1 >= self.options.max_far

    def near(self, t: float, gain: float) -> bool:
        """Whether a frame at ``t`` s tracked from too far, its similarity risen by ``gain``, is near
        enough for the quality model and the filter to judge (``TrackingOptions.near_gap``)."""
        o, f = self.options, self._filter
        return (gain <= o.shot_gain and bool(self._last) and 0 < t - self._last[-1].time <= o.near_gap
                and f is not None and f.frames >= o.near_frames)

    def surprise(self, t: float, pose: torch.Tensor, covariance: torch.Tensor) -> float:
        """How far the track's filter finds a frame at ``t`` s with this (4, 4) pose and (6, 6)
        covariance (``PoseUncertainty.covariance``) from what it expects: the chi-square of
        :meth:`PoseFilter.surprise` (inf without a filter); it expects the frame when this is at
        most ``uncertainty.CHI2_6DOF_95``."""
        return math.inf if self._filter is None else self._filter.surprise(t, pose, covariance)

    def match_fell(self, similarity: float) -> bool:
        """A tracked frame's final ``similarity`` is more than ``max_drop`` below that of the last
        accepted frame (see ``TrackingOptions.max_drop`` and :meth:`far`)."""
        return self._similarity is not None and similarity < self._similarity - self.options.max_drop

    def far(self, t: float, pose: torch.Tensor, detector: Detector, hessian: PoseUncertainty | None = None,
            gain: float = math.inf) -> bool:
        """A frame tracked from too far (:func:`started_far`; its similarity rose by ``gain``), not
        published: the track goes on from its pose, as from an accepted one, unless it is the
        ``max_far``-th in a row above ``shot_gain`` (a sweep of single shots: each moves further
        than tracking follows), which ends the track -> whether it ended. The match the next
        frames must keep (:meth:`match_fell`) stays the last accepted frame's: a far frame's is not
        vouched for (in a replayed sweep one ended at similarity -0.12, 59 mm off, and the frames
        tracked after it, as poor, were accepted 59-91 mm off)."""
        if self.next_far_ends(gain):
            self.reset()
            return True
        self._far = self._far + 1 if gain > self.options.shot_gain else 0
        if self._filter is not None:  # the track goes on from a pose the filter cannot weigh
            self._filter.reset()
        self._record(t, pose, detector, hessian, self._similarity)
        return False

    def _record(self, t: float, pose: torch.Tensor, detector: Detector, hessian: PoseUncertainty | None,
                similarity: float | None) -> None:
        self._similarity = similarity
        if self._last and t <= self._last[-1].time:
            self._last = []  # time went backwards (a replayed bag restarted): start over
        entry = _Accepted(float(t), pose.detach().reshape(4, 4).to("cpu", torch.float64), detector)
        self._last = [*self._last[-1:], entry]
        self._recent = entry
        if hessian is not self._hessian:
            self._hessian, self._hessian_uses = hessian, 0
        self._hessian_uses += hessian is not None

    def use_hessian(self, hessian: PoseUncertainty) -> None:
        """Serve the next tracked frames with ``hessian`` (:func:`track_hessian` of the registration
        just accepted) instead of computing one at the first of them."""
        self._hessian, self._hessian_uses = hessian, 0

    def forget_hessian(self) -> None:
        """The next tracked frame computes its own Hessian: after a rejected frame the shared one may
        no longer fit (a catch-up carries it over seconds of a turning C-arm)."""
        self._hessian, self._hessian_uses = None, 0

    def rejected(self) -> bool:
        """A frame was rejected -> whether that ended the track (``max_rejections`` in a row): then
        its successor is registered afresh, else tracked again from the last accepted frame, with a
        Hessian of its own."""
        self.forget_hessian()
        self._rejections += 1
        if self._rejections >= self.options.max_rejections:
            self.reset()
        return not self._last

    def behind(self, t: float) -> float:
        """How many s a frame at ``t`` is older than the last accepted frame (0 when newer or there
        is none)."""
        return max(self._last[-1].time - t, 0.0) if self._last else 0.0

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


def tracking_factor(detector: Detector, options: TrackingOptions = TrackingOptions()) -> float:
    """The pyramid factor tracked frames of ``detector`` are refined and assessed at."""
    return auto_scales(detector, (options.size,))[0]


def tracking_renderer(renderer: Renderer, options: TrackingOptions = TrackingOptions()) -> Renderer:
    """The renderer to track and assess tracked frames with: ``renderer`` with the options'
    ``footprint_ratio`` (it shares the volume and its levels)."""
    return renderer.with_footprint_ratio(options.footprint_ratio)


def track_hessian(renderer: Renderer, xray: Xray, reg: registration.Registration,
                  options: TrackingOptions = TrackingOptions()) -> PoseUncertainty:
    """The Hessian a track starts with (:meth:`Tracker.use_hessian`): at an accepted registration's
    (``reg``) pose, on the tracking level of its X-ray and on the pixels it scored (12 renders).

    There the similarity is at its maximum and the Hessian positive definite. At the next frame's
    prior, which after a full registration is a catch-up interval or more away (degrees), it can
    have flat or negative directions: the Newton steps then run to their cap and the gate rejects
    frames tracked well, which ends the track.
    ``renderer``: :func:`tracking_renderer`'s.
    """
    image = xray.image.to(device=renderer.device, dtype=torch.float32)
    mask = None if reg.mask is None else reg.mask.to(renderer.device)
    pose = reg.pose.to(device=renderer.device, dtype=torch.float32).reshape(1, 4, 4)
    with intra_op_threads(1):
        return pose_uncertainty(renderer, image, xray.detector, pose, mask=mask,
                                factor=tracking_factor(xray.detector, options))


def track(
    renderer: Renderer,
    xray: Xray,
    prior: torch.Tensor,
    *,
    field_of_view: torch.Tensor | None = None,
    hessian: PoseUncertainty | None = None,
    fov_margin_mm: float = 3.0,
    mask_outliers: bool = True,
    options: TrackingOptions = TrackingOptions(),
    callback=None,
) -> registration.Registration:
    """Refine ``prior`` (1, 4, 4) mm on one pyramid level of ``xray`` by damped Newton steps
    -> a :class:`Registration` with ``initial_source="tracking"``.

    Newton's method, ``xi = -H^-1 g`` in the twist about the isocenter, converges in a few renders
    from a start this close, where a first-order optimiser needs tens. ``H`` is the Hessian of
    ``-s`` (``hessian``: an earlier frame's of the track, :attr:`Tracker.hessian`, at
    :func:`tracking_factor`; else computed at the prior, 12 renders); it changes little between
    frames, and the steps only need its shape. A step that does not improve the similarity is
    halved; steps are capped at ``options.max_step_*``. The result carries it
    (``Registration.uncertainty``): the assessment carries it to the refined pose
    (``quality.assess``) and the tracker keeps it for the next frames.

    ``renderer``: :func:`tracking_renderer` of the full path's (finer volume levels).

    ``field_of_view``: (1, 1, H, W) bool, the field of view of an earlier frame of the track
    (the collimator does not move between fluoroscopy frames; its detection costs more than
    a tracked refinement); None = detect it in this frame. The scored pixels are made from it
    as :func:`registration.register` makes them (margin, metal left out). ``callback(dict)``
    returning True stops the refinement (as :func:`refine.refine`'s).
    """
    t0 = time.perf_counter()
    fov = registration.field_of_view(xray) if field_of_view is None else field_of_view
    mask = registration.scored_pixels(xray, fov, fov_margin_mm, mask_outliers)
    mask = None if mask is None else mask.to(renderer.device)
    pose = prior.to(device=renderer.device, dtype=torch.float32).reshape(1, 4, 4)
    image = xray.image.to(device=renderer.device, dtype=torch.float32)
    factor = tracking_factor(xray.detector, options)
    with intra_op_threads(1):
        if hessian is None or hessian.factor != factor:
            hessian = pose_uncertainty(renderer, image, xray.detector, pose, mask=mask, factor=factor)
        objective = IsocenterObjective(renderer, image, xray.detector, pose, mask=mask, factor=factor)
        # The budget is the Newton steps': a track's first frame, which computes the Hessian, must
        # not be cut short for it (the quality model reads an unconverged refinement as doubtful).
        result = _newton(objective, hessian.hessian_isocenter, options, time.perf_counter(), callback)
    result.pose = result.pose.to(pose)
    result.init_pose = pose
    return registration.Registration(pose, result, "tracking", time.perf_counter() - t0, fov, mask,
                                     uncertainty=hessian)


def finished(full: registration.Registration, tracked: registration.Registration) -> registration.Registration:
    """A full registration finished on the tracking level: ``full`` with the pose that
    :func:`track` from its pose, on the same X-ray, reached (``tracked``), and the Hessian that
    refinement used (``uncertainty``, at ``full``'s pose: it serves the track's first frames).

    The full path's finest level renders coarser voxels than the tracking level (for the demo CT
    at 512 px: 96 px of 2.8 mm against 64 px of 2.1 mm), which bias the depth, which its quality
    model does not see, and a track would start from that bias. A caller takes the finished pose
    only when the tracking quality model accepts ``tracked``.
    """
    refinement = dataclasses.replace(
        full.refinement, pose=tracked.pose.to(full.pose),
        message=f"{full.refinement.message}; finished on the tracking level ({tracked.refinement.message})")
    return dataclasses.replace(full, refinement=refinement, uncertainty=tracked.uncertainty)


def similarity_gain(reg: registration.Registration) -> float:
    """How much a :func:`track` result's similarity rose from its prior's."""
    result = reg.refinement
    return float(result.similarity[0]) - float(result.trajectory[0][0])


def correction(renderer: Renderer, reg: registration.Registration) -> tuple[float, float]:
    """How far a :func:`track` result moved from its prior, about the volume's isocenter ->
    (translation mm, rotation deg): a C-arm turning about the isocenter moves by the rotation alone."""
    refinement = reg.refinement
    xi = isocenter_twist(renderer, refinement.init_pose.reshape(4, 4), refinement.pose.reshape(4, 4))
    return float(xi[:3].norm()), math.degrees(float(xi[3:].norm()))


def started_far(reg: registration.Registration, options: TrackingOptions) -> bool:
    """A :func:`track` result whose similarity rose by more than ``options.max_gain`` from its prior:
    the prior was further than tracking follows, and the depth lags (see ``TrackingOptions.max_gain``)."""
    return similarity_gain(reg) > options.max_gain


def finish(renderer: Renderer, xray: Xray, full: registration.Registration,
           options: TrackingOptions = TrackingOptions(), callback=None) -> registration.Registration:
    """:func:`track` of ``xray`` from the full registration's pose, with its field of view and a
    caught-up frame's time budget: the refinement :func:`finished` takes the pose of, when the
    tracking quality model accepts it. ``renderer``: :func:`tracking_renderer`'s."""
    budget = dataclasses.replace(options, time_budget=CATCH_UP_TIME_FACTOR * options.time_budget)
    return track(renderer, xray, full.pose, field_of_view=full.field_of_view, options=budget, callback=callback)


def screen(reg: registration.Registration, tracker: Tracker, t: float | None = None) -> str:
    """Why the tracked frame ``reg`` (at ``t`` s) is not for the quality gate alone:
    ``"unfinished"`` (cut short by its time budget, :func:`unfinished`), ``"far"``
    (:func:`started_far`), ``"near"`` (started far, but :meth:`Tracker.near`: the gate and the
    filter judge it), ``"fell"`` (its match fell below the frame it was tracked from,
    :meth:`Tracker.match_fell`), or ``""``."""
    options = tracker.options
    if unfinished(reg, options):
        return "unfinished"
    fell = tracker.match_fell(float(reg.refinement.similarity[0]))
    if started_far(reg, options):
        return "near" if not fell and t is not None and tracker.near(t, similarity_gain(reg)) else "far"
    return "fell" if fell else ""


def unfinished(reg: registration.Registration, options: TrackingOptions) -> bool:
    """A :func:`track` result stopped by its time budget (or its caller) before it converged or
    reached ``options.max_iterations`` renders. Its pose is refined partly or not at all (on a
    busy CPU one render can outlast the budget: the prior itself, 3 mm off, came out), and the
    tracking quality model, fitted on refinements capped by renders, has not seen such a stop."""
    result = reg.refinement
    return not bool(result.converged[0]) and result.iterations < options.max_iterations


def _newton(objective: IsocenterObjective, H: torch.Tensor, options: TrackingOptions, t0: float,
            callback) -> RefineResult:
    """Damped Newton ascent of the similarity from the objective's centre, the prior (see :func:`track`)."""
    inverse, _ = covariance_from_hessian(H, 1.0, MAX_SD)
    curvature = torch.linalg.inv(inverse)  # H made positive definite, as the steps use it
    xi = torch.zeros(1, 6, dtype=torch.float64)
    loss, g = objective(xi)
    trajectory, renders, converged, why = [-loss.float()], 1, False, "iteration cap"
    step = _trust(-(inverse @ g[0]), options)
    while renders < options.max_iterations:
        if time.perf_counter() - t0 > options.time_budget:
            why = "time budget"
            break
        if _small(step, options) or _gain(step, g, curvature) < options.min_gain or _plateau(trajectory, options):
            converged, why = True, "converged"
            break
        trial_loss, trial_g = objective(xi + step)
        renders += 1
        trajectory.append(-trial_loss.float())
        if float(trial_loss[0]) <= float(loss[0]):
            xi, loss, g = xi + step, trial_loss, trial_g
            step = _trust(-(inverse @ g[0]), options)
        else:
            step = step / 2  # the quadratic model overshot: back-track along the same direction
        if callback is not None and callback({"iteration": renders, "scale": objective.factor,
                                              "pose": objective.poses(xi), "similarity": -loss}):
            why = "stopped by the caller"
            break
    seconds = time.perf_counter() - t0
    return RefineResult(
        pose=objective.poses(xi), init_pose=objective.center[None], similarity=-loss.float(),
        trajectory=trajectory, trajectory_scale=[objective.factor] * len(trajectory), iterations=renders,
        time_per_scale={objective.factor: seconds}, scales=(objective.factor,),
        converged=torch.tensor([converged]), message=f"tracking: {renders} renders, {why}",
    )


def _trust(step: torch.Tensor, options: TrackingOptions) -> torch.Tensor:
    """(6,) Newton step -> (1, 6), shrunk to the trust region."""
    shrink = min(1.0, options.max_step_mm / max(float(step[:3].norm()), 1e-12),
                 options.max_step_rad / max(float(step[3:].norm()), 1e-12))
    return (step * shrink)[None]


def _gain(step: torch.Tensor, g: torch.Tensor, H: torch.Tensor) -> float:
    """The similarity gain the quadratic model ``-(g.s + s.H.s / 2)`` predicts for the (1, 6) step ``s``."""
    s = step[0].to(H)
    return -float(g[0].to(H) @ s + 0.5 * s @ H @ s)


def _plateau(trajectory: list[torch.Tensor], options: TrackingOptions) -> bool:
    """The best similarity of the (1,) ``trajectory`` rose by less than ``options.plateau_tolerance``
    over its last ``options.plateau_renders`` renders."""
    if len(trajectory) <= options.plateau_renders:
        return False
    best = torch.cat(trajectory).cummax(0).values
    return float(best[-1] - best[-1 - options.plateau_renders]) < options.plateau_tolerance


def _small(step: torch.Tensor, options: TrackingOptions) -> bool:
    return float(step[0, :3].norm()) < options.tolerance_mm and float(step[0, 3:].norm()) < options.tolerance_rad
