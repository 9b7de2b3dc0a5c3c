"""What both image nodes (``pose_estimator``, ``refiner``) are made of.

* :class:`Param` and :func:`declare_parameters`: typed, read-only parameters with ranges;
* :class:`StampPairer`: messages of several kinds (image, CameraInfo, initial pose) paired by
  exact header stamp, with a timeout;
* :class:`LatestWorker`: a worker thread with a queue of one (the newest job wins);
* :class:`ImageNode`: the node skeleton: image + CameraInfo subscriptions whose reliability
  follows the publishers' (parameter ``image_qos``), ModelInfo, one worker that loads what
  ModelInfo names and one that processes the newest complete input, and the frame accounting:
  every frame the node gives no output for is a *drop*, reported once on ``/diagnostics``
  (key-values ``outcome`` and ``reason``) and published on ``dropped_topic``
  (``std_msgs/Header`` with the frame's stamp), so the next node releases it at once.
  Subclasses provide the loading and the processing, and publish.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from builtin_interfaces.msg import Time
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from xvr_ros.core.io.xray import Xray
from xvr_ros.msg import ModelInfo
from xvr_ros.ros import convert, qos
from xvr_ros.ros.diagnostics import Diagnostics

__all__ = [
    "IMAGE_NODE_PARAMETERS",
    "ImageNode",
    "LatestWorker",
    "Param",
    "Pending",
    "StampPairer",
    "declare_parameters",
    "file_key",
    "number_list",
]


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One read-only parameter: its default, a description with units, and its allowed values.

    ``low``/``high``: inclusive range of a number; ``choices``: the allowed strings; ``items``:
    element type (int or float) of an array parameter whose default is ``[]`` (rclpy types an
    empty list as a byte array and would refuse numbers from a parameters file, so such a
    parameter is declared with dynamic typing and its elements are checked here).
    """

    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    items: type | None = None

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(description=self.description, read_only=True, dynamic_typing=self.items is not None)
        if self.items is not None:
            return d
        d.type = _PARAMETER_TYPES[type(self.default)]
        if self.low is not None or self.high is not None:
            low = -math.inf if self.low is None else self.low
            high = math.inf if self.high is None else self.high
            if isinstance(self.default, int) and not isinstance(self.default, bool):
                d.integer_range = [IntegerRange(from_value=int(max(low, -(2**63))), to_value=int(min(high, 2**63 - 1)),
                                                step=1)]
            else:
                d.floating_point_range = [FloatingPointRange(from_value=float(low), to_value=float(high))]
        if self.choices:
            d.additional_constraints = "one of: " + ", ".join(self.choices)
        return d


_PARAMETER_TYPES = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}


def declare_parameters(node: Node, table: dict[str, Param]) -> dict[str, Any]:
    """Declare ``table``'s parameters on ``node``; return their values.

    rclpy refuses a value of the wrong type or out of its range; a string outside its choices or a
    bad array element raises ValueError here. Either way the node does not start.
    """
    values = {}
    for name, param in table.items():
        node.declare_parameter(name, param.default, param.descriptor())
        value = node.get_parameter(name).value
        if param.items is not None:
            value = number_list(name, value, param.items)
        if param.choices and value not in param.choices:
            raise ValueError(f"parameter {name} must be one of {', '.join(map(repr, param.choices))}, got {value!r}")
        values[name] = value
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


#: Parameters every image node declares.
IMAGE_NODE_PARAMETERS: dict[str, Param] = {
    "image_topic": Param("xray/image", "sensor_msgs/Image input"),
    "camera_info_topic": Param(
        "xray/camera_info", "sensor_msgs/CameraInfo input, paired with the image by header stamp"
    ),
    "image_qos": Param(
        "auto",
        "reliability of the image and CameraInfo subscriptions: 'auto' = the publishers' (reliable if all offer "
        "it, else best effort, re-checked every second), 'reliable', or 'best_effort'",
        choices=qos.IMAGE_QOS_CHOICES,
    ),
    "min_image_size": Param(
        32, "px: images with fewer rows or columns are refused (too small to register)", low=2, high=65536
    ),
    "diagnostics_topic": Param("/diagnostics", "diagnostic_msgs/DiagnosticArray output"),
    "sdd_mm": Param(
        1020.0,
        "source-to-detector distance, mm: with CameraInfo's K it gives the pixel spacing (sdd / f)",
        low=1.0,
        high=10000.0,
    ),
    "intensity": Param(
        "log",
        "pixel values: 'log' = transmitted intensity (converted with -log(I/I0)), 'linear' = line integrals",
        choices=("log", "linear"),
    ),
    "i0": Param(
        0.0,
        "unattenuated intensity I0 in pixel units for intensity=log; 0 = the image's 99.9th percentile",
        low=0.0,
        high=1e12,
    ),
    "max_pending": Param(32, "stamps kept while waiting to be paired (count)", low=1, high=10000),
    "diagnostics_period": Param(
        1.0, "s between re-publications of the node's status on /diagnostics", low=0.05, high=60.0
    ),
}


def file_key(path: str) -> tuple | None:
    """(path, size, mtime) of a file, to notice that a re-published path holds a new file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


#: s: how long a resubscribed input stays out of the executor's wait sets before it is destroyed
#: (see ``ImageNode._retire``); the image nodes' executors wake at least every 0.1 s.
RETIRED_MIN_AGE = 0.5

#: s: how long after the refiner's last accepted tracked frame the pose estimator counts it as
#: tracking (``tracking_estimate_period``); the refiner waits a second longer before it takes an
#: upstream drop for a plain drop (the pose estimator may have skipped that frame unreported).
TRACKING_FRESH = 2.0

#: s: the interpreter's thread switch interval while an image node runs (see ``start_pipeline``).
GIL_SWITCH_INTERVAL = 2e-4


@dataclass
class Pending:
    """Messages sharing one header stamp, collected by :class:`StampPairer`."""

    key: tuple[int, int]
    parts: dict[str, Any] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)  # time.monotonic() per kind
    created: float = 0.0
    reason: str = ""  # why it was dropped (set by the pairer)

    def missing(self, kinds: Iterable[str]) -> list[str]:
        return [k for k in kinds if k not in self.parts]


class StampPairer:
    """Pairs messages of several ``kinds`` that carry the same header stamp (exact match).

    :meth:`add` returns the complete :class:`Pending` once every kind has arrived. An entry that
    holds the ``anchor`` kind (the image) and is still incomplete ``timeout`` seconds after the
    anchor arrived is dropped and returned by :meth:`expire` (so it can be reported); entries
    without the anchor (e.g. a CameraInfo whose image never comes) expire silently ``timeout``
    after their first message. At most ``max_pending`` stamps are kept; the oldest goes first.
    :meth:`discard` forgets a stamp whose frame was dropped elsewhere, including its messages
    still to come (for ``timeout`` seconds). ``early(entry) -> bool``, called under the pairer's
    lock with an incomplete entry, may release it before every kind has arrived (e.g. a frame the
    refiner can track needs no initial pose). Thread-safe.
    """

    def __init__(self, kinds: Iterable[str], timeout: float, max_pending: int = 32, anchor: str = "image",
                 early: Callable[[Pending], bool] | None = None):
        self.kinds = tuple(kinds)
        self.early = early
        if anchor not in self.kinds:
            raise ValueError(f"anchor {anchor!r} is not one of {self.kinds}")
        if not timeout > 0 or max_pending < 1:
            raise ValueError(f"need timeout > 0 and max_pending >= 1, got {timeout}, {max_pending}")
        self.timeout, self.max_pending, self.anchor = float(timeout), int(max_pending), anchor
        self._pending: OrderedDict[tuple[int, int], Pending] = OrderedDict()
        self._dropped: list[Pending] = []
        self._discarded: OrderedDict[tuple[int, int], float] = OrderedDict()  # stamp -> when
        self._lock = threading.Lock()

    def add(self, kind: str, msg, now: float | None = None) -> Pending | None:
        if kind not in self.kinds:
            raise ValueError(f"unknown kind {kind!r}; expected one of {self.kinds}")
        now = time.monotonic() if now is None else now
        key = convert.stamp_key(msg.header.stamp)
        with self._lock:
            if key in self._discarded:
                return None
            entry = self._pending.get(key)
            if entry is None:
                entry = self._pending[key] = Pending(key, created=now)
            entry.parts[kind] = msg  # a repeated stamp replaces the earlier message
            entry.arrived[kind] = now
            if not entry.missing(self.kinds) or (self.early is not None and self.early(entry)):
                del self._pending[key]
                return entry
            while len(self._pending) > self.max_pending:
                _, old = self._pending.popitem(last=False)
                if self.anchor in old.parts:
                    old.reason = f"more than {self.max_pending} stamps waiting to be paired"
                    self._dropped.append(old)
        return None

    def discard(self, key: tuple[int, int], now: float | None = None) -> None:
        """Forget stamp ``key``: its waiting messages now, and those arriving within ``timeout``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._pending.pop(key, None)
            self._discarded[key] = now
            while len(self._discarded) > 4 * self.max_pending:
                self._discarded.popitem(last=False)

    def expire(self, now: float | None = None) -> list[Pending]:
        """Drop timed-out entries; return those holding the anchor (plus any evicted by ``add``)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            out, self._dropped = self._dropped, []
            while self._discarded and now - next(iter(self._discarded.values())) >= self.timeout:
                self._discarded.popitem(last=False)
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

    A subclass declares its parameters (``self.params``: :data:`IMAGE_NODE_PARAMETERS` plus
    ``model_info_topic``, ``dropped_topic`` and ``device``), then calls :meth:`start_pipeline`
    with the kinds of input it pairs, its loader (``load(ModelInfo)``) and its processing
    (``process(Pending)``), both run on worker threads. Inputs other than image and CameraInfo
    get their own subscription whose callback calls :meth:`pair`. Every frame the processing
    gives no output for goes to :meth:`drop`.
    """

    def start_pipeline(
        self,
        kinds: tuple[str, ...],
        timeout: float,
        load: Callable[[ModelInfo], None],
        process: Callable[[Pending], None],
        work: str,
        early: Callable[[Pending], bool] | None = None,
    ) -> None:
        """``work`` names what the processing does, for drop messages ("a refinement"); ``early``:
        see :class:`StampPairer`."""
        p = self.params
        # The workers run thousands of short torch operations, each taking the GIL back; with
        # Python's default 5 ms switch interval, any busy Python thread in the process (message
        # conversion, a recorder, another node) makes each wait its full turn, and a refinement
        # ran many times slower than alone. Process-wide, so only ever lowered.
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
        self.diagnostics = Diagnostics(
            self, topic=p["diagnostics_topic"], hardware_id=p["device"], period=p["diagnostics_period"]
        )
        self._kinds, self._work = kinds, work
        self._drop_lock = threading.Lock()
        self.dropped_total = 0
        self._dropped_since_take = 0
        self._accounted: OrderedDict[tuple[int, int], None] = OrderedDict()  # stamps already dropped or answered
        self._dropped_pub = self.create_publisher(Header, p["dropped_topic"], qos.DROPPED)
        self._pairer = StampPairer(kinds, timeout, p["max_pending"], early=early)
        name = self.get_name()
        self._loader = LatestWorker(load, f"{name}-load", self._on_worker_error)
        self._worker = LatestWorker(process, f"{name}-work", self._on_worker_error)
        self._input_subs: list = []
        self._retired: list[tuple[Any, float]] = []  # (subscription, time.monotonic() it was retired)
        self.reliability = ""
        self._subscribe_inputs("reliable" if p["image_qos"] == "auto" else p["image_qos"])
        if p["image_qos"] == "auto":
            self._adapt_qos()
            self.create_timer(1.0, self._adapt_qos)
        self.create_subscription(ModelInfo, p["model_info_topic"], self._on_model_info, qos.LATCHED)
        self.create_timer(min(0.1, timeout / 4), self._on_timer)

    # ---- inputs and their QoS ----------------------------------------------------------------
    def _subscribe_inputs(self, reliability: str) -> None:
        p = self.params
        self._retire(self._input_subs)
        profile = qos.image_qos(reliability)
        current = object()  # the retired subscriptions' callbacks see another and ignore their messages
        self._inputs_token = current
        self._input_subs = [
            self.create_subscription(
                msg_type,
                p[topic],
                lambda msg, callback=callback: self._inputs_token is current and callback(msg),
                profile,
                event_callbacks=SubscriptionEventCallbacks(
                    incompatible_qos=lambda event, t=p[topic]: self._on_incompatible_qos(t, event),
                    message_lost=lambda event, t=p[topic]: self._on_message_lost(t, event),
                ),
            )
            for msg_type, topic, callback in (
                (Image, "image_topic", self._on_image),
                (CameraInfo, "camera_info_topic", self._on_camera_info),
            )
        ]
        self.reliability = reliability

    def _retire(self, subscriptions: list) -> None:
        """Stop waiting on ``subscriptions``' QoS events now; :meth:`_destroy_retired` destroys them later.

        Destroying a subscription destroys its event handlers, and rclpy's executors (Humble, Jazzy)
        raise InvalidHandle in their own thread, which ends the spin, when that happens while another
        thread adds the handlers to a wait set (ros2/rclpy#1284). Once out of the node's waitables
        for a while, no wait set holds them any more.
        """
        for sub in subscriptions:
            for handler in sub.event_handlers:
                self.remove_waitable(handler)
            self._retired.append((sub, time.monotonic()))

    def _destroy_retired(self, min_age: float = RETIRED_MIN_AGE) -> None:
        now, kept = time.monotonic(), []
        for sub, retired_at in self._retired:
            if now - retired_at < min_age:
                kept.append((sub, retired_at))
                continue
            handlers, sub.event_handlers = sub.event_handlers, []  # no longer the node's waitables
            for handler in handlers:
                handler.destroy()
            self.destroy_subscription(sub)
        self._retired = kept

    def _adapt_qos(self) -> None:
        """image_qos=auto: request the reliability the publishers offer (as ``ros2 bag record`` does)."""
        self._destroy_retired()
        p = self.params
        publishers = [
            *self.get_publishers_info_by_topic(self.resolve_topic_name(p["image_topic"])),
            *self.get_publishers_info_by_topic(self.resolve_topic_name(p["camera_info_topic"])),
        ]
        offered = qos.offered_reliability(publishers)
        if offered is None or offered == self.reliability:
            return
        self._subscribe_inputs(offered)
        if offered == "best_effort":
            self.diagnostics.warn(
                f"a publisher of {p['image_topic']} or {p['camera_info_topic']} offers best-effort QoS: subscribed "
                "best effort; large images (512x512 mono16 and up) may be lost in transport: publish them reliable, "
                "or give the publisher a large shared-memory segment (config/fastdds_large_images.xml)",
                image_qos="best_effort",
            )
        else:
            self.diagnostics.ok(f"the publishers of {p['image_topic']} offer reliable QoS: subscribed reliable",
                                image_qos="reliable")

    def _on_incompatible_qos(self, topic: str, event) -> None:
        if self.params["image_qos"] == "auto":
            return  # _adapt_qos resubscribes within a second
        self.diagnostics.error(
            f"a publisher of {topic} offers a QoS this node's {self.reliability} subscription cannot accept "
            f"(policy {event.last_policy_kind.name}): its messages are not received; set parameter image_qos "
            "(auto follows the publishers)",
            topic=topic,
            outcome="incompatible_qos",
        )

    def _on_message_lost(self, topic: str, event) -> None:
        # Lost in transport: no stamp to account for, but never silent. A lost image is a lost
        # frame; a lost CameraInfo is not counted here: its image times out and is dropped then.
        if topic == self.params["image_topic"]:
            with self._drop_lock:
                self.dropped_total += event.total_count_change
                self._dropped_since_take += event.total_count_change
        self.diagnostics.warn(
            f"{event.total_count_change} message(s) on {topic} lost in transport (total {event.total_count})",
            topic=topic,
            outcome="lost",
            reason="lost in transport",
            count=event.total_count_change,
        )

    # ---- callbacks: hand work on ------------------------------------------------------------
    def _on_model_info(self, msg: ModelInfo) -> None:
        self._loader.submit(msg)

    def _on_image(self, msg: Image) -> None:
        self.pair("image", msg)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.pair("camera_info", msg)

    def _on_timer(self) -> None:
        for entry in self._pairer.expire():
            if entry.reason.startswith("more than"):
                self.drop(entry.key, "overflow", entry.reason)
            else:
                self.drop(entry.key, "timeout", entry.reason, "ERROR", missing=",".join(entry.missing(self._kinds)))

    def pair(self, kind: str, msg) -> None:
        """Add one input; a complete set goes to the worker, replacing (and dropping) a waiting one."""
        self._submit(self._pairer.add(kind, msg))

    def repair(self, entry: Pending) -> None:
        """Put an entry released early back to wait for the kinds it lacks (its deadline restarts)."""
        for kind, msg in entry.parts.items():
            complete = self._pairer.add(kind, msg)
        self._submit(complete)

    def _submit(self, complete: Pending | None) -> None:
        if complete is None:
            return
        replaced = self._worker.submit(complete)
        if replaced is not None:
            self.drop(
                replaced.key,
                "superseded",
                f"image {convert.stamp_to_str(complete.key)} is newer and {self._work} is running "
                "(only the newest input is kept)",
            )
            self.superseded(replaced)

    def superseded(self, entry: Pending) -> None:
        """Hook (executor thread): ``entry`` was replaced by a newer one before it ran; it is
        dropped (accounted for) already. Nothing by default."""

    # ---- frame accounting ----------------------------------------------------------------------
    def drop(self, key: tuple[int, int], outcome: str, reason: str, level: str = "WARN", *,
             report: bool = True, **kv) -> None:
        """Account for a frame this node gives no output for, once per stamp: count it, publish
        its stamp on ``dropped_topic`` and (``report``) log it and put it on ``/diagnostics`` at
        ``level`` with the key-values ``stamp``, ``outcome`` (a word: superseded, refused,
        timeout, ...), ``reason`` (text), ``dropped_total`` and ``kv``. The pairer forgets the
        stamp, so no later message of it is reported again."""
        self._pairer.discard(key)
        with self._drop_lock:
            if key in self._accounted:
                return
            self._accounted[key] = None
            while len(self._accounted) > 1000:
                self._accounted.popitem(last=False)
            self.dropped_total += 1
            self._dropped_since_take += 1
            total = self.dropped_total
        stamp = convert.stamp_to_str(key)
        self._dropped_pub.publish(Header(stamp=Time(sec=key[0], nanosec=key[1])))
        if report:
            self.diagnostics.report(
                level, f"image {stamp} dropped: {reason}", stamp=stamp, outcome=outcome, reason=reason,
                dropped_total=total, **kv
            )

    def pass_on(self, key: tuple[int, int]) -> None:
        """A frame this node deliberately gives no output for (not a drop: not counted or reported):
        its stamp on ``dropped_topic`` so that the next node does not wait for it."""
        self.answered(key)
        self._dropped_pub.publish(Header(stamp=Time(sec=key[0], nanosec=key[1])))

    def answered(self, key: tuple[int, int]) -> None:
        """Mark a stamp as answered: a later drop report of it (e.g. from upstream) is not counted,
        and its inputs still to come (e.g. an initial pose it did not wait for) are ignored."""
        self._pairer.discard(key)
        with self._drop_lock:
            self._accounted[key] = None
            while len(self._accounted) > 1000:
                self._accounted.popitem(last=False)

    def take_dropped(self) -> int:
        """Frames dropped since the previous call (for a result's ``dropped`` field)."""
        with self._drop_lock:
            n, self._dropped_since_take = self._dropped_since_take, 0
        return n

    def read_xray(self, entry: Pending, **options) -> Xray | None:
        """The entry's image + CameraInfo as an :class:`Xray` with the shared parameters (``options``
        add to them), or None after refusing the frame (too small, bad encoding, size mismatch...)."""
        p = self.params
        image, info = entry.parts["image"], entry.parts["camera_info"]
        try:
            self.check_size(image)
            return convert.xray_from_messages(
                image, info, sdd_mm=p["sdd_mm"], intensity=p["intensity"], i0=p["i0"] or None, **options
            )
        except ValueError as exc:
            self.refuse(entry, str(exc))
            return None

    def refuse(self, entry: Pending, reason: str) -> None:
        """Drop the entry's frame as bad input (ERROR, ``outcome=refused``), naming the image's sizes."""
        image, info = entry.parts["image"], entry.parts["camera_info"]
        self.drop(
            entry.key,
            "refused",
            reason,
            "ERROR",
            encoding=image.encoding,
            image_size=f"{image.height}x{image.width}",
            camera_info_size=f"{info.height}x{info.width}",
        )

    def check_size(self, image: Image) -> None:
        """ValueError for an image with fewer rows or columns than ``min_image_size``."""
        n = self.params["min_image_size"]
        if image.height < n or image.width < n:
            raise ValueError(
                f"image is {image.height}x{image.width} px, too small to register "
                f"(parameter min_image_size: {n} px)"
            )

    def _on_worker_error(self, job, exc: BaseException) -> None:
        message = f"internal error: {type(exc).__name__}: {exc}"
        if isinstance(job, Pending):
            self.drop(job.key, "internal_error", message, "ERROR")
        else:
            self.diagnostics.error(f"{message} (on model info)")

    def destroy_node(self) -> None:
        self._worker.stop()
        self._loader.stop()
        self._destroy_retired(min_age=0.0)
        self.diagnostics.destroy()
        super().destroy_node()
