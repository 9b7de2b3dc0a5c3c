"""``refiner`` node: X-ray + CameraInfo + initial pose -> refined pose, its verdict, TF and an overlay.

Inputs: ``sensor_msgs/Image`` and ``sensor_msgs/CameraInfo`` (reliability as offered, parameter
``image_qos``), the pose estimator's ``geometry_msgs/PoseWithCovarianceStamped`` (all three paired
by header stamp), the stamps the pose estimator dropped (``std_msgs/Header``: such a frame is
released at once instead of waiting ``pairing_timeout`` for its initial pose) and
``xvr_ros/ModelInfo`` (transient local: which volume to render). Outputs, stamped with the image's
stamp:

- ``xvr_ros/RegistrationResult`` for every registration (initial and refined pose of the C-arm
  source optical frame in the volume frame, metres, the refined one with its covariance;
  similarities, iterations, time, converged, the verdict ``accepted`` / ``p_success`` /
  ``rejection_reason``, ``dropped``: frames dropped by either node since the previous result, and
  a status text);
- for *accepted* registrations only: the refined pose with its covariance
  (``geometry_msgs/PoseWithCovarianceStamped`` on ``refined_pose_topic``) and the TF
  ``volume frame -> source optical frame`` as ``tf2_msgs/TFMessage`` on ``/tf`` (what
  ``tf2_ros.TransformBroadcaster`` does: QoS depth 100), consistent with the ``CameraInfo``. A
  rejected registration publishes neither (a TF consumer keeps the last accepted transform, whose
  stamp says how old it is; nothing is republished as if new) and is a WARN on ``/diagnostics``
  with the reason (``outcome=rejected``);
- an ``rgb8`` overlay ``sensor_msgs/Image`` for RViz: the X-ray with the edges of the DRR rendered
  at the refined pose (green) and the boundary of the scored field of view (orange): the core's
  one overlay (``core.imaging.registration_overlay``, as ``xvr-ros register`` draws it), rendered
  only while someone subscribes, at most every ``overlay_period``, on a thread of its own (the
  next frame's refinement does not wait for it; a newer request replaces one still waiting);
- the stamp of every frame that gets no result (dropped here or upstream), ``std_msgs/Header`` on
  ``dropped_topic``: results + these stamps account for every frame once.

The refinement (``core.registration.register``) renders at the image's original intrinsics under
a time budget, in a worker thread; then ``core.register.quality`` assesses it (a calibrated
covariance and ``p_success``, the probability that the pose is within 1 mm mTRE, from one batched
render at the refinement's finest scale) and it is accepted when ``p_success >= accept_threshold``
(``tracking_accept_threshold`` for a tracked frame, assessed by the tracking quality model). The
gate also decides whether a full registration's multi-start runs (parameter ``multistart``): only
when the initial pose's refinement ends with a poor similarity *and* is rejected (on noisy frames
a refinement in the capture range ends below the similarity threshold too). The
quality models are loaded once at start; if they cannot be, the node reports ERROR on
``/diagnostics`` and accepts nothing (results still flow, with ``accepted`` false).

**Tracking** (continuous fluoroscopy, parameter ``tracking``): a frame that arrives within
``tracking_max_gap`` of the last *accepted* one, with the same intrinsics, does not wait for the
network: it is refined from the last accepted pose moved at the last velocity
(``core.register.tracking``: a few Newton steps on the pyramid level of ``tracking_size`` px,
shaped by the last frame's Hessian, within ``tracking_time_budget``), reusing the field of view
detected on the track's first frame (the collimator does not move between frames), and assessed
as any other. The full path runs
instead (and the result's ``status`` says why) for the first frame, after a rejection, after a
gap, when the intrinsics change (zoom, pan), or when the network's latest estimate lies beyond
``tracking_max_jump_rotation`` / ``tracking_max_jump_translation`` of the tracked pose (the
C-arm moved to another view). ``RegistrationResult.path`` says which path produced the pose.
A tracked frame whose similarity rose by more than ``TrackingOptions.max_gain`` from its prior
started further than tracking follows (single shots of a sweep, the first live frame after a
catch-up): its depth lags, so it is rejected without a TF, and the track goes on from its pose;
the second such frame in a row ends the track and takes the full path itself. One that rose by
at most ``tracking_shot_gain`` within ``tracking_near_gap`` of an accepted frame is judged by the
gate instead, and published when the track's filter expects its pose. A tracked frame
whose final similarity fell more than ``tracking_max_drop`` below the last accepted frame is
rejected (another view, or a local optimum).
With tracking on, an accepted full registration is finished on the tracking level (Newton steps
from its pose on the same frame; its finest level's coarser voxels bias the depth) and published
with the finished pose when the tracking quality model accepts that refinement (``status`` says
so), else as it was; the track goes on from the published pose. With ``tracking_coarse_start``
(the default) the full registration stops a scale before its finest (about half of a cold
start's time: the finishing refines on its own level), is judged by the coarse quality model
(fitted on such registrations for the finished pose's mTRE) and is rejected unless the tracking
model accepts its finishing too. With ``tracking_filter`` (the default) the accepted frames of a
track are fused by a constant-velocity Kalman filter (``core.register.pose_filter``) and the
filtered pose and covariance are published (``status`` says over how many frames); the next frame still starts
from the frames' own poses.

Only the newest input is worked on: while a refinement runs, a newer complete input replaces the
waiting one (a queue of one) and every replaced input is reported as a drop (WARN on
``/diagnostics`` with ``outcome=superseded``, counted in the next result); so is, with tracking
on, a frame that newer tracked frames overtook (up to ``STALE_S`` older than the last accepted). Bad input never stops
the node: it is logged, reported on ``/diagnostics`` (ERROR, ``outcome=refused``) and dropped.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from geometry_msgs.msg import PoseWithCovarianceStamped
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from xvr_ros.core.imaging import registration_overlay
from xvr_ros.core.io.volume import load_volume
from xvr_ros.core.register.quality import (
    MODEL_PATHS,
    QualityModel,
    QualityModelError,
    assess_registration,
    load_model,
)
from xvr_ros.core.register.refine import intra_op_threads, refine
from xvr_ros.core.register.registration import MULTISTART_OFFSETS, Registration, coarse_scales, register
from xvr_ros.core.register.tracking import (
    CATCH_UP_TIME_FACTOR,
    Tracker,
    TrackingOptions,
    correction,
    finish,
    finished,
    screen,
    similarity_gain,
    started_far,
    track,
    track_hessian,
    tracking_renderer,
)
from xvr_ros.core.register.uncertainty import CHI2_6DOF_95, world_axes_covariance
from xvr_ros.core.render import _ext
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.msg import ModelInfo, RegistrationResult
from xvr_ros.ros import convert, qos
from xvr_ros.ros.pipeline import (
    IMAGE_NODE_PARAMETERS,
    TRACKING_FRESH,
    ImageNode,
    LatestWorker,
    Param,
    Pending,
    declare_parameters,
    file_key,
)

__all__ = ["PARAMETERS", "Refiner", "main"]

#: Read once at start-up (read-only parameters).
PARAMETERS: dict[str, Param] = {
    **IMAGE_NODE_PARAMETERS,
    "initial_pose_topic": Param(
        "xray/initial_pose", "geometry_msgs/PoseWithCovarianceStamped input from the pose estimator"
    ),
    "initial_pose_dropped_topic": Param(
        "xray/initial_pose/dropped", "std_msgs/Header input: stamps the pose estimator dropped (released at once)"
    ),
    "dropped_topic": Param(
        "xray/registration/dropped", "std_msgs/Header output: the stamp of every frame that gets no result"
    ),
    "model_info_topic": Param("xvr/model_info", "xvr_ros/ModelInfo input (transient local): the volume to render"),
    "result_topic": Param("xray/registration", "xvr_ros/RegistrationResult output"),
    "overlay_topic": Param(
        "xray/overlay", "sensor_msgs/Image output (rgb8): the X-ray with the registered DRR's edges"
    ),
    "tf_topic": Param("/tf", "tf2_msgs/TFMessage output (dynamic TF): accepted registrations only"),
    "refined_pose_topic": Param(
        "xray/refined_pose",
        "geometry_msgs/PoseWithCovarianceStamped output: the refined pose with its covariance, accepted "
        "registrations only",
    ),
    "accept_threshold": Param(
        0.5,
        "a registration is accepted (TF published) when its p_success, the calibrated probability of mTRE < 1 mm, "
        "is at least this; unset = the quality model file's threshold; 0 = accept every registration",
        low=0.0,
        high=1.0,
    ),
    "volume_frame": Param("volume", "TF parent frame and frame_id of the result: the CT/MR volume's frame"),
    "source_frame": Param(
        "carm_source_optical", "TF child frame: the C-arm source's optical frame (the CameraInfo's frame)"
    ),
    "device": Param("cpu", "torch device for rendering (cpu, cuda, ...)"),
    "time_budget": Param(10.0, "s allowed for the refinement of one image (0 = no limit)", low=0.0, high=3600.0),
    "max_iterations": Param(500, "iteration cap of the refinement (count)", low=0, high=100000),
    "scales": Param(
        [],
        "refinement downsampling factors, coarsest first (e.g. [16., 8., 4., 2.]); "
        "[] = the core's choice for the image size",
        items=float,
    ),
    "labelmap": Param("", "label map file of the volume (same grid); empty = none"),
    "labels": Param([], "render only these labels (needs labelmap); [] = the whole volume", items=int),
    "multistart": Param(
        True,
        "when a refinement ends with a poor similarity and the quality gate rejects it, try the initial pose turned "
        "by +-15 deg (LAO/RAO) and +-10 deg (CRA/CAU) on the two coarsest scales and refine again from the best "
        "(widens the capture range; costs time only for poor starts)",
    ),
    "mask_clipped": Param(
        True,
        "leave pixels at the image's extreme value (shutters delivered as a constant, saturation; "
        "when they cover >= 0.5 % of it) out of the similarity",
    ),
    "detect_fov": Param(
        True,
        "score only the detected field of view (collimator blades, image-intensifier circle, clipped values, "
        "burned-in text), a few mm inside its edges; false = only pixels the image itself marks invalid",
    ),
    "hu_to_mu": Param(
        "linear", "CT HU -> attenuation mapping used to load the volume", choices=("linear", "diffdrr")
    ),
    "pairing_timeout": Param(
        5.0, "s an image waits for its CameraInfo and initial pose before it is dropped", low=0.01, high=3600.0
    ),
    "tracking": Param(
        True,
        "continuous fluoroscopy: a frame within tracking_max_gap of the last accepted one, with the same intrinsics, "
        "is refined from that pose (extrapolated) on the finest scales only, then accepted or rejected as any other; "
        "false = every frame takes the full path (network start, multi-start if needed, coarse to fine)",
    ),
    "tracking_max_gap": Param(
        10.0, "s after the last accepted frame within which the next one is tracked", low=0.01, high=600.0
    ),
    "tracking_max_jump_rotation": Param(
        0.8,
        "rad: a network estimate this far (rotation) from the tracked pose means the view changed: full path; "
        "0 = no rotation check (a nearer view change fails the tracked frame's gate instead, one frame later)",
        low=0.0,
        high=3.1416,
    ),
    "tracking_max_jump_translation": Param(
        0.25,
        "m: a network estimate this far (C-arm translation) from the tracked pose means the view changed: full path; "
        "0 = no translation check",
        low=0.0,
        high=10.0,
    ),
    "tracking_coarse_start": Param(
        True,
        "with tracking on, a full registration stops a scale before the finest (the tracking level finishes it; "
        "about half its time), is judged by the coarse quality model (coarse_accept_threshold) and its finished "
        "pose by the tracking model, and is rejected unless both accept; false = the finest scale too, judged by the "
        "full model, and finished when the tracking model accepts",
    ),
    "coarse_accept_threshold": Param(
        0.5,
        "a full registration stopped a scale early (tracking_coarse_start) is accepted when its p_success (the coarse "
        "quality model's, for the finished pose's mTRE < 1 mm) is at least this; unset = that model file's "
        "threshold; 0 = accept every one",
        low=0.0,
        high=1.0,
    ),
    "tracking_extrapolate": Param(True, "start a tracked frame from the last pose moved at the last velocity"),
    "tracking_filter": Param(
        True, "fuse a track's accepted frames with a constant-velocity Kalman filter, each weighed by its covariance: "
        "the filtered pose is published (a single tracked frame's depth scatters by a millimetre or two)"),
    "tracking_filter_acceleration": Param(
        0.003, "m / s^1.5: the filter's white-noise acceleration per axis (how quickly the table, breathing or the "
        "C-arm may change speed; smaller smooths more and lags more)", low=1e-6, high=10.0),
    "tracking_filter_angular_acceleration": Param(
        0.1, "rad / s^1.5: the filter's white-noise angular acceleration per axis", low=1e-6, high=100.0),
    "tracking_size": Param(
        64, "px: long side of the pyramid level a tracked frame is refined and assessed on", low=8, high=4096
    ),
    "tracking_time_budget": Param(
        0.25, "s allowed for the Newton steps of a tracked frame (a new Hessian, every 24 frames, comes on top; a "
        "frame stopped by it is rejected as unrefined, without ending the track; caught-up frames have 4 times it)",
        low=0.01, high=60.0),
    "tracking_accept_threshold": Param(
        0.5,
        "a tracked frame is accepted when its p_success (the tracking quality model's) is at least this; unset = "
        "that model file's threshold; 0 = accept every tracked frame",
        low=0.0,
        high=1.0,
    ),
    "tracking_max_rejections": Param(
        1, "rejected frames in a row that end a track (until then the next frame is tracked again from the last "
        "accepted one; then the full path runs)", low=1, high=1000
    ),
    "tracking_max_gain": Param(
        0.005,
        "a tracked frame whose similarity rose by more than this from its prior started further than tracking follows "
        "(its depth lags): rejected without a TF, the track goes on from it; the second in a row above "
        "tracking_shot_gain ends the track and takes the full path",
        low=1e-6,
        high=2.0,
    ),
    "tracking_shot_gain": Param(
        0.02,
        "a frame tracked from too far whose similarity rose by more than this is another shot (a sweep of single "
        "shots): two in a row end the track; below it, a fluoroscopy frame after frames a busy CPU skipped: the "
        "track goes on (>= tracking_max_gain)",
        low=1e-6,
        high=2.0,
    ),
    "tracking_near_gap": Param(
        0.3, "s: a frame tracked from too far whose similarity rose by at most tracking_shot_gain, this soon after the "
        "last accepted frame while the track's filter runs (3 frames fused), is judged by the quality model and "
        "published when that accepts it and the filter expects its pose (fluoroscopy frames after skipped ones); "
        "0 = such frames are withheld as tracked from too far", low=0.0, high=10.0),
    "tracking_max_drop": Param(
        0.05,
        "a tracked frame whose final similarity is more than this below that of the last accepted frame "
        "(consecutive fluoroscopy frames: under 0.002) is rejected: another view, or stuck in a local optimum",
        low=1e-6,
        high=2.0,
    ),
    "tracking_catch_up_interval": Param(
        0.6,
        "s: the frames superseded while a full registration ran (seconds, while the C-arm moves) are tracked "
        "after it, one per this interval (or per twice a caught-up frame's cost, when longer: it must gain on the "
        "stream), without results (they were dropped), so that the next frame starts from where the C-arm is now; "
        "after a rejected one, one halfway back; 0 = off",
        low=0.0,
        high=10.0,
    ),
    "tracking_wait_for_network": Param(
        False,
        "a tracked frame waits for its own initial pose (the jump check sees this frame's network estimate); "
        "false = it starts as soon as image and CameraInfo are in, checked against the latest network estimate "
        "(true: set the pose estimator's tracking_estimate_period to 0, else the frames it skips are dropped)",
    ),
    "publish_overlay": Param(True, "publish the overlay image (rendered only while someone subscribes)"),
    "overlay_period": Param(
        0.5,
        "s: at most one overlay per this period (rendering one costs about as much as tracking a frame); 0 = every "
        "registration",
        low=0.0,
        high=3600.0,
    ),
    "overlay_max_size": Param(
        256,
        "px: the overlay's DRR is rendered at most this large (then upsampled; its cost grows with the square and "
        "more: 512 px took 0.7 s here, as long as 5-7 tracked frames)",
        low=16,
        high=65536,
    ),
}

_KINDS = ("image", "camera_info", "initial_pose")
#: The overlay shows a DRR's edges to the eye: it is rendered from volume levels of up to this
#: many pixel footprints (the full path's finest scale uses 1.5), 2x faster (a 256 px overlay of
#: a 512 px detector: 111 -> 56 ms), on a thread of its own (the next frame need not wait for it).
OVERLAY_FOOTPRINT_RATIO = 3.0
#: Frames kept per catch-up interval (:meth:`Refiner.superseded`): the catch-up tracks one per
#: interval, and after a rejected one the kept frame nearest halfway back to the last accepted
#: (the C-arm moved further than one tracked step reaches; in a 15 frames/s, 256 px replay a
#: frame 0.73 s on ran to the iteration cap and was rejected, ending the catch-up).
CATCH_UP_FRAMES_PER_INTERVAL = 3
#: Frames kept to catch up on after a full registration: 19.2 s at the default 0.6 s interval,
#: longer than a full registration on a CPU.
MAX_CATCH_UP_FRAMES = 32 * CATCH_UP_FRAMES_PER_INTERVAL
#: Caught-up frames rejected in a row that end the track (a rejected one is skipped: the gate
#: rejected frames 0.1-0.8 mm off at p 0.93-0.957 in the replays, each ending a track).
CATCH_UP_MAX_REJECTIONS = 2
#: The kept frames' interval is at least this many times a caught-up frame's cost: the catch-up
#: then gains on the stream (one frame tracked per interval of it), and ends.
CATCH_UP_GAIN = 2.0
#: s a destroyed refiner waits for its kernel warm-up, so that the warm-up does not report on a
#: node being torn down (a cached load takes ~0.1 s).
WARM_JOIN_S = 2.0
#: s: with tracking on, a frame at most this much older than the last accepted one is dropped as
#: superseded (:meth:`Refiner._stale`); further back, the stream restarted.
STALE_S = 2.0
#: The acceptance threshold parameter of each path's quality model.
_THRESHOLDS = {"accept_threshold": "full", "coarse_accept_threshold": "coarse",
               "tracking_accept_threshold": "tracking"}


@dataclass
class _Volume:
    renderer: Renderer  # the full path's
    tracking_renderer: Renderer  # the same volume, finer levels (core.register.tracking.tracking_renderer)
    overlay_renderer: Renderer  # the same volume, coarser levels (OVERLAY_FOOTPRINT_RATIO)
    path: str
    key: Any

    def for_path(self, path: str) -> Renderer:
        """The renderer a registration of ``path`` ("full" or "tracking") was made and is assessed with."""
        return self.tracking_renderer if path == "tracking" else self.renderer


@dataclass
class _Outcome:
    """One frame's registration, by either path."""

    registration: Registration
    path: str  # "full" or "tracking"
    start_similarity: float  # at the pose it started from, finest scale
    initial: Any  # geometry_msgs/PoseWithCovariance: where it started (network's, or the tracked prior)
    note: str = ""  # why the full path ran when tracking was on; a tracked frame's catch-up before it
    coarse: bool = False  # a full registration stopped a scale early (parameter tracking_coarse_start)
    t: float = math.nan  # a tracked frame's stamp, s

    @property
    def model(self) -> str:
        """The quality model (and accept threshold) that judges it: "full", "coarse" or "tracking"."""
        return "coarse" if self.coarse else self.path


@dataclass
class _Verdict:
    accepted: bool
    p_success: float
    reason: str  # one line, for the result and /diagnostics
    covariance: Any  # (6, 6) mm / rad, uncertainty.PoseUncertainty's convention (C-arm axes), or None (unknown)
    judged: bool = True  # False: not assessed (a tracked frame cut short by its time budget), not the track's rejection
    far: bool = False  # a tracked frame that started too far (tracking.started_far): the track goes on from it


class Refiner(ImageNode):
    """The ``refiner`` node (see the module docstring). ``kwargs`` go to ``rclpy.node.Node``
    (``parameter_overrides``, ``context``, ``namespace``, ...)."""

    def __init__(self, node_name: str = "refiner", **kwargs):
        super().__init__(node_name, **kwargs)
        self._quality, self._quality_error = self._load_quality_models()
        p = self.params = declare_parameters(self, self._parameter_table())
        self._scales, self._labels = tuple(p["scales"]), p["labels"]
        if self._scales and (min(self._scales) < 1 or any(b >= a for a, b in zip(self._scales, self._scales[1:]))):
            raise ValueError(f"parameter scales must be >= 1 and strictly decreasing, got {list(p['scales'])}")
        self._volume: _Volume | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._warned_frames: set[str] = set()
        self._tracker = Tracker(self._tracking_options())
        self._track_fov = None  # the field of view of the track's first frame (the collimator stays put)
        self._network_msg: PoseWithCovarianceStamped | None = None  # the latest network estimate
        self._track_lock = threading.Lock()
        self._last_overlay = -math.inf  # time.monotonic() of the last overlay
        self._early: set = set()  # stamps released to be tracked before their initial pose came
        self._needs_network: set = set()  # stamps released early that must wait for their initial pose after all
        self._upstream_dropped: dict = {}  # stamps (keys) the pose estimator dropped or skipped, to decide here
        self._tracked_at = -math.inf  # time.monotonic() of the last accepted tracked result
        self._catching_up = False  # a full registration runs: superseded frames are kept to catch up on
        self._skipped: list[tuple[float, Pending]] = []  # (stamp s, entry), CATCH_UP_FRAMES_PER_INTERVAL per interval
        self._catch_up_note = ""  # for the next tracked frame's result (worker thread only)
        self._last_kept = -math.inf  # stamp (s) of the last frame kept to catch up on
        self._catch_up_cost = 0.0  # s, the last caught-up frame's tracking and assessment
        self._cut_short = False  # the last tracked frame stopped on its time budget (worker thread only)
        self._gated: tuple | None = None  # (refinement, _Verdict) of the gate during a full registration (worker)
        self._result_pub = self.create_publisher(RegistrationResult, p["result_topic"], 10)
        self._tf_pub = self.create_publisher(TFMessage, p["tf_topic"], qos.TF)
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, p["refined_pose_topic"], 10)
        self._overlay_pub = self.create_publisher(Image, p["overlay_topic"], 2) if p["publish_overlay"] else None
        self._overlay_worker = LatestWorker(self._render_overlay, f"{node_name}-overlay", self._on_overlay_error)
        self._releases_early = p["tracking"] and not p["tracking_wait_for_network"]
        early = self._trackable if self._releases_early else None
        self.start_pipeline(_KINDS, p["pairing_timeout"], self._load_volume, self._refine, "a refinement", early)
        self.create_subscription(PoseWithCovarianceStamped, p["initial_pose_topic"], self._on_initial_pose, 10)
        self.create_subscription(Header, p["initial_pose_dropped_topic"], self._on_upstream_drop, qos.DROPPED)
        self._set_state("WARN", f"no volume loaded yet (waiting for ModelInfo on {p['model_info_topic']})")
        # Compile (or load) the render kernels now, beside the volume loading, not in the first refinement.
        self._warm_thread = threading.Thread(target=self._warm_kernels, name=f"{self.get_name()}-warm", daemon=True)
        self._warm_thread.start()

    def _load_quality_models(self) -> tuple[dict[str, QualityModel], str]:
        """({path: model}, "") or ({}, why: the message of the node's standing ERROR)."""
        try:
            return {path: load_model(file) for path, file in MODEL_PATHS.items()}, ""
        except QualityModelError as exc:
            return {}, f"no quality model ({exc}): no registration can be accepted, no TF is published"

    def _parameter_table(self) -> dict[str, Param]:
        """:data:`PARAMETERS`, with the quality models' thresholds as the accept thresholds' defaults."""
        if not self._quality:
            return PARAMETERS
        defaults = {name: float(self._quality[path].threshold) for name, path in _THRESHOLDS.items()}
        return {**PARAMETERS, **{n: dataclasses.replace(PARAMETERS[n], default=v) for n, v in defaults.items()}}

    def _tracking_options(self) -> TrackingOptions:
        p = self.params
        return TrackingOptions(
            max_gap=p["tracking_max_gap"],
            max_jump_deg=math.degrees(p["tracking_max_jump_rotation"]) or None,
            max_jump_mm=convert.m_to_mm(p["tracking_max_jump_translation"]) or None,
            extrapolate=p["tracking_extrapolate"],
            size=p["tracking_size"],
            max_rejections=p["tracking_max_rejections"],
            max_gain=p["tracking_max_gain"],
            shot_gain=max(p["tracking_shot_gain"], p["tracking_max_gain"]),
            max_drop=p["tracking_max_drop"],
            time_budget=p["tracking_time_budget"],
            filter=p["tracking_filter"],
            filter_acceleration_mm=convert.m_to_mm(p["tracking_filter_acceleration"]),
            filter_acceleration_rad=p["tracking_filter_angular_acceleration"],
            near_gap=p["tracking_near_gap"],
        )

    def _set_state(self, level: str, message: str, **kv) -> None:
        """The standing status; ERROR, naming the cause, while there is no quality model."""
        if self._quality_error:
            level, message = "ERROR", f"{message}; {self._quality_error}"
        self.diagnostics.set_state(level, message, **kv)

    def _warm_kernels(self) -> None:
        t0 = time.perf_counter()
        kernels = _ext.warm()
        if self._stopping.is_set():
            return
        fallback = [k for k in kernels.values() if not k.available]
        self.diagnostics.report(
            "WARN" if fallback else "OK",
            "render kernels: " + "; ".join(map(str, kernels.values())),
            {f"kernel_{name}": k.state + (f": {k.reason}" if k.reason else "") for name, k in kernels.items()},
            warm_time_s=time.perf_counter() - t0,
        )

    # ---- callbacks: hand work on (image, CameraInfo and ModelInfo: ImageNode's) --------------
    def _on_initial_pose(self, msg: PoseWithCovarianceStamped) -> None:
        self._network_msg = msg  # the latest estimate, for tracking's jump check
        self.pair("initial_pose", msg)

    def _on_upstream_drop(self, msg: Header) -> None:
        key = convert.stamp_key(msg.stamp)
        if key in self._early:
            self._note_upstream_drop(key)  # tracked without the pose estimator's answer: answered here
            return
        # While this node tracks, the pose estimator skips frames (tracking_estimate_period) without a
        # report: such a frame is decided once it is paired (tracked, or dropped with a report).
        skipped = time.monotonic() - self._tracked_at < TRACKING_FRESH + 1.0
        if skipped and key not in self._needs_network and self._releases_early:
            self._note_upstream_drop(key)
            return
        # Else the pose estimator reported it: counted and passed on here, not reported twice.
        self.drop(key, "upstream", "dropped (or skipped) by the pose estimator", report=skipped)

    def _note_upstream_drop(self, key) -> None:
        self._upstream_dropped[key] = None
        while len(self._upstream_dropped) > 1000:  # frames never paired (lost images) are forgotten
            del self._upstream_dropped[next(iter(self._upstream_dropped))]

    # ---- worker: volume loading --------------------------------------------------------------
    def _load_volume(self, info: ModelInfo) -> None:
        p = self.params
        for field_name, param in (("volume_frame", "volume_frame"), ("source_frame", "source_frame")):
            announced = getattr(info, field_name)
            if announced and announced != p[param]:
                self.diagnostics.warn(
                    f"ModelInfo names {field_name} {announced!r} but this node uses {p[param]!r} (parameter {param})"
                )
        path = info.volume_path
        if not path:
            self._set_volume(None)
            self._set_state("WARN", "ModelInfo names no volume (empty volume_path): no volume loaded")
            return
        key = (file_key(path), info.volume_sha256, p["labelmap"])
        with self._lock:
            current = self._volume
        if current is not None and key[0] is not None and current.key == key:
            return  # the same volume re-announced
        t0 = time.perf_counter()
        try:
            volume = load_volume(path, p["labelmap"] or None, hu_to_mu=p["hu_to_mu"])
            renderer = Renderer(volume, labels=self._labels or None, device=p["device"])
            renderer.build_levels()  # here, not seconds into the first registrations
        except Exception as exc:  # noqa: BLE001 - any unreadable volume is reported, never fatal
            self._set_volume(None)
            self._set_state("ERROR", f"cannot load volume {path}: {exc}; no volume loaded", volume_path=path)
            return
        self._set_volume(_Volume(renderer, tracking_renderer(renderer, self._tracker.options),
                                 renderer.with_footprint_ratio(OVERLAY_FOOTPRINT_RATIO), path, key))
        mismatch = bool(info.volume_sha256 and volume.sha256 and info.volume_sha256 != volume.sha256)
        self._set_state(
            "WARN" if mismatch else "OK",
            f"volume loaded: {path}" + (" (its sha256 differs from the ModelInfo's)" if mismatch else ""),
            volume_path=path,
            shape="x".join(map(str, volume.shape)),
            load_time_s=time.perf_counter() - t0,
        )

    def _set_volume(self, volume: _Volume | None) -> None:
        with self._lock:
            self._volume = volume
        with self._track_lock:  # poses of the track were in the volume's frame
            self._tracker.forget()
            self._track_fov = None

    # ---- worker: refinement -------------------------------------------------------------------
    def _refine(self, entry: Pending) -> None:
        try:
            self._refine_frame(entry)
        finally:
            with self._track_lock:  # caught up, or the full registration failed: nothing more to keep
                self._catching_up, self._skipped = False, []
            self._early.discard(entry.key)
            self._upstream_dropped.pop(entry.key, None)
            if "initial_pose" in entry.parts:
                self._needs_network.discard(entry.key)

    def _refine_frame(self, entry: Pending) -> None:
        p = self.params
        info, initial = entry.parts["camera_info"], entry.parts.get("initial_pose")
        with self._lock:
            volume = self._volume
        if volume is None:
            self.drop(
                entry.key,
                "no_model",
                f"no volume loaded (waiting for a loadable ModelInfo on {p['model_info_topic']})",
                "ERROR",
            )
            return
        self._warn_frame_id(info.header.frame_id)
        if initial is not None and initial.header.frame_id != p["volume_frame"]:
            self.drop(
                entry.key,
                "refused",
                f"its initial pose is in frame {initial.header.frame_id!r}, not {p['volume_frame']!r}",
                "ERROR",
            )
            return
        xray = self.read_xray(entry, mask_clipped=p["mask_clipped"])
        if xray is None:
            return
        # The time budget starts with the kernels built: at a first start-up (or after an update of
        # torch or the compiler) they compile for ~30 s, which the first registration would spend waiting.
        self._warm_thread.join()
        try:
            outcome = self._register(entry, xray, volume)
        except ValueError as exc:
            self.refuse(entry, str(exc))
            return
        if outcome is None or self._stopping.is_set():
            return
        t_assess = time.monotonic()
        verdict = self._judged(volume, outcome, xray)
        if outcome.path == "full" and verdict.accepted and p["tracking"]:
            outcome, verdict = self._finish(volume, xray, outcome, verdict)
        if self._stopping.is_set():
            return
        outcome, verdict = self._update_track(entry, xray, outcome, verdict, volume.renderer.isocenter)
        self._publish(entry, xray, volume.overlay_renderer, outcome, verdict, time.monotonic() - t_assess)
        if outcome.path == "full":
            if verdict.accepted and p["tracking"] and outcome.registration.uncertainty is None:  # not finished
                self._start_track(volume, xray, outcome.registration)
            self._catch_up(volume, verdict.accepted, convert.ns_from_time(entry.parts["image"].header.stamp) * 1e-9)

    def _warn_frame_id(self, frame_id: str) -> None:
        source = self.params["source_frame"]
        if frame_id and frame_id != source and frame_id not in self._warned_frames:
            self._warned_frames.add(frame_id)
            self.diagnostics.warn(
                f"CameraInfo frame_id {frame_id!r} differs from the TF child frame {source!r} "
                "(parameter source_frame): RViz and TF users looking up the camera frame will not find this transform",
            )

    def _register(self, entry: Pending, xray, volume: _Volume) -> _Outcome | None:
        """Track the frame when the tracker allows it, else the full registration from its initial
        pose; None when a frame released early cannot be tracked after all (it goes back to wait
        for its initial pose) or when it was dropped as stale (:meth:`_stale`). Raises ValueError
        for invalid input."""
        p = self.params
        initial = entry.parts.get("initial_pose")
        t = convert.ns_from_time(entry.parts["image"].header.stamp) * 1e-9
        why = "tracking is off (parameter tracking)"
        if p["tracking"] and self._stale(entry, t):
            return None
        if p["tracking"]:
            factor = CATCH_UP_TIME_FACTOR if self._cut_short else 1.0
            tracked, why = self._track(t, xray, volume, self._network_estimate(initial, xray.detector), factor)
            if tracked is not None and self._far_again(t, xray, tracked):
                why = "tracked from too far a second time in a row (e.g. single shots of a sweep): the track ended"
            elif tracked is not None:
                tracked.note, self._catch_up_note = self._catch_up_note, ""
                return tracked
        if initial is None:
            if entry.key in self._upstream_dropped:  # its initial pose will never come
                self.drop(entry.key, "upstream", f"dropped or skipped by the pose estimator and not trackable ({why})")
                return None
            self._needs_network.add(entry.key)  # not released early again: no loop
            self.repair(entry)
            return None
        init = convert.carm_from_optical(convert.pose_from_msg(initial.pose.pose), xray.detector)
        coarse = p["tracking"] and p["tracking_coarse_start"]
        with self._track_lock:
            recent = self._tracker.recent_pose(t, xray.detector) if p["tracking"] else None
            self._catching_up, self._skipped = p["tracking"] and p["tracking_catch_up_interval"] > 0, []
            self._last_kept = -math.inf
        reg = register(
            volume.renderer,
            xray,
            init_pose=init[None],
            max_iterations=p["max_iterations"],
            time_budget=p["time_budget"] or None,
            callback=lambda _: self._stopping.is_set(),
            multistart_offsets=MULTISTART_OFFSETS if p["multistart"] else (),
            good_enough=self._gate(volume, xray, coarse),
            other_starts=recent,
            detect_fov=p["detect_fov"],
            **self._scale_options(xray.detector, coarse),
        )
        start = self._similarity_at(volume.renderer, xray, reg, init[None])
        return _Outcome(reg, "full", start, initial.pose, why, coarse=coarse)

    def _stale(self, entry: Pending, t: float) -> bool:
        """Drop a frame (stamp ``t`` s) up to STALE_S older than the track's last accepted frame,
        which a newer one has overtaken (e.g. released late by its initial pose): registering it
        in full would hold up the newer frames for a second or more, for a pose already out of
        date. Further back, the stream restarted (a replayed bag): not stale."""
        with self._track_lock:
            behind = self._tracker.behind(t)
        if not 0.0 < behind <= STALE_S:
            return False
        self.drop(entry.key, "superseded", f"{behind:.2f} s older than the last accepted frame (a newer frame "
                  "overtook it): its pose would be out of date")
        return True

    def _far_again(self, t: float, xray, tracked: _Outcome) -> bool:
        """A tracked frame that started too far (``tracking.started_far``), further than a skipped
        fluoroscopy frame (``tracking_shot_gain``), when the one before did too: the track ends here
        and this frame takes the full path at once, instead of a rejection (single shots of a sweep
        each move further than tracking follows)."""
        reg = tracked.registration
        if not started_far(reg, self._tracker.options):
            return False
        gain = similarity_gain(reg)
        with self._track_lock:
            if not self._tracker.next_far_ends(gain):
                return False
            self._tracker.far(t, reg.pose[0], xray.detector, reg.uncertainty, gain=gain)  # ends the track
            self._track_fov = None
        return True

    def _gate(self, volume: _Volume, xray, coarse: bool):
        """``register``'s ``good_enough``: the full path's quality gate (the coarse one when
        ``coarse``) on the initial pose's refinement (the multi-start runs only when it rejects it);
        the verdict is kept for :meth:`_judged`."""
        def accepted(reg: Registration) -> bool:
            verdict = self._assess(volume.renderer, _Outcome(reg, "full", math.nan, None, coarse=coarse), xray)
            self._gated = (reg.refinement, verdict)
            return verdict.accepted
        return accepted

    def _judged(self, volume: _Volume, outcome: _Outcome, xray) -> _Verdict:
        """The verdict on ``outcome``: the gate's during the registration (:meth:`_gate`) when it
        judged this refinement, without a multi-start (whose candidates are one of the quality
        model's features), else a fresh assessment."""
        gated, self._gated = self._gated, None
        reg = outcome.registration
        if gated is not None and gated[0] is reg.refinement and reg.multistart_similarity is None:
            return gated[1]
        return self._assess(volume.for_path(outcome.path), outcome, xray)

    def _track(self, t: float, xray, volume: _Volume, network, time_factor: float = 1.0) -> tuple[_Outcome | None, str]:
        """The frame (stamp ``t`` s) tracked from the track's prior, with ``time_factor`` times its
        time budget -> (outcome, "") or (None, why not)."""
        with self._track_lock:
            prior, why = self._tracker.prior(t, xray.detector, network)
            fov, hessian = self._track_fov, self._tracker.hessian
        if prior is None:
            return None, why
        options = self._tracker.options
        options = dataclasses.replace(options, time_budget=time_factor * options.time_budget)
        reg = track(volume.tracking_renderer, xray, prior, field_of_view=fov,
                    hessian=hessian, options=options, callback=lambda _: self._stopping.is_set())
        pose_msg = convert.pose_with_covariance_to_msg(convert.optical_from_carm(prior[0], xray.detector))
        return _Outcome(reg, "tracking", float(reg.refinement.trajectory[0][0]), pose_msg, t=t), ""

    def _finish(self, volume: _Volume, xray, outcome: _Outcome, verdict: _Verdict) -> tuple[_Outcome, _Verdict]:
        """An accepted full registration finished on the tracking level (Newton steps from its pose,
        as a tracked frame, with a caught-up frame's time budget; ``tracking.finished``) when the
        tracking quality model accepts that refinement: the pose published and tracked on, and the
        Hessian for the track's first frames; else the registration as it was, or rejected when it
        stopped a scale early (``outcome.coarse``: its coarse model vouches for the finished pose)."""
        reg = outcome.registration
        try:
            tracked = finish(volume.tracking_renderer, xray, reg, self._tracker.options,
                             callback=lambda _: self._stopping.is_set())
        except ValueError as exc:  # e.g. the similarity is not finite near the pose
            judged = _Verdict(False, 0.0, f"rejected: cannot finish it ({exc})", None)
        else:
            judged = self._assess(volume.tracking_renderer, _Outcome(tracked, "tracking", math.nan, None), xray,
                                  far_ok=True)
        registered = "the registration to the scale before the finest" if outcome.coarse else "the full registration"
        if not judged.accepted:
            if not outcome.coarse:  # keep what was accepted
                return outcome, verdict
            return outcome, dataclasses.replace(
                judged, reason=f"{judged.reason} (its finishing on the tracking level; {registered}: {verdict.reason})")
        reason = f"{judged.reason} (finished on the tracking level; {registered}: {verdict.reason})"
        return dataclasses.replace(outcome, registration=finished(reg, tracked)), dataclasses.replace(judged,
                                                                                                      reason=reason)

    def _start_track(self, volume: _Volume, xray, reg: Registration) -> None:
        """After an accepted full registration, once its result is out: the Hessian for the track's
        first frames, at its pose (see ``track_hessian``); when it cannot be computed, the first
        tracked frame computes one at its prior."""
        try:
            hessian = track_hessian(volume.tracking_renderer, xray, reg, self._tracker.options)
        except ValueError:  # e.g. the similarity is not finite near the pose
            return
        with self._track_lock:
            self._tracker.use_hessian(hessian)

    def superseded(self, entry: Pending) -> None:
        """While a full registration runs, keep superseded frames: CATCH_UP_FRAMES_PER_INTERVAL per
        catch-up interval."""
        image = entry.parts.get("image")
        if image is None or "camera_info" not in entry.parts:
            return
        t = convert.ns_from_time(image.header.stamp) * 1e-9
        with self._track_lock:
            if not self._catching_up or t - self._last_kept < self._catch_up_interval() / CATCH_UP_FRAMES_PER_INTERVAL:
                return
            self._skipped.append((t, entry))
            self._last_kept = t
            del self._skipped[:-MAX_CATCH_UP_FRAMES]  # memory: the newest are the ones that matter

    def _catch_up_interval(self) -> float:
        """The parameter's interval, or twice what a caught-up frame costs when that is longer: frames
        keep coming while it catches up, and it must gain on them (at the interval's own cost it
        would chase them for as long as the stream lasts)."""
        return max(self.params["tracking_catch_up_interval"], CATCH_UP_GAIN * self._catch_up_cost)

    def _catch_up(self, volume: _Volume, accepted: bool, registered: float) -> None:
        """After a full registration of the frame at ``registered`` s: track the frames kept
        meanwhile (:meth:`superseded`; more come in while this runs), one per catch-up interval and
        without results (each was dropped and accounted for), until none is left or
        CATCH_UP_MAX_REJECTIONS in a row were rejected (then the track ends), or it fell over an
        interval further behind the newest kept frame than it started. After a rejected one the kept frame nearest
        halfway back is tracked (:meth:`_next_to_catch_up`); it has no result to withhold. The
        next frame then starts from a prior a catch-up interval old instead of a full
        registration's seconds, over which the C-arm may have turned degrees."""
        caught_up, rejections, anchor, failed = 0, 0, registered, math.inf
        with self._track_lock:
            behind = self._behind(anchor)
        while accepted and not self._stopping.is_set():
            with self._track_lock:
                # Over an interval further behind the stream than at the start (a slow machine,
                # rejections and retries): it would never end; the next live frame decides instead.
                losing = self._behind(anchor) > behind + self._catch_up_interval()
                kept = None if losing else self._next_to_catch_up(anchor, failed)
            if kept is None:
                break
            t, entry = kept
            started = time.monotonic()
            xray = self.read_xray(entry, mask_clipped=self.params["mask_clipped"])
            outcome = None if xray is None else self._track(t, xray, volume, None, CATCH_UP_TIME_FACTOR)[0]
            if outcome is None or self._stopping.is_set():
                break
            verdict = self._assess(volume.tracking_renderer, outcome, xray, far_ok=True)
            with self._track_lock:
                self._catch_up_cost = time.monotonic() - started
            rejections = 0 if verdict.accepted else rejections + 1
            anchor, failed = (t, math.inf) if verdict.accepted else (anchor, t)
            if verdict.accepted or rejections >= CATCH_UP_MAX_REJECTIONS:
                self._update_track(entry, xray, outcome, verdict, volume.renderer.isocenter)
            else:  # skipped: the next one is tracked from the last accepted frame, with its own Hessian
                with self._track_lock:
                    self._tracker.forget_hessian()
            accepted = rejections < CATCH_UP_MAX_REJECTIONS
            caught_up += verdict.accepted
        self._catch_up_note = (f"from a track caught up through {caught_up} frame(s) superseded during the full "
                               "registration" if caught_up else "")

    def _behind(self, anchor: float) -> float:
        """Seconds from ``anchor`` to the newest frame kept to catch up on (under the track lock)."""
        return self._skipped[-1][0] - anchor if self._skipped else 0.0

    def _next_to_catch_up(self, anchor: float, failed: float) -> tuple[float, Pending] | None:
        """The kept frame to track next (under the track lock), the last accepted one being at
        ``anchor`` s: the first a catch-up interval on; after a rejected one at ``failed`` s
        (else inf), the one nearest halfway between (earlier on a tie), or when none lies between,
        the first after it. None when there is no such frame. Frames up to ``anchor`` are let go."""
        self._skipped = [(t, e) for t, e in self._skipped if t > anchor]
        if failed < math.inf:
            between = [(t, e) for t, e in self._skipped if t < failed]
            if between:
                halfway = (anchor + failed) / 2
                return min(between, key=lambda kept: (abs(kept[0] - halfway), kept[0]))
            return next(((t, e) for t, e in self._skipped if t > failed), None)
        step = self._catch_up_interval()
        return next(((t, e) for t, e in self._skipped if t >= anchor + step - 1e-6), None)

    def _scale_options(self, detector, coarse: bool) -> dict:
        """``register``'s scales: the parameter's, else the core's automatic choice; but the finest
        when ``coarse``."""
        if coarse:
            return {"scales": coarse_scales(detector, self._scales or None)}
        return {"scales": self._scales} if self._scales else {}

    def _similarity_at(self, renderer: Renderer, xray, reg: Registration, pose) -> float:
        """The similarity at ``pose`` on the registration's finest scale, scored on the pixels it
        scored (max_iterations=0: no step, no second field-of-view detection)."""
        pixels = xray.image.to(device=renderer.device, dtype=torch.float32)
        start = refine(renderer, pixels, xray.detector, pose.to(pixels), mask=reg.mask, max_iterations=0,
                       scales=reg.refinement.scales[-1:])
        return float(start.similarity[0])

    def _network_estimate(self, initial, detector) -> torch.Tensor | None:
        """The network's estimate of this frame (else the latest one received) as a C-arm pose, mm."""
        msg = initial if initial is not None else self._network_msg
        if msg is None or msg.header.frame_id != self.params["volume_frame"]:
            return None
        return convert.carm_from_optical(convert.pose_from_msg(msg.pose.pose), detector)

    def _update_track(self, entry: Pending, xray, outcome: _Outcome, verdict: _Verdict,
                      isocenter: torch.Tensor | None = None) -> tuple[_Outcome, _Verdict]:
        """Record the frame's outcome in the track -> the outcome and verdict to publish: an
        accepted one fused into the track's filter (``tracking_filter``; about the volume's
        ``isocenter``) carries the filtered pose and its covariance."""
        t = convert.ns_from_time(entry.parts["image"].header.stamp) * 1e-9
        if outcome.path == "tracking":
            self._cut_short = not verdict.judged and not verdict.far
        with self._track_lock:
            reg = outcome.registration
            if verdict.far:
                if self._tracker.far(t, reg.pose[0], xray.detector, reg.uncertainty, gain=similarity_gain(reg)):
                    self._track_fov = None  # the track ended
                return outcome, verdict
            if not verdict.accepted:
                if verdict.judged and self._tracker.rejected():  # the track ended
                    self._track_fov = None
                return outcome, verdict
            pose, covariance = self._tracker.accepted(t, reg.pose[0], xray.detector, reg.uncertainty,
                                                      _final_similarity(reg), verdict.covariance, isocenter)
            fused = self._tracker.fused
            if outcome.path == "full":
                self._track_fov = outcome.registration.field_of_view
        if fused < 2:  # the frame alone (not filtered, or the filter's first)
            return outcome, verdict
        refinement = dataclasses.replace(reg.refinement, pose=pose[None].to(reg.pose),
                                         message=f"{reg.refinement.message}; filtered over {fused} frames of the track")
        return (dataclasses.replace(outcome, registration=dataclasses.replace(reg, refinement=refinement)),
                dataclasses.replace(verdict, covariance=covariance))

    def _trackable(self, entry: Pending) -> bool:
        """Pairer hook (tracking without waiting for the network): image and CameraInfo are in and
        the tracker would take the frame."""
        image, info = entry.parts.get("image"), entry.parts.get("camera_info")
        if image is None or info is None or entry.key in self._needs_network:
            return False
        try:
            detector = convert.detector_from_camera_info(info, self.params["sdd_mm"])
        except ValueError:
            return False  # the full path refuses it, with the reason
        with self._track_lock:
            if self._tracker.why_not(convert.ns_from_time(image.header.stamp) * 1e-9, detector):
                return False
        self._early.add(entry.key)
        return True

    def _publish(self, entry: Pending, xray, overlay_renderer: Renderer, outcome: _Outcome, verdict: _Verdict,
                 assessment_s: float) -> None:
        """The result, and for an accepted registration the refined pose and its TF; the overlay and state."""
        p = self.params
        image = entry.parts["image"]
        stamp = convert.stamp_to_str(entry.key)
        reg, refinement = outcome.registration, outcome.registration.refinement
        self.answered(entry.key)
        elapsed = time.monotonic() - entry.arrived["image"]
        dropped, total = self.take_dropped(), self.dropped_total
        status = (f"{outcome.path}: {refinement.message}; {verdict.reason}; "
                  f"{dropped} frame(s) dropped since the previous result ({total} in all)"
                  + (f"; {outcome.path} path: {outcome.note}" if outcome.note and p["tracking"] else ""))
        header = Header(stamp=image.header.stamp, frame_id=p["volume_frame"])
        pose = reg.pose[0].to(torch.float64)
        optical = convert.optical_from_carm(pose, xray.detector)
        covariance = None if verdict.covariance is None else world_axes_covariance(pose, verdict.covariance).numpy()
        refined = convert.pose_with_covariance_to_msg(optical, covariance)
        if verdict.accepted:
            if outcome.path == "tracking":
                self._tracked_at = time.monotonic()
            self._pose_pub.publish(PoseWithCovarianceStamped(header=header, pose=refined))
            self._tf_pub.publish(TFMessage(transforms=[
                convert.transform_stamped(optical, p["volume_frame"], p["source_frame"], image.header.stamp)
            ]))
        self._result_pub.publish(
            RegistrationResult(
                header=header,
                initial_pose=outcome.initial,
                refined_pose=refined,
                initial_similarity=outcome.start_similarity,
                similarity=float(refinement.similarity[0]),
                iterations=int(refinement.iterations),
                registration_time=float(elapsed),
                converged=bool(refinement.converged[0]) if refinement.converged is not None else False,
                accepted=verdict.accepted,
                p_success=verdict.p_success,
                rejection_reason="" if verdict.accepted else verdict.reason,
                path=outcome.path,
                dropped=dropped,
                status=status,
            )
        )
        if self._overlay_due():
            self._overlay_worker.submit((overlay_renderer, xray, pose, reg.field_of_view, image.header))
        self._set_state(
            "OK" if verdict.accepted else "WARN",
            f"image {stamp} " + ("registered" if verdict.accepted else f"registered but {verdict.reason}: no TF"),
            log=not verdict.accepted,
            stamp=stamp,
            outcome="accepted" if verdict.accepted else "rejected",
            path=outcome.path,
            reason=verdict.reason,
            p_success=verdict.p_success,
            registration_time_s=elapsed,
            assessment_time_s=assessment_s,
            iterations=refinement.iterations,
            similarity=float(refinement.similarity[0]),
            dropped=dropped,
            dropped_total=total,
        )
        if verdict.accepted:
            self.get_logger().info(f"image {stamp}: {status}")

    def _overlay_due(self) -> bool:
        """Someone subscribes to the overlay and the last one is at least ``overlay_period`` old."""
        if self._overlay_pub is None or self._overlay_pub.get_subscription_count() == 0:
            return False
        now = time.monotonic()
        if now - self._last_overlay < self.params["overlay_period"]:
            return False
        self._last_overlay = now
        return True

    def _render_overlay(self, job) -> None:
        """Overlay thread: one overlay (a newer request replaces one still waiting)."""
        renderer, xray, pose, fov, header = job
        with intra_op_threads(1):
            rgb = registration_overlay(renderer, xray, pose, self.params["overlay_max_size"], fov)
        if not self._stopping.is_set():
            self._overlay_pub.publish(convert.numpy_to_image(rgb, "rgb8", header=header))

    def _on_overlay_error(self, job, exc: BaseException) -> None:
        self.diagnostics.warn(f"overlay of image {convert.stamp_to_str(job[4].stamp)} failed: "
                              f"{type(exc).__name__}: {exc}")

    def _assess(self, renderer: Renderer, outcome: _Outcome, xray, far_ok: bool = False) -> _Verdict:
        """Accept or reject one registration with its path's quality model; its covariance as
        ``PoseUncertainty.covariance`` (mm, rad; along the C-arm's axes), None when unknown.
        A tracked frame that started too far, or whose match fell below the frame before it, is
        rejected unassessed unless ``far_ok`` (a caught-up frame or a finishing, which publish
        nothing of their own or start from the same frame)."""
        if not self._quality:
            return _Verdict(False, 0.0, f"rejected: {self._quality_error}", None)
        reg, options = outcome.registration, self._tracker.options
        with self._track_lock:
            why = screen(reg, self._tracker, outcome.t) if outcome.path == "tracking" else ""
        if why == "unfinished":
            budget = self.params["tracking_time_budget"]
            return _Verdict(False, 0.0, f"rejected: tracking stopped after {reg.refinement.iterations} render(s) on "
                            f"its time budget ({budget:g} s; a busy CPU), so its pose is not refined (the track goes "
                            "on from the last accepted frame)", None, judged=False)
        if why == "far" and not far_ok:
            return self._far_verdict(renderer, reg)
        if why == "fell" and not far_ok:
            return _Verdict(False, 0.0, f"rejected: the image match fell to {_final_similarity(reg):.3f}, more than "
                            f"{options.max_drop:g} below the last accepted frame (another view, or stuck)", None)
        threshold = next(name for name, model in _THRESHOLDS.items() if model == outcome.model)
        try:
            a = assess_registration(renderer, reg, xray.image, xray.detector, model=self._quality[outcome.model],
                                    threshold=self.params[threshold])
        except ValueError as exc:  # e.g. a degenerate image: nothing to trust
            return _Verdict(False, 0.0, f"rejected: cannot assess the registration ({exc})", None)
        if why == "near" and not far_ok:
            if not a.accepted:
                return self._far_verdict(renderer, reg, f"; the gate would reject it too ({a.reason})")
            with self._track_lock:
                surprise = self._tracker.surprise(outcome.t, reg.pose[0], a.covariance)
            if not surprise <= CHI2_6DOF_95:
                return self._far_verdict(renderer, reg, f"; nor does the track's filter expect its pose (chi-square "
                                         f"{surprise:.1f} > {CHI2_6DOF_95:.1f})")
            return _Verdict(True, float(a.p_success), f"{a.reason}; tracked from further than a frame (the similarity "
                            f"rose by {similarity_gain(reg):.3f}) to where the track's filter expects it", a.covariance)
        return _Verdict(bool(a.accepted), float(a.p_success), a.reason, a.covariance)

    def _far_verdict(self, renderer: Renderer, reg: Registration, why_not_near: str = "") -> _Verdict:
        """A tracked frame that started too far (``tracking.started_far``): not published, the track
        goes on from it. ``why_not_near``: why the gate and filter did not vouch for it, when asked."""
        mm, deg = correction(renderer, reg)
        return _Verdict(False, 0.0, "rejected: tracked from too far (the similarity rose by "
                        f"{similarity_gain(reg):.3f} > {self._tracker.options.max_gain:g}, moving {mm:.1f} mm / "
                        f"{deg:.2f} deg about the isocenter: the C-arm moved more than a frame's worth, and the depth "
                        f"lags{why_not_near}); the track goes on from it", None, judged=False, far=True)

    def drop(self, key, *args, **kwargs) -> None:
        self._early.discard(key)  # e.g. superseded before it ran: answered by this drop
        self._needs_network.discard(key)
        self._upstream_dropped.pop(key, None)
        super().drop(key, *args, **kwargs)

    # ---- shutdown -----------------------------------------------------------------------------
    def destroy_node(self) -> None:
        self._stopping.set()  # a running refinement stops at its next iteration
        self._overlay_worker.stop()
        self._warm_thread.join(WARM_JOIN_S)  # (a kernel build can take a minute: not waited for)
        super().destroy_node()


def _final_similarity(reg: Registration) -> float:
    """The registration's final similarity (its refinement's finest scale)."""
    return float(reg.refinement.similarity[0])


def main(args: list[str] | None = None) -> int:
    """``ros2 run xvr_ros refiner [--ros-args ...]``."""
    from xvr_ros.ros.bringup import run_node

    return run_node(Refiner, args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
