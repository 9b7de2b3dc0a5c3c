"""rosbag2 bags (mcap or sqlite3) read and written without the ``ros2`` CLI, with ``rosbags``.

Messages are serialised and deserialised by rclpy (``rclpy.serialization``): the bytes are the
CDR a ROS 2 node puts on the wire, so bags written here play with ``ros2 bag play`` and bags
from ``ros2 bag record`` read here. Connections carry the ROS 2 Jazzy type names, definitions
and type hashes (rosbags' Jazzy typestore, plus this package's own messages read from their
installed ``.msg`` files), and the offered QoS a ``ros2 bag play`` republishes with.

A bag is a directory. :class:`BagWriter` writes it under a temporary name beside the target and
renames it into place when closed, so a crash never leaves a half-written bag under the name.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

__all__ = ["STORAGES", "BagError", "BagInfo", "BagMessage", "BagWriter", "bag_info", "message_class", "msgtype_of",
           "read_messages"]

STORAGES = ("mcap", "sqlite3")


class BagError(RuntimeError):
    """A bag that cannot be read or written, with the reason."""


def msgtype_of(msg) -> str:
    """``sensor_msgs/msg/Image`` for an rclpy message instance or class."""
    cls = msg if isinstance(msg, type) else type(msg)
    parts = cls.__module__.split(".")  # e.g. sensor_msgs.msg._image
    return f"{parts[0]}/{parts[1]}/{cls.__name__}"


def message_class(msgtype: str):
    """The rclpy class of ``pkg/msg/Name`` (also ``pkg/Name``); BagError when not importable."""
    parts = msgtype.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise BagError(f"not a ROS 2 message type name: {msgtype!r}")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError) as exc:
        raise BagError(f"message type {msgtype} is not available in this ROS environment ({exc})") from None


@functools.lru_cache(maxsize=1)
def typestore():
    """Rosbags' ROS 2 Jazzy typestore plus the ``xvr_ros`` messages (from their installed files)."""
    from ament_index_python.packages import (
        PackageNotFoundError,
        get_package_share_directory,
    )
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    try:
        share = Path(get_package_share_directory("xvr_ros"))
    except PackageNotFoundError:
        share = Path(__file__).resolve().parents[2]  # a source checkout
    types = {}
    for path in sorted((share / "msg").glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"xvr_ros/msg/{path.stem}"))
    store.register(types)
    return store


def _qos(depth: int = 10, *, latched: bool = False, best_effort: bool = False):
    from rosbags.interfaces import (
        Qos,
        QosDurability,
        QosHistory,
        QosLiveliness,
        QosReliability,
        QosTime,
    )

    zero = QosTime(sec=0, nsec=0)  # rmw "default": no deadline, lifespan or lease
    return Qos(
        history=QosHistory.KEEP_LAST, depth=depth,
        reliability=QosReliability.BEST_EFFORT if best_effort else QosReliability.RELIABLE,
        durability=QosDurability.TRANSIENT_LOCAL if latched else QosDurability.VOLATILE,
        deadline=zero, lifespan=zero, liveliness=QosLiveliness.AUTOMATIC, liveliness_lease_duration=zero,
        avoid_ros_namespace_conventions=False,
    )


#: Offered QoS recorded per topic type (what ``ros2 bag play`` republishes with).
_QOS_BY_TYPE = {"tf2_msgs/msg/TFMessage": dict(depth=100), "diagnostic_msgs/msg/DiagnosticArray": dict(depth=100),
                "xvr_ros/msg/ModelInfo": dict(depth=1, latched=True)}


class BagWriter:
    """Write rclpy messages to a new bag ``path`` (a directory; see the module docstring).

    ``storage``: ``"mcap"`` (ROS 2 Jazzy's default) or ``"sqlite3"``. ``overwrite``: replace an
    existing bag when closing. Use as a context manager; an exception discards the bag.
    """

    def __init__(self, path: str | os.PathLike, storage: str = "mcap", *, overwrite: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise BagError(f"unknown bag storage {storage!r}; use one of {', '.join(STORAGES)}")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise BagError(f"{self.path} exists: choose another output or remove it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._overwrite = overwrite
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self._tmp / self.path.name, version=8, storage_plugin=plugin)
        self._writer.open()
        self._connections: dict[str, object] = {}
        self.count = 0

    def connection(self, topic: str, msgtype: str, **qos):
        """The bag's connection for ``topic`` (created on first use)."""
        conn = self._connections.get(topic)
        if conn is None:
            qos = qos or _QOS_BY_TYPE.get(msgtype, {})
            try:
                conn = self._writer.add_connection(topic, msgtype, typestore=typestore(),
                                                   offered_qos_profiles=[_qos(**qos)])
            except Exception as exc:  # noqa: BLE001 - rosbags raises its own error types
                raise BagError(f"cannot add topic {topic} ({msgtype}) to the bag: {exc}") from None
            self._connections[topic] = conn
        elif conn.msgtype != msgtype:
            raise BagError(f"topic {topic} already holds {conn.msgtype}, not {msgtype}")
        return conn

    def write(self, topic: str, msg, time_ns: int) -> None:
        """Serialise an rclpy message onto ``topic`` at bag time ``time_ns`` (ns since the epoch)."""
        from rclpy.serialization import serialize_message

        self.write_raw(topic, msgtype_of(msg), serialize_message(msg), time_ns)

    def write_raw(self, topic: str, msgtype: str, data: bytes, time_ns: int) -> None:
        """Write already serialised bytes (as recorded, or deliberately corrupt for a test)."""
        self._writer.write(self.connection(topic, msgtype), int(time_ns), bytes(data))
        self.count += 1

    def set_custom_data(self, key: str, value: str) -> None:
        """A string in the bag's ``metadata.yaml`` (``custom_data``)."""
        self._writer.set_custom_data(key, value)

    def close(self) -> Path:
        """Finish the bag and move it to ``path``."""
        self._writer.close()
        old = None
        if self.path.exists():
            if not self._overwrite:
                raise BagError(f"{self.path} appeared while writing: the new bag is left in {self._tmp}")
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.rename(self.path, old)
        os.rename(self._tmp / self.path.name, self.path)
        shutil.rmtree(self._tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - discarding anyway
            pass
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class BagInfo:
    """What a bag holds: ``topics`` maps topic -> (type, message count); times in ns."""

    path: Path
    storage: str
    topics: dict[str, tuple[str, int]]
    start_ns: int
    end_ns: int
    custom_data: dict[str, str]

    def describe(self) -> str:
        """``/a (sensor_msgs/msg/Image, 12), ...`` for messages."""
        return ", ".join(f"{t} ({ty}, {n})" for t, (ty, n) in sorted(self.topics.items())) or "no topics"


def _reader(path: Path):
    from rosbags.rosbag2 import Reader

    if not path.exists():
        raise BagError(f"no bag at {path}")
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # noqa: BLE001 - rosbags' errors name the problem
        raise BagError(f"cannot read bag {path}: {exc}") from None
    return reader


def bag_info(path: str | os.PathLike) -> BagInfo:
    """Topics, counts, time span and custom data of a bag; BagError if it cannot be opened."""
    path = Path(path)
    reader = _reader(path)
    try:
        topics = {t: (i.msgtype, int(i.msgcount)) for t, i in reader.topics.items()}
        start, end = (int(reader.start_time), int(reader.end_time)) if topics else (0, 0)
    finally:
        reader.close()
    try:  # rosbags opened it, so the metadata is valid YAML
        meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        meta = {}
    custom = {str(k): str(v) for k, v in (meta.get("custom_data") or {}).items()}
    return BagInfo(path, str(meta.get("storage_identifier", "")), topics, start, end, custom)


@dataclass
class BagMessage:
    """One bag message: ``msg`` is the rclpy message, or None with ``error`` saying why."""

    topic: str
    msgtype: str
    time_ns: int
    msg: object = None
    error: str = ""


def read_messages(path: str | os.PathLike, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
    """The messages of ``topics`` (default: all) in bag-time order, deserialised by rclpy.

    A message that does not deserialise comes back with ``error`` set (reading goes on); a bag
    that cannot be opened or read any further raises BagError.
    """
    from rclpy.serialization import deserialize_message

    path = Path(path)
    reader = _reader(path)
    try:
        wanted = set(topics) if topics is not None else None
        conns = [c for c in reader.connections if wanted is None or c.topic in wanted]
        classes: dict[str, object] = {}
        it = reader.messages(connections=conns) if conns else iter(())
        while True:
            try:
                conn, time_ns, raw = next(it)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a damaged storage file
                raise BagError(f"bag {path} cannot be read further: {type(exc).__name__}: {exc}") from None
            item = BagMessage(conn.topic, conn.msgtype, int(time_ns))
            try:
                cls = classes.get(conn.msgtype) or classes.setdefault(conn.msgtype, message_class(conn.msgtype))
                item.msg = deserialize_message(bytes(raw), cls)
            except Exception as exc:  # noqa: BLE001 - corrupt bytes: reported per message
                item.error = f"cannot deserialise a {conn.msgtype} message on {conn.topic}: {exc}"
            yield item
    finally:
        reader.close()
