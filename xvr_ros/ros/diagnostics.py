"""Status reporting on ``/diagnostics`` (``diagnostic_msgs/DiagnosticArray``) for the xvr_ros nodes.

``diagnostic_updater`` is not available from PyPI; this is the small part of it the nodes need.
A node owns one :class:`Diagnostics`:

- :meth:`Diagnostics.report` publishes an *event* right away (a bad image, a dropped frame, a
  finished registration) and logs it at the matching level;
- :meth:`Diagnostics.set_state` sets the node's *standing* status (``"model loaded"``,
  ``"no volume loaded"``), publishes it, and a timer re-publishes it every ``period`` seconds,
  as ``diagnostic_updater`` does, so monitors see the node's current health.

Both use one ``DiagnosticStatus`` name (default: the node's fully qualified name) and the node's
hardware id. Levels are ``OK``, ``WARN``, ``ERROR`` and ``STALE`` (strings or the message's bytes).
Thread-safe: worker threads report too.

Usage::

    diag = Diagnostics(node)                        # publishes on /diagnostics
    diag.set_state("WARN", "no model loaded", model_info_topic="xvr/model_info")
    diag.report("ERROR", "unsupported image encoding 'yuv422'", stamp="12.000000000")
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.qos import QoSProfile

__all__ = ["LEVELS", "Diagnostics", "level_name"]

LEVELS: dict[str, bytes] = {
    "OK": DiagnosticStatus.OK,
    "WARN": DiagnosticStatus.WARN,
    "ERROR": DiagnosticStatus.ERROR,
    "STALE": DiagnosticStatus.STALE,
}
_NAMES = {v: k for k, v in LEVELS.items()}


def _level(level: str | bytes | int) -> bytes:
    if isinstance(level, str) and level.upper() in LEVELS:
        return LEVELS[level.upper()]
    if isinstance(level, int) and bytes([level]) in _NAMES:
        return bytes([level])
    if isinstance(level, bytes) and level in _NAMES:
        return level
    raise ValueError(f"unknown diagnostic level {level!r}; use one of {list(LEVELS)}")


def level_name(level: bytes | int) -> str:
    r"""``b'\x02'`` (or 2) -> ``"ERROR"``."""
    return _NAMES[_level(level)]


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class Diagnostics:
    """Publishes a node's ``DiagnosticStatus`` on ``topic``.

    Args:
        node: the node that owns the publisher (and whose logger is used).
        name: the status name; default the node's fully qualified name (e.g. ``/pose_estimator``).
        hardware_id: ``DiagnosticStatus.hardware_id`` (e.g. the C-arm or the compute device).
        topic: default ``/diagnostics`` (absolute, as diagnostic aggregators expect).
        period: seconds between re-publications of the standing status; 0 = only on change.

    """

    def __init__(self, node: Node, *, name: str | None = None, hardware_id: str = "",
                 topic: str = "/diagnostics", period: float = 1.0):
        self._node = node
        self._logger = node.get_logger()
        self.name = name or node.get_fully_qualified_name()
        self.hardware_id = hardware_id
        self._lock = threading.Lock()
        self._state = (DiagnosticStatus.WARN, "starting", {})
        self._pub = node.create_publisher(DiagnosticArray, topic, QoSProfile(depth=50))
        self._timer = node.create_timer(period, self._heartbeat) if period and period > 0 else None

    # ----------------------------------------------------------------------------------------
    def status(self, level, message: str, values: Mapping | None = None) -> DiagnosticStatus:
        """A ``DiagnosticStatus`` with this reporter's name and hardware id."""
        return DiagnosticStatus(
            level=_level(level),
            name=self.name,
            message=message,
            hardware_id=self.hardware_id,
            values=[KeyValue(key=str(k), value=_format(v)) for k, v in (values or {}).items()],
        )

    def publish(self, *statuses: DiagnosticStatus) -> None:
        msg = DiagnosticArray(status=list(statuses))
        msg.header.stamp = self._node.get_clock().now().to_msg()
        try:
            self._pub.publish(msg)
        except Exception as exc:  # noqa: BLE001 - the node may be shutting down; never raise from a report
            self._logger.debug(f"could not publish diagnostics: {exc}")

    def _log(self, level: bytes, message: str) -> None:
        # rclpy's logger refuses a call site whose severity changes between calls: one line each.
        try:
            if level == DiagnosticStatus.OK:
                self._logger.info(message)
            elif level == DiagnosticStatus.ERROR:
                self._logger.error(message)
            else:
                self._logger.warning(message)
        except Exception:  # noqa: BLE001 - a report must never raise into a callback or worker
            pass

    # ----------------------------------------------------------------------------------------
    def report(self, level, message: str, values: Mapping | None = None, *, log: bool = True, **kv) -> None:
        """Publish one event now (and log it at ``level``). ``values``/``kv`` become key-values."""
        lvl = _level(level)
        if log:
            self._log(lvl, message)
        self.publish(self.status(lvl, message, {**(values or {}), **kv}))

    def ok(self, message: str, **kv) -> None:
        self.report("OK", message, **kv)

    def warn(self, message: str, **kv) -> None:
        self.report("WARN", message, **kv)

    def error(self, message: str, **kv) -> None:
        self.report("ERROR", message, **kv)

    def set_state(self, level, message: str, values: Mapping | None = None, *, log: bool = True, **kv) -> None:
        """Set the standing status (re-published every ``period`` s), publish and log it now."""
        lvl = _level(level)
        values = {**(values or {}), **kv}
        with self._lock:
            self._state = (lvl, message, values)
        if log:
            self._log(lvl, message)
        self.publish(self.status(lvl, message, values))

    @property
    def state(self) -> tuple[str, str, dict]:
        """(level name, message, key-values) of the standing status."""
        with self._lock:
            lvl, message, values = self._state
        return _NAMES[lvl], message, dict(values)

    def _heartbeat(self) -> None:
        with self._lock:
            lvl, message, values = self._state
        self.publish(self.status(lvl, message, values))

    def destroy(self) -> None:
        if self._timer is not None:
            self._node.destroy_timer(self._timer)
            self._timer = None
