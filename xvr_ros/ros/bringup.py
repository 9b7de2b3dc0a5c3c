"""What the intraoperative system runs: the node list and where each node's parameters come from.

This module is the single definition. It is used three ways:

* ``xvr-ros bringup [--config FILE] [--namespace NS] [--device cpu] [--only model_manager,refiner]``
  (or ``python -m xvr_ros.ros.bringup`` with the same options, from outside the source tree)
  runs the nodes in **one process** on one ``MultiThreadedExecutor`` and shuts down cleanly on
  SIGINT/SIGTERM; the default config is the installed ``share/xvr_ros/config/intraop.yaml``;
* :func:`make_nodes`, :func:`running` and :func:`spin_nodes` do the same from Python (the demo,
  the tests);
* ``launch/intraop.launch.py`` (``ros2 launch xvr_ros intraop.launch.py``, real ROS installs)
  starts one process per node from :data:`NODES` with the parameters :func:`plan` resolves here.

Parameters come from a standard ROS 2 parameters file: top-level keys are node names, each with
a ``ros__parameters`` mapping. They are resolved as rcl resolves a ``--params-file``: a key is a
fully qualified node name (a leading ``/`` is implied), ``/**`` matches any run of namespace
segments and ``*`` one segment (or the rest of one); every section that matches the node applies, in file order (later
wins), nested mappings become dotted names. So ``/**:`` holds parameters shared by all nodes and
``/**/model_manager:`` holds one node's, whatever the namespace. (A plain ``model_manager:``
section only matches the node in the root namespace, as in rcl.) ``--device`` then overrides the
``device`` parameter of every node.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "NODES",
    "NodeSpec",
    "ConfigError",
    "default_config_path",
    "load_config",
    "node_parameters",
    "select",
    "plan",
    "make_nodes",
    "running",
    "spin_nodes",
    "run_node",
    "add_arguments",
    "run",
    "main",
]

PACKAGE = "xvr_ros"
CONFIG_NAME = "intraop.yaml"
LARGE_IMAGE_PROFILE = "fastdds_large_images.xml"


@dataclass(frozen=True)
class NodeSpec:
    """One node of the system.

    Attributes:
        name: the node's name (also what its parameters section matches).
        module: Python module holding the node class.
        cls: the :class:`rclpy.node.Node` subclass; it takes the node options as keyword
            arguments (``namespace``, ``parameter_overrides``, ``context``).
        executable: the executable installed in ``lib/xvr_ros`` (for ``ros2 run`` / launch).

    """

    name: str
    module: str
    cls: str
    executable: str

    def load(self) -> type:
        """Import and return the node class."""
        return getattr(importlib.import_module(self.module), self.cls)


#: The intraoperative system, in start-up order.
NODES: tuple[NodeSpec, ...] = (
    NodeSpec("model_manager", "xvr_ros.ros.model_manager", "ModelManager", "model_manager"),
    NodeSpec("pose_estimator", "xvr_ros.ros.pose_estimator", "PoseEstimator", "pose_estimator"),
    NodeSpec("refiner", "xvr_ros.ros.refiner", "Refiner", "refiner"),
)


class ConfigError(ValueError):
    """A parameters file or selection that cannot be used; the message says what is wrong."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
def share_path(name: str) -> Path:
    """``share/xvr_ros/config/<name>`` of the first install prefix that has it, else the source
    tree's ``config/<name>``."""
    for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        path = Path(prefix) / "share" / PACKAGE / "config" / name
        if path.is_file():
            return path
    return Path(__file__).resolve().parents[2] / "config" / name


def default_config_path() -> Path:
    """The parameters file the nodes start from: ``config/intraop.yaml`` (see :func:`share_path`)."""
    return share_path(CONFIG_NAME)


def use_large_image_profile(env: dict | None = None) -> Path | None:
    """Point Fast DDS at the package's profile for large images (shared memory big enough for a
    2048x2048 mono16 frame) unless the user chose a profile or another middleware -> the path set.

    Must run before ``rclpy.init``: Fast DDS reads it when the participant is created.
    """
    env = os.environ if env is None else env
    if env.get("FASTRTPS_DEFAULT_PROFILES_FILE") or env.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != (
        "rmw_fastrtps_cpp"
    ):
        return None
    path = share_path(LARGE_IMAGE_PROFILE)
    if not path.is_file():
        return None
    env["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(path)
    return path


def load_config(config: str | os.PathLike | Mapping | None = None) -> dict:
    """Read and check a ROS 2 parameters file (a path, or an already parsed mapping).

    Returns the mapping ``{node key: {"ros__parameters": {...}}}`` in file order.
    """
    import yaml

    if config is None:
        config = default_config_path()
    if isinstance(config, Mapping):
        data, where = dict(config), "parameters"
    else:
        path = Path(config).expanduser()
        where = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the parameters file: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of node names to 'ros__parameters', got {type(data).__name__}")
    for key, section in data.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: node key {key!r} is not a name")
        if not isinstance(section, dict) or "ros__parameters" not in section:
            raise ConfigError(f"{where}: section {key!r} needs a 'ros__parameters' mapping")
        if not isinstance(section["ros__parameters"], dict):
            raise ConfigError(f"{where}: {key}.ros__parameters must be a mapping")
    return data


def _key_regex(key: str) -> re.Pattern:
    """Rcl's node-key matching: '/**' = any number of segments, '*' = one segment (or part)."""
    if not key.startswith("/"):
        key = "/" + key
    out, i = [], 0
    while i < len(key):
        if key.startswith("/**", i):
            out.append(r"(/[^/]+)*")
            i += 3
        elif key[i] == "*":
            out.append(r"[^/]+")
            i += 1
        else:
            out.append(re.escape(key[i]))
            i += 1
    return re.compile("".join(out))


def _fqn(name: str, namespace: str = "") -> str:
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    return f"{ns}/{name}"


def _flatten(params: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def node_parameters(
    config: str | os.PathLike | Mapping | None,
    name: str,
    namespace: str = "",
    *,
    device: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The parameters node ``name`` in ``namespace`` gets from ``config`` (rcl's matching rules),
    then ``device`` (if given) and ``overrides``."""
    data = load_config(config)
    fqn = _fqn(name, namespace)
    params: dict[str, Any] = {}
    for key, section in data.items():
        if _key_regex(key).fullmatch(fqn):
            params.update(_flatten(section["ros__parameters"]))
    if device:
        params["device"] = device
    params.update(overrides or {})
    return params


def select(only: str | Iterable[str] | None = None) -> list[NodeSpec]:
    """The specs to run: all of :data:`NODES`, or those named in ``only`` (comma-separated or a list)."""
    if only is None or only == "":
        return list(NODES)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    known = {s.name: s for s in NODES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown node(s) {unknown}; the system has {list(known)}")
    return [s for s in NODES if s.name in names]


def plan(
    config: str | os.PathLike | Mapping | None = None,
    *,
    namespace: str = "",
    device: str | None = None,
    only: str | Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[tuple[NodeSpec, dict[str, Any]]]:
    """``[(spec, parameters)]`` for the selected nodes: what bringup and the launch file start.

    ``overrides`` maps node names to extra parameters (applied last).
    """
    data = load_config(config)
    specs = select(only)
    extra = dict(overrides or {})
    unknown = [n for n in extra if n not in {s.name for s in NODES}]
    if unknown:
        raise ConfigError(f"overrides for unknown node(s) {unknown}")
    return [(s, node_parameters(data, s.name, namespace, device=device, overrides=extra.get(s.name))) for s in specs]


# --------------------------------------------------------------------------------------------
# Running in one process
# --------------------------------------------------------------------------------------------
def make_nodes(
    config: str | os.PathLike | Mapping | None = None,
    *,
    namespace: str = "",
    device: str | None = None,
    only: str | Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    context=None,
) -> list:
    """Create the selected nodes (rclpy must be initialised) with their parameters from ``config``.

    On an error creating one node, the ones already created are destroyed and the error raised.
    """
    from rclpy.parameter import Parameter

    nodes = []
    try:
        for spec, params in plan(config, namespace=namespace, device=device, only=only, overrides=overrides):
            kwargs = dict(parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
            if namespace:
                kwargs["namespace"] = "/" + namespace.strip("/")
            if context is not None:
                kwargs["context"] = context
            nodes.append(spec.load()(**kwargs))
    except BaseException:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.destroy_node()
        raise
    return nodes


def _executor(nodes: Sequence, num_threads: int | None, context=None):
    from rclpy.executors import MultiThreadedExecutor

    # Callbacks hand long work to worker threads, but give every node a thread of its own anyway.
    executor = MultiThreadedExecutor(num_threads=num_threads or max(4, len(nodes) + 1), context=context)
    for node in nodes:
        executor.add_node(node)
    return executor


_STOPPING = "_xvr_stopping"  # set on an executor by _teardown before it shuts it down


def _spin(executor) -> None:
    from rclpy.executors import ExternalShutdownException

    try:
        executor.spin()
    except ExternalShutdownException:
        pass
    except Exception:  # noqa: BLE001
        # A spin_once still under way when the shutdown destroys the executor's handles raises
        # (rclpy InvalidHandle); during a requested shutdown that is the shutdown, not an error.
        if not getattr(executor, _STOPPING, False):
            raise


def _teardown(executor, thread: threading.Thread, nodes: Sequence, timeout: float = 10.0) -> None:
    setattr(executor, _STOPPING, True)
    executor.shutdown(timeout_sec=timeout)
    thread.join(timeout)
    for node in reversed(nodes):
        with contextlib.suppress(Exception):
            node.destroy_node()


@contextlib.contextmanager
def running(
    config: str | os.PathLike | Mapping | None = None,
    *,
    namespace: str = "",
    device: str | None = None,
    only: str | Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    context=None,
    num_threads: int | None = None,
):
    """Run the nodes on an executor in a background thread for the ``with`` block; yield the nodes.

    rclpy must be initialised (``rclpy.init()``); the caller shuts it down afterwards.
    """
    nodes = make_nodes(config, namespace=namespace, device=device, only=only, overrides=overrides, context=context)
    executor = _executor(nodes, num_threads, context)
    thread = threading.Thread(target=_spin, args=(executor,), name="xvr-bringup-executor", daemon=True)
    thread.start()
    try:
        yield nodes
    finally:
        _teardown(executor, thread, nodes)


def spin_nodes(nodes: Sequence, *, stop: threading.Event | None = None, num_threads: int | None = None,
               handle_signals: bool = True, context=None) -> bool:
    """Spin ``nodes`` on one MultiThreadedExecutor until ``stop`` is set, SIGINT/SIGTERM arrives
    (when called from the main thread with ``handle_signals``) or the ROS context shuts down; then
    stop the executor and destroy the nodes. Return False if the executor stopped by itself (an
    exception in its thread, printed there): nothing would run any more, so the caller should exit.

    The executor spins in a helper thread while this thread waits in Python, so a signal is
    always seen promptly (rclpy's C-level handler can be missed by an executor blocked in wait).
    A second SIGINT/SIGTERM during shutdown is not caught.
    """
    import rclpy

    stop = stop or threading.Event()
    executor = _executor(nodes, num_threads, context)
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            stop.set()
            for sig, handler in previous.items():  # a second signal is not caught
                signal.signal(sig, handler)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, on_signal)
    thread = threading.Thread(target=_spin, args=(executor,), name="xvr-bringup-executor", daemon=True)
    thread.start()
    ctx = context or rclpy.get_default_context()
    executor_died = False
    try:
        while not stop.wait(0.1):
            if not thread.is_alive() or not ctx.ok():
                executor_died = not thread.is_alive() and ctx.ok()
                break
        return not executor_died
    finally:
        _teardown(executor, thread, nodes)
        for sig, handler in previous.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, handler)


def _init(args: list[str] | None):
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    use_large_image_profile()
    # Signals are handled in spin_nodes (Python-level, main thread).
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)


def run_node(node_class: type, args: list[str] | None = None) -> int:
    """``main`` of a single-node executable: init, create, spin until SIGINT/SIGTERM, shut down."""
    import rclpy

    _init(args if args is not None else sys.argv)
    try:
        try:
            node = node_class()
        except Exception as exc:  # noqa: BLE001 - a clear line instead of a traceback
            print(f"{node_class.__name__}: cannot start: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        if not spin_nodes([node]):
            print(f"{node_class.__name__}: error: the executor stopped (see the exception above)", file=sys.stderr)
            return 1
        return 0
    finally:
        rclpy.try_shutdown()


DESCRIPTION = "Run the xvr_ros nodes in one process (what launch/intraop.launch.py starts as separate processes)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bringup options, shared by ``python -m xvr_ros.ros.bringup`` and ``xvr-ros bringup``."""
    p.add_argument(
        "--config",
        default=None,
        help="ROS 2 parameters file (default: the installed share/xvr_ros/config/intraop.yaml, "
        f"else the source tree's; here {default_config_path()})",
    )
    p.add_argument("--namespace", default="", help="namespace for all nodes (default: root)")
    p.add_argument("--device", default=None, help="override every node's 'device' parameter (cpu, cuda, ...)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(s.name for s in NODES)}")
    p.add_argument("--threads", type=int, default=None, help="executor threads (default: max(4, nodes + 1))")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvr_ros.ros.bringup", description=DESCRIPTION)
    add_arguments(p)
    return p


def run(args: argparse.Namespace, ros_argv: list[str]) -> int:
    """Run the nodes ``args`` (from :func:`add_arguments`) select until SIGINT/SIGTERM -> exit code.

    ``ros_argv`` goes to ``rclpy.init`` (``[program, "--ros-args", ...]`` or just ``[program]``).
    """
    import rclpy

    try:
        entries = plan(args.config, namespace=args.namespace, device=args.device, only=args.only)
    except ConfigError as exc:
        print(f"bringup: error: {exc}", file=sys.stderr)
        return 2
    _init(ros_argv)
    try:
        try:
            nodes = make_nodes(args.config, namespace=args.namespace, device=args.device, only=args.only)
        except Exception as exc:  # noqa: BLE001 - a clear line instead of a traceback
            print(f"bringup: cannot start the nodes: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        names = ", ".join(n.get_fully_qualified_name() for n in nodes)
        nodes[0].get_logger().info(f"bringup: running {names} in one process ({len(entries)} nodes)")
        if not spin_nodes(nodes, num_threads=args.threads):
            print("bringup: error: the executor stopped (see the exception above); the nodes were shut down",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        rclpy.try_shutdown()


def main(argv: list[str] | None = None) -> int:
    """``python -m xvr_ros.ros.bringup [options] [--ros-args ...]``."""
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv if argv is None else [sys.argv[0], *argv])
    args = build_parser().parse_args(remove_ros_args(argv)[1:])
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
