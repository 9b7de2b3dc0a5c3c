"""What both image nodes (``pose_estimator``, ``refiner``) are made of.

* :class:`StampPairer`: messages of several kinds (image, CameraInfo, initial pose) paired by
  exact header stamp, with a timeout;
* :class:`LatestWorker`: a worker thread with a queue of one (the newest job wins);
* :class:`ImageNode`: the node skeleton: read-only parameters, image + CameraInfo + ModelInfo
  subscriptions, one worker that loads what ModelInfo names and one that processes the newest
  complete input, drops and timeouts reported on ``/diagnostics``. Subclasses provide the
  loading and the processing, and publish.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import (
    DurabilityPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from sensor_msgs.msg import CameraInfo, Image

from xvr_ros.msg import ModelInfo
from xvr_ros.ros import convert
from xvr_ros.ros.diagnostics import Diagnostics

__all__ = [
    "IMAGE_NODE_PARAMETERS",
    "ImageNode",
    "check_image_parameters",
    "number_list",
    "LatestWorker",
    "Pending",
    "StampPairer",
    "declare_parameters",
    "file_key",
    "model_info_qos",
]


#: Parameters every image node declares: name -> (default, description with units).
IMAGE_NODE_PARAMETERS: dict[str, tuple[Any, str]] = {
    "image_topic": ("xray/image", "sensor_msgs/Image input (sensor-data QoS)"),
    "camera_info_topic": ("xray/camera_info", "sensor_msgs/CameraInfo input, paired with the image by header stamp"),
    "diagnostics_topic": ("/diagnostics", "diagnostic_msgs/DiagnosticArray output"),
    "sdd_mm": (1020.0, "source-to-detector distance, mm: with CameraInfo's K it gives the pixel spacing (sdd / f)"),
    "intensity": (
        "log",
        "pixel values: 'log' = transmitted intensity (converted with -log(I/I0)), 'linear' = line integrals",
    ),
    "i0": (0.0, "unattenuated intensity I0 in pixel units for intensity=log; 0 = the image's 99.9th percentile"),
    "max_pending": (32, "stamps kept while waiting to be paired (count)"),
    "diagnostics_period": (1.0, "s between re-publications of the node's status on /diagnostics"),
}


def check_image_parameters(p: dict[str, Any]) -> None:
    """ValueError for an impossible value of the shared parameters (the node does not start)."""
    if p["intensity"] not in ("log", "linear"):
        raise ValueError(f"parameter intensity must be 'log' or 'linear', got {p['intensity']!r}")
    if not p["sdd_mm"] > 0:
        raise ValueError(f"parameter sdd_mm must be a positive distance in mm, got {p['sdd_mm']}")


def model_info_qos() -> QoSProfile:
    """QoS of ``ModelInfo``: reliable, transient local, depth 1 (a latched topic)."""
    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def declare_parameters(node: Node, table: dict[str, tuple]) -> dict[str, Any]:
    """Declare ``{name: (default, description[, ParameterType])}`` as read-only parameters; return
    their values. A third element marks an array whose default is empty: rclpy types ``[]`` as a
    byte array and would refuse a list of numbers from a parameters file, so such a parameter is
    declared with dynamic typing and the node checks its elements (:func:`number_list`)."""
    values = {}
    for name, (default, description, *kind) in table.items():
        descriptor = ParameterDescriptor(description=description, read_only=True, dynamic_typing=bool(kind))
        node.declare_parameter(name, default, descriptor)
        values[name] = node.get_parameter(name).value
    return values


def number_list(name: str, value, kind: type) -> list:
    """A dynamically typed array parameter as a list of ``kind`` (int or float); ValueError otherwise."""
    items = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "tolist") else None
    ok = items is not None and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        for v in items
    )
    if not ok:
        raise ValueError(
            f"parameter {name} must be a list of {'integers' if kind is int else 'numbers'}, got {value!r}"
        )
    return [kind(v) for v in items]


def file_key(path: str) -> tuple | None:
    """(path, size, mtime) of a file, to notice that a re-published path holds a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


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
                        entry.reason = (
                            f"no {' or '.join(entry.missing(self.kinds))} with its stamp within {self.timeout:g} s"
                        )
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

    def __init__(
        self, fn: Callable[[Any], None], name: str, on_error: Callable[[Any, BaseException], None] | None = None
    ):
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


class ImageNode(Node):
    """Skeleton of an image node; see the module docstring.

    A subclass declares its parameters (``self.params``, which must hold ``image_topic``,
    ``camera_info_topic``, ``model_info_topic``, ``diagnostics_topic``, ``device`` and
    ``diagnostics_period``), then calls :meth:`start_pipeline` with the kinds of input it pairs,
    its loader (``load(ModelInfo)``) and its processing (``process(Pending)``), both run on
    worker threads. Inputs other than image and CameraInfo get their own subscription whose
    callback calls :meth:`pair`.
    """

    def start_pipeline(
        self,
        kinds: tuple[str, ...],
        timeout: float,
        max_pending: int,
        load: Callable[[ModelInfo], None],
        process: Callable[[Pending], None],
        work: str,
    ) -> None:
        """``work`` names what the processing does, for drop messages ("a refinement")."""
        p = self.params
        self.diagnostics = Diagnostics(
            self, topic=p["diagnostics_topic"], hardware_id=p["device"], period=p["diagnostics_period"]
        )
        self._kinds, self._work = kinds, work
        self._drop_lock = threading.Lock()
        self.dropped_total = 0
        self._pairer = StampPairer(kinds, timeout, max_pending)
        name = self.get_name()
        self._loader = LatestWorker(load, f"{name}-load", self._on_worker_error)
        self._worker = LatestWorker(process, f"{name}-work", self._on_worker_error)
        self.create_subscription(Image, p["image_topic"], self._on_image, qos_profile_sensor_data)
        self.create_subscription(CameraInfo, p["camera_info_topic"], self._on_camera_info, qos_profile_sensor_data)
        self.create_subscription(ModelInfo, p["model_info_topic"], self._on_model_info, model_info_qos())
        self.create_timer(min(0.1, timeout / 4), self._on_timer)

    # ---- callbacks: hand work on ------------------------------------------------------------
    def _on_model_info(self, msg: ModelInfo) -> None:
        self._loader.submit(msg)

    def _on_image(self, msg: Image) -> None:
        self.pair("image", msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.pair("camera_info", msg)

    def _on_timer(self) -> None:
        for entry in self._pairer.expire():
            self.diagnostics.error(
                f"image {convert.stamp_to_str(entry.key)} dropped: {entry.reason}",
                stamp=convert.stamp_to_str(entry.key),
                missing=",".join(entry.missing(self._kinds)),
            )

    def pair(self, kind: str, msg) -> None:
        """Add one input; a complete set goes to the worker, replacing (and reporting) a waiting one."""
        complete = self._pairer.add(kind, msg)
        if complete is None:
            return
        replaced = self._worker.submit(complete)
        if replaced is None:
            return
        # The newest input inherits the stamps of those it replaced (for its result's status).
        complete.superseded = [*replaced.superseded, replaced.key]
        with self._drop_lock:
            self.dropped_total += 1
            total = self.dropped_total
        self.diagnostics.warn(
            f"image {convert.stamp_to_str(replaced.key)} dropped: image {convert.stamp_to_str(complete.key)} "
            f"is newer and {self._work} is running (only the newest input is kept)",
            stamp=convert.stamp_to_str(replaced.key),
            outcome="superseded",
            dropped_total=total,
        )

    def _on_worker_error(self, job, exc: BaseException) -> None:
        what = f"image {convert.stamp_to_str(job.key)}" if isinstance(job, Pending) else "model info"
        self.diagnostics.error(f"internal error on {what}: {type(exc).__name__}: {exc}")

    def destroy_node(self) -> None:
        self._worker.stop()
        self._loader.stop()
        self.diagnostics.destroy()
        super().destroy_node()
