"""The application side of the pipeline: what a C-arm driver and a consumer of the results run.

:class:`PipelineClient` is one rclpy node spinning in its own thread. It publishes X-ray images
and CameraInfos, sends Finetune goals, and keeps every message the nodes publish (initial poses,
registration results, TF, overlays, diagnostics, ModelInfo) with the ``time.perf_counter()`` of
its arrival, keyed by header stamp. ``on_message`` lets a caller see every output as it arrives
(the replay records them into a bag).

:func:`local_pipeline` is how ``make demo`` and ``xvr-ros replay`` start: the nodes in this
process, a client on their topics, a model made ready.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

#: Output kind -> default topic (the nodes' defaults in config/intraop.yaml).
OUTPUT_TOPICS = {
    "pose": "xray/initial_pose",
    "result": "xray/registration",
    "tf": "/tf",
    "overlay": "xray/overlay",
    "diagnostics": "/diagnostics",
    "model_info": "xvr/model_info",
}
INPUT_TOPICS = {"image": "xray/image", "camera_info": "xray/camera_info"}


class StartupError(RuntimeError):
    """The in-process nodes did not come up, or did not get a model ready."""


def isolated_ros_default() -> None:
    """Keep DDS traffic on this machine unless the user chose otherwise (demo, replay)."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def topics_of(nodes) -> dict[str, str]:
    """The topics the running nodes use (their parameters), as ``{kind: topic}``."""
    by_name = {n.get_name(): n for n in nodes}
    wanted = {"image": ("pose_estimator", "image_topic"), "camera_info": ("pose_estimator", "camera_info_topic"),
              "pose": ("pose_estimator", "initial_pose_topic"), "result": ("refiner", "result_topic"),
              "tf": ("refiner", "tf_topic"), "overlay": ("refiner", "overlay_topic"),
              "diagnostics": ("refiner", "diagnostics_topic"), "model_info": ("refiner", "model_info_topic")}
    topics = {**INPUT_TOPICS, **OUTPUT_TOPICS}
    for kind, (node, param) in wanted.items():
        if node in by_name:
            topics[kind] = by_name[node].get_parameter(param).value
    return topics


class PipelineClient:
    """Publishers for the inputs, subscriptions to every output (see the module docstring).

    ``topics``: ``{kind: topic}`` overriding :data:`INPUT_TOPICS` / :data:`OUTPUT_TOPICS`.
    ``on_message(kind, topic, msg)``: called in the client's thread for every output message.
    """

    def __init__(self, context, name: str = "xvr_client", topics: Mapping[str, str] | None = None,
                 on_message: Callable[[str, str, object], None] | None = None):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.action import ActionClient
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile
        from sensor_msgs.msg import CameraInfo, Image
        from tf2_msgs.msg import TFMessage

        from xvr_ros.action import Finetune
        from xvr_ros.msg import ModelInfo, RegistrationResult
        from xvr_ros.ros import qos

        self.topics = {**INPUT_TOPICS, **OUTPUT_TOPICS, **(topics or {})}
        self.on_message = on_message
        self.node = n = rclpy.create_node(name, context=context)
        reliable = QoSProfile(depth=10)
        self.image_pub = n.create_publisher(Image, self.topics["image"], reliable)
        self.info_pub = n.create_publisher(CameraInfo, self.topics["camera_info"], reliable)
        self.finetune = ActionClient(n, Finetune, "xvr/finetune")
        self.lock = threading.Lock()
        self.got: dict[str, dict] = {k: {} for k in ("pose", "result", "tf", "overlay")}
        self.diagnostics: list = []  # DiagnosticStatus, in arrival order
        self.diagnostic_times: list[float] = []
        self.model_info = None
        for kind, msg_type, profile in (
            ("pose", PoseWithCovarianceStamped, reliable),
            ("result", RegistrationResult, reliable),
            ("overlay", Image, reliable),
        ):
            n.create_subscription(msg_type, self.topics[kind], self._keyed(kind), profile)
        n.create_subscription(TFMessage, self.topics["tf"], self._on_tf, qos.TF)
        n.create_subscription(DiagnosticArray, self.topics["diagnostics"], self._on_diag, QoSProfile(depth=100))
        n.create_subscription(ModelInfo, self.topics["model_info"], self._on_model_info, qos.LATCHED)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, name=f"{name}-spin", daemon=True)
        self.thread.start()

    # ---- subscriptions ----------------------------------------------------------------------
    def _seen(self, kind: str, msg) -> None:
        if self.on_message is not None:
            self.on_message(kind, self.topics[kind], msg)

    def _keyed(self, kind):
        from xvr_ros.ros.convert import stamp_key

        def callback(msg):
            t = time.perf_counter()
            with self.lock:
                self.got[kind].setdefault(stamp_key(msg.header.stamp), (t, msg))
            self._seen(kind, msg)

        return callback

    def _on_tf(self, msg):
        from xvr_ros.ros.convert import stamp_key

        t = time.perf_counter()
        with self.lock:
            for tf in msg.transforms:
                self.got["tf"].setdefault(stamp_key(tf.header.stamp), (t, tf))
        self._seen("tf", msg)

    def _on_diag(self, msg):
        t = time.perf_counter()
        with self.lock:
            self.diagnostics.extend(msg.status)
            self.diagnostic_times.extend([t] * len(msg.status))
        self._seen("diagnostics", msg)

    def _on_model_info(self, msg):
        with self.lock:
            self.model_info = msg
        self._seen("model_info", msg)

    # ---- queries ----------------------------------------------------------------------------
    def get(self, kind, key):
        with self.lock:
            return self.got[kind].get(key)

    def wait(self, kind, key, timeout: float):
        """(arrival time, message) for ``key`` or None after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = self.get(kind, key)
            if hit:
                return hit
            time.sleep(0.002)
        return None

    def wait_subscribed(self, timeout: float = 30.0, action: bool = True) -> bool:
        """Until both image nodes subscribe to the inputs (and the Finetune server is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self.image_pub.get_subscription_count() >= 2
                and self.info_pub.get_subscription_count() >= 2
                and (not action or self.finetune.server_is_ready())
            ):
                return True
            time.sleep(0.05)
        return False

    def wait_ready(self, since: int, timeout: float = 120.0) -> bool:
        """Until pose_estimator and refiner report OK on /diagnostics with their model / volume loaded
        (the ``model_path`` / ``volume_path`` values; other OK reports, e.g. the kernels', do not count)."""
        from diagnostic_msgs.msg import DiagnosticStatus

        loaded = {"pose_estimator": "model_path", "refiner": "volume_path"}

        def ready(status) -> str | None:
            node = status.name.rsplit("/", 1)[-1]
            keys = {kv.key for kv in status.values}
            return node if status.level == DiagnosticStatus.OK and loaded.get(node) in keys else None

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                ok = {ready(s) for s in self.diagnostics[since:]}
            if set(loaded) <= ok:
                return True
            time.sleep(0.1)
        return False

    def diag_mark(self) -> int:
        with self.lock:
            return len(self.diagnostics)

    def diagnostics_since(self, mark: int) -> list:
        with self.lock:
            return list(self.diagnostics[mark:])

    # ---- publishing -------------------------------------------------------------------------
    def publish(
        self, counts: np.ndarray, detector, frame_id: str, encoding: str = "mono16"
    ) -> tuple[tuple[int, int], float]:
        """CameraInfo then the Image (detector counts in ``encoding``) with one fresh stamp ->
        (stamp key, publish time)."""
        from std_msgs.msg import Header

        from xvr_ros.core.sim.session import encode_counts
        from xvr_ros.ros import convert

        header = Header(stamp=self.node.get_clock().now().to_msg(), frame_id=frame_id)
        info = convert.camera_info_from_detector(detector, header)
        image = convert.numpy_to_image(encode_counts(counts, encoding), encoding, header=header)
        self.info_pub.publish(info)
        t = time.perf_counter()
        self.image_pub.publish(image)
        return convert.stamp_key(header.stamp), t

    def run_finetune(self, goal, on_feedback=None, timeout: float = 3600.0):
        """Send a Finetune goal and wait for its result -> (result or None, status text)."""
        future = self.finetune.send_goal_async(goal, feedback_callback=on_feedback)
        handle = wait_future(future, 60.0)
        if handle is None or not handle.accepted:
            return None, "goal not accepted"
        res = wait_future(handle.get_result_async(), timeout)
        if res is None:
            return None, "no result before the timeout"
        return res.result, res.result.message

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()


def wait_future(future, timeout: float):
    """The future's result, or None after ``timeout`` s (the future is done by another thread)."""
    deadline = time.monotonic() + timeout
    while not future.done():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return future.result()


def overlay_rgb(msg) -> np.ndarray:
    """The refiner's rgb8 overlay -> (H, W, 3) uint8 (convert.image_to_numpy gives grey only)."""
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if msg.encoding != "rgb8":
        raise ValueError(f"overlay encoding {msg.encoding!r}, expected rgb8")
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(h, step)[:, : 3 * w].reshape(h, w, 3).copy()


# --------------------------------------------------------------------------------------------
# The nodes in this process, with a client (demo, replay)
# --------------------------------------------------------------------------------------------
@dataclass
class LocalPipeline:
    """The running nodes by name and the client connected to them."""

    nodes: dict
    client: PipelineClient

    def parameter(self, node: str, name: str):
        """The value of a running node's parameter."""
        return self.nodes[node].get_parameter(name).value


@contextmanager
def local_pipeline(
    config=None,
    *,
    device: str | None = None,
    overrides: Mapping[str, Mapping] | None = None,
    name: str = "xvr_client",
    on_message: Callable[[str, str, object], None] | None = None,
    prepare_model: Callable[[PipelineClient], None] | None = None,
    ready_timeout: float = 120.0,
    echo: Callable[..., None] = print,
) -> Iterator[LocalPipeline]:
    """Run the nodes of ``config`` in this process with a :class:`PipelineClient`, a model ready.

    1. DDS stays on this machine (:func:`isolated_ros_default`); an own rclpy context.
    2. The nodes start (:func:`xvr_ros.ros.bringup.running`, ``config`` plus ``overrides``); the
       client, on the nodes' topics, waits until they subscribe to the inputs (and the Finetune
       action server is up, when ``prepare_model`` is given).
    3. ``prepare_model(client)`` makes a model active (e.g. sends a Finetune goal), raising
       :class:`StartupError` if it cannot; without it the model is the config's (or overrides').
    4. Waits until pose_estimator and refiner report the model ready on ``/diagnostics``.

    Yields the :class:`LocalPipeline`; afterwards the client, the nodes and the context are shut down.

    Raises:
        StartupError: no subscribers within 30 s, or no model ready within ``ready_timeout`` s
            (the message quotes the nodes' last diagnostics).

    """
    import rclpy

    from xvr_ros.ros.bringup import running

    isolated_ros_default()
    context = rclpy.Context()
    rclpy.init(context=context)
    client = None
    try:
        with running(config, device=device, overrides=overrides, context=context) as nodes:
            client = PipelineClient(context, name, topics=topics_of(nodes), on_message=on_message)
            pipeline = LocalPipeline({n.get_name(): n for n in nodes}, client)
            if not client.wait_subscribed(30.0, action=prepare_model is not None):
                raise StartupError("the nodes did not come up (no subscribers / action server after 30 s)")
            echo(f"nodes up: {', '.join(n.get_fully_qualified_name() for n in nodes)} "
                 f"(in-process, device {pipeline.parameter('refiner', 'device')})")
            mark = 0
            if prepare_model is not None:
                mark = client.diag_mark()
                prepare_model(client)
            if not client.wait_ready(mark, ready_timeout):
                last = {s.name: s.message for s in client.diagnostics_since(mark)}
                raise StartupError(f"the nodes did not report a model ready within {ready_timeout:g} s: "
                                   + "; ".join(f"{k}: {v}" for k, v in last.items()))
            yield pipeline
    finally:
        if client is not None:
            client.close()
        rclpy.try_shutdown(context=context)
