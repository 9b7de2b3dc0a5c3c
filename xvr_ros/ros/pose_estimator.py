"""``pose_estimator`` node: X-ray image + CameraInfo -> initial C-arm pose from the network.

Inputs: ``sensor_msgs/Image`` and ``sensor_msgs/CameraInfo`` (paired here by header stamp;
reliability as offered, parameter ``image_qos``), ``xvr_ros/ModelInfo`` (transient local: which
checkpoint to use), ``xvr_ros/RegistrationResult`` (the refiner's: while it tracks, only one
frame per ``tracking_estimate_period`` gets an estimate). Outputs:
``geometry_msgs/PoseWithCovarianceStamped`` in the volume frame, stamped with the image's stamp:
the pose of the C-arm source's optical frame (the frame of the ``CameraInfo``), metres, with the
covariance of the checkpoint's held-out validation; for every frame that gets no pose, a
``std_msgs/Header`` with its stamp on ``dropped_topic`` (the refiner then releases it at once).

Work happens in worker threads (the callbacks only hand messages on): one loads checkpoints, one
runs inference on the newest complete image (a queue of one). Bad input never stops the node: it
is logged, reported on ``/diagnostics`` and dropped: superseded frames as WARN, refused ones
(bad or too small images, no model) as ERROR, each with the key-values ``outcome`` and ``reason``.

The pairing, the workers and the drop reporting are :class:`xvr_ros.ros.pipeline.ImageNode`'s.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from geometry_msgs.msg import PoseWithCovarianceStamped
from std_msgs.msg import Header

from xvr_ros.core.model.checkpoint import load_checkpoint
from xvr_ros.core.model.inference import (
    canonical_detector,
    detected_field_of_view,
    predict_initial_pose,
    uses_field_of_view,
)
from xvr_ros.core.register.tracking import same_intrinsics
from xvr_ros.msg import ModelInfo, RegistrationResult
from xvr_ros.ros import convert
from xvr_ros.ros.pipeline import (
    IMAGE_NODE_PARAMETERS,
    TRACKING_FRESH,
    ImageNode,
    Param,
    Pending,
    declare_parameters,
    file_key,
)

__all__ = ["PARAMETERS", "PoseEstimator", "main"]


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------
#: Read once at start-up (read-only parameters).
PARAMETERS: dict[str, Param] = {
    **IMAGE_NODE_PARAMETERS,
    "model_info_topic": Param("xvr/model_info", "xvr_ros/ModelInfo input (transient local): the checkpoint to use"),
    "initial_pose_topic": Param("xray/initial_pose", "geometry_msgs/PoseWithCovarianceStamped output (metres)"),
    "dropped_topic": Param(
        "xray/initial_pose/dropped", "std_msgs/Header output: the stamp of every frame that gets no initial pose"
    ),
    "volume_frame": Param("volume", "frame_id of the output pose: the CT/MR volume's frame"),
    "device": Param("cpu", "torch device for the network (cpu, cuda, cuda:1, ...)"),
    "camera_info_timeout": Param(
        1.0, "s an image waits for the CameraInfo with its stamp before it is dropped", low=0.01, high=3600.0
    ),
    "registration_topic": Param(
        "xray/registration", "xvr_ros/RegistrationResult input: the refiner's results (tracking_estimate_period)"
    ),
    "tracking_estimate_period": Param(
        1.0,
        "s: while the refiner tracks (its latest result is an accepted tracked frame, at most 2 s old), the network "
        "estimates at most one frame per this period: a tracked frame needs no network start, only the estimate's "
        "check for a view change, and on a CPU the network on every frame takes the core the refiner tracks on; "
        "the other frames get no estimate (their stamps on dropped_topic, not counted as dropped); 0 = every frame",
        low=0.0,
        high=3600.0,
    ),
    "field_of_view_period": Param(
        0.0,
        "s: the field of view (collimator blades, intensifier circle) detected on a frame serves the frames of the "
        "same intrinsics that follow within this time (detecting it costs ~10x the network): for continuous "
        "fluoroscopy with the collimation fixed during a run; 0 = detect on every frame (shots whose collimation may "
        "change)",
        low=0.0,
        high=3600.0,
    ),
}

_KINDS = ("image", "camera_info")


@dataclass
class _Model:
    checkpoint: Any
    canonical: Any  # core Detector the network was trained on
    covariance_mm: np.ndarray | None  # 6x6, (x, y, z mm; rotation rad)
    path: str
    key: tuple | None


class PoseEstimator(ImageNode):
    """The ``pose_estimator`` node (see the module docstring). ``kwargs`` go to ``rclpy.node.Node``
    (``parameter_overrides``, ``context``, ``namespace``, ...)."""

    def __init__(self, node_name: str = "pose_estimator", **kwargs):
        super().__init__(node_name, **kwargs)
        p = self.params = declare_parameters(self, PARAMETERS)
        self._model: _Model | None = None
        self._model_lock = threading.Lock()
        self._fov: tuple[float, Any, Any] | None = None  # (time.monotonic(), detector, mask) of the last detection
        self._tracked_at = -math.inf  # time.monotonic() of the refiner's latest result, when an accepted tracked one
        self._estimated_at = -math.inf  # time.monotonic() of the latest estimate published
        self.skipped_total = 0  # frames given no estimate while the refiner tracked
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, p["initial_pose_topic"], 10)
        self.start_pipeline(_KINDS, p["camera_info_timeout"], self._load_model, self._estimate, "an estimate")
        self.create_subscription(RegistrationResult, p["registration_topic"], self._on_registration, 10)
        self.diagnostics.set_state("WARN", f"no model loaded yet (waiting for ModelInfo on {p['model_info_topic']})")

    # ---- callbacks: hand work on (image, CameraInfo and ModelInfo: ImageNode's) --------------
    def _on_registration(self, msg: RegistrationResult) -> None:
        self._tracked_at = time.monotonic() if msg.accepted and msg.path == "tracking" else -math.inf

    # ---- worker: model loading --------------------------------------------------------------
    def _load_model(self, info: ModelInfo) -> None:
        p = self.params
        if info.volume_frame and info.volume_frame != p["volume_frame"]:
            self.diagnostics.warn(
                f"ModelInfo names volume frame {info.volume_frame!r} but this node publishes in "
                f"{p['volume_frame']!r} (parameter volume_frame)",
            )
        path = info.model_path
        if not path:
            self._set_model(None)
            self.diagnostics.set_state("WARN", "ModelInfo names no model (empty model_path): no model loaded")
            return
        key = file_key(path)
        with self._model_lock:
            current = self._model
        if current is not None and key is not None and current.key == key:
            return  # the same file re-announced
        t0 = time.perf_counter()
        try:
            checkpoint = load_checkpoint(path, map_location=p["device"])
            canonical = canonical_detector(checkpoint)
        except Exception as exc:  # noqa: BLE001 - any unreadable model is reported, never fatal
            self._set_model(None)
            self.diagnostics.set_state("ERROR", f"cannot load model {path}: {exc}; no model loaded", model_path=path)
            return
        cov = (checkpoint.metadata.get("validation") or {}).get("pose_covariance")
        cov = np.asarray(cov, dtype=np.float64) if cov is not None else None
        if cov is not None and (cov.shape != (6, 6) or not np.isfinite(cov).all()):
            cov = None
        self._set_model(_Model(checkpoint, canonical, cov, path, key))
        self.diagnostics.set_state(
            "OK" if cov is not None else "WARN",
            f"model loaded: {path}"
            + ("" if cov is not None else " (no validation covariance: publishing an uninformative one)"),
            model_path=path,
            model_name=info.model_name,
            load_time_s=time.perf_counter() - t0,
            canonical=f"{canonical.height}x{canonical.width} px, {canonical.delx:g} mm, sdd {canonical.sdd:g} mm",
        )

    def _set_model(self, model: _Model | None) -> None:
        with self._model_lock:
            self._model = model

    # ---- worker: inference --------------------------------------------------------------------
    def _estimate(self, entry: Pending) -> None:
        p = self.params
        image = entry.parts["image"]
        stamp = convert.stamp_to_str(entry.key)
        with self._model_lock:
            model = self._model
        if model is None:
            self.drop(
                entry.key,
                "no_model",
                f"no model loaded (waiting for a loadable ModelInfo on {p['model_info_topic']})",
                "ERROR",
            )
            return
        if self._skip_while_tracking():
            self.pass_on(entry.key)
            self.skipped_total += 1
            return
        xray = self.read_xray(entry, orientation=model.canonical.orientation)
        if xray is None:
            return
        mask = self._field_of_view(xray) if uses_field_of_view(model.checkpoint) else None
        pose = predict_initial_pose(model.checkpoint, xray.image, xray.detector, mask)
        try:
            optical = convert.optical_from_carm(pose[0], xray.detector)
            cov = model.covariance_mm if model.covariance_mm is not None else _UNINFORMATIVE_MM
            msg = PoseWithCovarianceStamped(
                header=Header(stamp=image.header.stamp, frame_id=p["volume_frame"]),
                pose=convert.pose_with_covariance_to_msg(optical, cov),
            )
        except ValueError as exc:
            self.drop(entry.key, "refused", f"the network gave no usable pose ({exc})", "ERROR")
            return
        self._pose_pub.publish(msg)
        self._estimated_at = time.monotonic()
        latency = time.monotonic() - entry.arrived["image"]
        self.diagnostics.set_state(
            "OK",
            f"initial pose for image {stamp}",
            log=False,
            stamp=stamp,
            latency_s=latency,
            model_path=model.path,
            dropped_total=self.dropped_total,
            skipped_total=self.skipped_total,
        )
        self.get_logger().debug(f"initial pose for image {stamp} in {latency:.3f} s")

    def _skip_while_tracking(self) -> bool:
        """Whether this frame goes without an estimate: the refiner tracks, and the last estimate is
        less than ``tracking_estimate_period`` old."""
        now, period = time.monotonic(), self.params["tracking_estimate_period"]
        return now - self._tracked_at < TRACKING_FRESH and now - self._estimated_at < period

    def _field_of_view(self, xray):
        """The (1, 1, H, W) field of view of ``xray``: the last one detected, while it is recent and
        the intrinsics are the same (fluoroscopy frames share the collimation), else detected now."""
        now = time.monotonic()
        if self._fov is not None:
            when, detector, mask = self._fov
            if now - when < self.params["field_of_view_period"] and same_intrinsics(detector, xray.detector):
                return mask
        mask = detected_field_of_view(xray.image)
        self._fov = (now, xray.detector, mask)
        return mask


# 1 m and pi rad standard deviations: "unknown" without claiming certainty (zeros would).
_UNINFORMATIVE_MM = np.diag([1e6, 1e6, 1e6, np.pi**2, np.pi**2, np.pi**2])


def main(args: list[str] | None = None) -> int:
    """``ros2 run xvr_ros pose_estimator [--ros-args ...]``."""
    from xvr_ros.ros.bringup import run_node

    return run_node(PoseEstimator, args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
