"""``pose_estimator`` node: X-ray image + CameraInfo -> initial C-arm pose from the network.

Inputs: ``sensor_msgs/Image`` and ``sensor_msgs/CameraInfo`` (sensor-data QoS, paired here by
header stamp), ``xvr_ros/ModelInfo`` (transient local: which checkpoint to use). Output:
``geometry_msgs/PoseWithCovarianceStamped`` in the volume frame, stamped with the image's stamp:
the pose of the C-arm source's optical frame (the frame of the ``CameraInfo``), metres, with the
covariance of the checkpoint's held-out validation.

Work happens in worker threads (the callbacks only hand messages on): one loads checkpoints, one
runs inference on the newest complete image (a queue of one). Bad input never stops the node: it
is logged, reported on ``/diagnostics`` and dropped.

This module also holds the two small helpers both image nodes use: :class:`StampPairer`
(exact-stamp pairing with a timeout) and :class:`LatestWorker` (a worker thread with a queue
of one).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from xvr_ros.core.checkpoint import load_checkpoint
from xvr_ros.core.registration import canonical_detector, predict_initial_pose
from xvr_ros.msg import ModelInfo
from xvr_ros.ros import convert
from xvr_ros.ros.diagnostics import Diagnostics

__all__ = ["PARAMETERS", "LatestWorker", "Pending", "PoseEstimator", "StampPairer", "declare_parameters", "main", "model_info_qos"]


# --------------------------------------------------------------------------------------------
# Shared helpers (also used by the refiner)
# --------------------------------------------------------------------------------------------
def model_info_qos() -> QoSProfile:
    """QoS of ``ModelInfo``: reliable, transient local, depth 1 (a latched topic)."""
    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def declare_parameters(node: Node, table: dict[str, tuple]) -> dict[str, Any]:
    """Declare ``{name: (default, description[, ParameterType])}`` as read-only parameters (the
    type is needed for an empty-list default); return their values."""
    values = {}
    for name, (default, description, *kind) in table.items():
        descriptor = ParameterDescriptor(description=description, read_only=True)
        if kind:
            descriptor.type = kind[0]
        node.declare_parameter(name, default, descriptor)
        values[name] = node.get_parameter(name).value
    return values


@dataclass
class Pending:
    """Messages sharing one header stamp, collected by :class:`StampPairer`."""

    key: tuple[int, int]
    parts: dict[str, Any] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)  # time.monotonic() per kind
    created: float = 0.0
    reason: str = ""  # why it was dropped (set by the pairer)
    superseded: list[tuple[int, int]] = field(default_factory=list)  # stamps this one replaced while busy

    def missing(self, kinds: Iterable[str]) -> list[str]:
        return [k for k in kinds if k not in self.parts]


class StampPairer:
    """Pairs messages of several ``kinds`` that carry the same header stamp (exact match).

    :meth:`add` returns the complete :class:`Pending` once every kind has arrived. An entry that
    holds the ``anchor`` kind (the image) and is still incomplete ``timeout`` seconds after the
    anchor arrived is dropped and returned by :meth:`expire` (so it can be reported); entries
    without the anchor (e.g. a CameraInfo whose image never comes) expire silently ``timeout``
    after their first message. At most ``max_pending`` stamps are kept; the oldest goes first.
    Thread-safe.
    """

    def __init__(self, kinds: Iterable[str], timeout: float, max_pending: int = 32, anchor: str = "image"):
        self.kinds = tuple(kinds)
        if anchor not in self.kinds:
            raise ValueError(f"anchor {anchor!r} is not one of {self.kinds}")
        if not timeout > 0 or max_pending < 1:
            raise ValueError(f"need timeout > 0 and max_pending >= 1, got {timeout}, {max_pending}")
        self.timeout, self.max_pending, self.anchor = float(timeout), int(max_pending), anchor
        self._pending: OrderedDict[tuple[int, int], Pending] = OrderedDict()
        self._dropped: list[Pending] = []
        self._lock = threading.Lock()

    def add(self, kind: str, msg, now: float | None = None) -> Pending | None:
        if kind not in self.kinds:
            raise ValueError(f"unknown kind {kind!r}; expected one of {self.kinds}")
        now = time.monotonic() if now is None else now
        key = convert.stamp_key(msg.header.stamp)
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                entry = self._pending[key] = Pending(key, created=now)
            entry.parts[kind] = msg  # a repeated stamp replaces the earlier message
            entry.arrived[kind] = now
            if not entry.missing(self.kinds):
                del self._pending[key]
                return entry
            while len(self._pending) > self.max_pending:
                _, old = self._pending.popitem(last=False)
                if self.anchor in old.parts:
                    old.reason = f"more than {self.max_pending} stamps waiting to be paired"
                    self._dropped.append(old)
        return None

    def expire(self, now: float | None = None) -> list[Pending]:
        """Drop timed-out entries; return those holding the anchor (plus any evicted by ``add``)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            out, self._dropped = self._dropped, []
            for key in list(self._pending):
                entry = self._pending[key]
                start = entry.arrived.get(self.anchor, entry.created)
                if now - start >= self.timeout:
                    del self._pending[key]
                    if self.anchor in entry.parts:
                        entry.reason = f"no {' or '.join(entry.missing(self.kinds))} with its stamp within {self.timeout:g} s"
                        out.append(entry)
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


class LatestWorker:
    """One daemon thread running ``fn(job)`` on the newest submitted job (a queue of one).

    :meth:`submit` replaces a job that is still waiting and returns it (the caller reports the
    drop); a running job is never interrupted. Exceptions from ``fn`` go to ``on_error(job, exc)``
    and the thread keeps going.
    """

    def __init__(self, fn: Callable[[Any], None], name: str, on_error: Callable[[Any, BaseException], None] | None = None):
        self._fn, self._on_error = fn, on_error
        self._cv = threading.Condition()
        self._job: Any = None
        self._has_job = False
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job) -> Any:
        """Queue ``job``; return the waiting job it replaced, or None."""
        with self._cv:
            replaced = self._job if self._has_job else None
            self._job, self._has_job = job, True
            self._cv.notify()
        return replaced

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._busy or self._has_job

    def stop(self, timeout: float = 2.0) -> None:
        with self._cv:
            self._stopping = True
            self._job, self._has_job = None, False
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._has_job and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                job, self._job, self._has_job, self._busy = self._job, None, False, True
            try:
                self._fn(job)
            except BaseException as exc:  # noqa: BLE001 - a worker must survive anything a job does
                if self._on_error is not None:
                    try:
                        self._on_error(job, exc)
                    except Exception:  # noqa: BLE001
                        pass
            finally:
                with self._cv:
                    self._busy = False


def file_key(path: str) -> tuple | None:
    """(path, size, mtime) of a file, to notice that a re-published path holds a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------
#: name -> (default, description with units). Read once at start-up (read-only parameters).
PARAMETERS: dict[str, tuple[Any, str]] = {
    "image_topic": ("xray/image", "sensor_msgs/Image input (sensor-data QoS)"),
    "camera_info_topic": ("xray/camera_info", "sensor_msgs/CameraInfo input, paired with the image by header stamp"),
    "model_info_topic": ("xvr/model_info", "xvr_ros/ModelInfo input (transient local): the checkpoint to use"),
    "initial_pose_topic": ("xray/initial_pose", "geometry_msgs/PoseWithCovarianceStamped output (metres)"),
    "diagnostics_topic": ("/diagnostics", "diagnostic_msgs/DiagnosticArray output"),
    "volume_frame": ("volume", "frame_id of the output pose: the CT/MR volume's frame"),
    "sdd_mm": (1020.0, "source-to-detector distance, mm: with CameraInfo's K it gives the pixel spacing (sdd / f)"),
    "intensity": ("log", "pixel values: 'log' = transmitted intensity (converted with -log(I/I0)), 'linear' = line integrals"),
    "i0": (0.0, "unattenuated intensity I0 in pixel units for intensity=log; 0 = the image's 99.9th percentile"),
    "device": ("cpu", "torch device for the network (cpu, cuda, cuda:1, ...)"),
    "camera_info_timeout": (1.0, "s an image waits for the CameraInfo with its stamp before it is dropped"),
    "max_pending": (32, "images/CameraInfos kept while waiting to be paired (count)"),
    "diagnostics_period": (1.0, "s between re-publications of the node's status on /diagnostics"),
}

_KINDS = ("image", "camera_info")


@dataclass
class _Model:
    checkpoint: Any
    canonical: Any  # core Detector the network was trained on
    covariance_mm: np.ndarray | None  # 6x6, (x, y, z mm; rotation rad)
    path: str
    key: tuple | None


class PoseEstimator(Node):
    """The ``pose_estimator`` node (see the module docstring). ``kwargs`` go to ``rclpy.node.Node``
    (``parameter_overrides``, ``context``, ``namespace``, ...)."""

    def __init__(self, node_name: str = "pose_estimator", **kwargs):
        super().__init__(node_name, **kwargs)
        p = self.params = declare_parameters(self, PARAMETERS)
        if p["intensity"] not in ("log", "linear"):
            raise ValueError(f"parameter intensity must be 'log' or 'linear', got {p['intensity']!r}")
        if not p["sdd_mm"] > 0:
            raise ValueError(f"parameter sdd_mm must be a positive distance in mm, got {p['sdd_mm']}")
        self.diagnostics = Diagnostics(self, topic=p["diagnostics_topic"], hardware_id=p["device"],
                                       period=p["diagnostics_period"])
        self._model: _Model | None = None
        self._model_lock = threading.Lock()
        self._dropped = 0
        self._pairer = StampPairer(_KINDS, p["camera_info_timeout"], p["max_pending"])
        self._loader = LatestWorker(self._load_model, f"{node_name}-load", self._on_worker_error)
        self._worker = LatestWorker(self._estimate, f"{node_name}-estimate", self._on_worker_error)

        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, p["initial_pose_topic"], 10)
        self.create_subscription(Image, p["image_topic"], self._on_image, qos_profile_sensor_data)
        self.create_subscription(CameraInfo, p["camera_info_topic"], self._on_camera_info, qos_profile_sensor_data)
        self.create_subscription(ModelInfo, p["model_info_topic"], self._on_model_info, model_info_qos())
        self.create_timer(min(0.1, p["camera_info_timeout"] / 4), self._on_timer)
        self.diagnostics.set_state("WARN", f"no model loaded yet (waiting for ModelInfo on {p['model_info_topic']})")

    # ---- callbacks: hand work on ------------------------------------------------------------
    def _on_model_info(self, msg: ModelInfo) -> None:
        self._loader.submit(msg)

    def _on_image(self, msg: Image) -> None:
        self._pair("image", msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._pair("camera_info", msg)

    def _on_timer(self) -> None:
        for entry in self._pairer.expire():
            self.diagnostics.error(
                f"image {convert.stamp_to_str(entry.key)} dropped: {entry.reason}",
                stamp=convert.stamp_to_str(entry.key), camera_info_topic=self.params["camera_info_topic"],
            )

    def _pair(self, kind: str, msg) -> None:
        complete = self._pairer.add(kind, msg)
        if complete is not None:
            replaced = self._worker.submit(complete)
            if replaced is not None:
                complete.superseded = [*replaced.superseded, replaced.key]
                self._dropped += 1
                self.diagnostics.warn(
                    f"image {convert.stamp_to_str(replaced.key)} dropped: a newer one arrived while busy",
                    stamp=convert.stamp_to_str(replaced.key), dropped_total=self._dropped,
                )

    def _on_worker_error(self, job, exc: BaseException) -> None:
        what = f"image {convert.stamp_to_str(job.key)}" if isinstance(job, Pending) else "model info"
        self.diagnostics.error(f"internal error on {what}: {type(exc).__name__}: {exc}")

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
            f"model loaded: {path}" + ("" if cov is not None else " (no validation covariance: publishing an uninformative one)"),
            model_path=path, model_name=info.model_name, load_time_s=time.perf_counter() - t0,
            canonical=f"{canonical.height}x{canonical.width} px, {canonical.delx:g} mm, sdd {canonical.sdd:g} mm",
        )

    def _set_model(self, model: _Model | None) -> None:
        with self._model_lock:
            self._model = model

    # ---- worker: inference --------------------------------------------------------------------
    def _estimate(self, entry: Pending) -> None:
        p = self.params
        image, info = entry.parts["image"], entry.parts["camera_info"]
        stamp = convert.stamp_to_str(entry.key)
        with self._model_lock:
            model = self._model
        if model is None:
            self.diagnostics.error(
                f"image {stamp} dropped: no model loaded (waiting for a loadable ModelInfo on {p['model_info_topic']})",
                stamp=stamp,
            )
            return
        try:
            xray = convert.xray_from_messages(
                image, info, sdd_mm=p["sdd_mm"], intensity=p["intensity"], i0=p["i0"] or None,
                orientation=model.canonical.orientation,
            )
        except ValueError as exc:
            self.diagnostics.error(f"image {stamp} dropped: {exc}", stamp=stamp, encoding=image.encoding,
                                   image_size=f"{image.height}x{image.width}", camera_info_size=f"{info.height}x{info.width}")
            return
        pose = predict_initial_pose(model.checkpoint, xray.image, xray.detector)
        try:
            optical = convert.optical_from_carm(pose[0], xray.detector)
            cov = model.covariance_mm if model.covariance_mm is not None else _UNINFORMATIVE_MM
            msg = PoseWithCovarianceStamped(
                header=Header(stamp=image.header.stamp, frame_id=p["volume_frame"]),
                pose=convert.pose_with_covariance_to_msg(optical, cov),
            )
        except ValueError as exc:
            self.diagnostics.error(f"image {stamp}: the network gave no usable pose ({exc})", stamp=stamp)
            return
        self._pose_pub.publish(msg)
        latency = time.monotonic() - entry.arrived["image"]
        self.diagnostics.set_state(
            "OK", f"initial pose for image {stamp}", log=False, stamp=stamp, latency_s=latency,
            model_path=model.path, dropped_total=self._dropped,
        )
        self.get_logger().debug(f"initial pose for image {stamp} in {latency:.3f} s")

    # ---- shutdown -----------------------------------------------------------------------------
    def destroy_node(self) -> None:
        self._worker.stop()
        self._loader.stop()
        self.diagnostics.destroy()
        super().destroy_node()


# 1 m and pi rad standard deviations: "unknown" without claiming certainty (zeros would).
_UNINFORMATIVE_MM = np.diag([1e6, 1e6, 1e6, np.pi**2, np.pi**2, np.pi**2])


def spin_node(node_class, args=None) -> None:
    """Run one node until Ctrl-C / shutdown (the body of each node's ``main``)."""
    rclpy.init(args=args)
    node = None
    try:
        node = node_class()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


def main(args=None) -> None:
    spin_node(PoseEstimator, args)


if __name__ == "__main__":
    main()
