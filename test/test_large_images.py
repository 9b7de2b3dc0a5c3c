"""Full-size X-rays from another process reach the image nodes (issue 12.1).

The pose estimator and the refiner run as shipped (``xvr_ros.ros.bringup`` with
config/intraop.yaml: one process); another process, a plain rclpy publisher like a C-arm driver,
publishes mono16 images of 1024x1024 and 2048x2048 px with their CameraInfo, reliable as the
README asks, both processes with config/fastdds_large_images.xml. The test's own node only
publishes the ModelInfo and listens to the (small) outputs: initial poses, results, the dropped
stamps of both nodes and /diagnostics.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rclpy
from conftest import ros_env, start, stop, stop_spinning, wait_for
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile
from std_msgs.msg import Header

from xvr_ros.core.io.volume import load_volume
from xvr_ros.core.train.loop import TrainConfig, train
from xvr_ros.msg import ModelInfo, RegistrationResult
from xvr_ros.ros import convert, qos

SDD = 1020.0
TIMEOUT = 90.0
#: The Fast DDS profile README asks drivers and nodes to load for images of 1024 px and more: with
#: it, images go through shared memory instead of 128 UDP fragments each.
PROFILE = Path(__file__).resolve().parents[1] / "config" / "fastdds_large_images.xml"

# A C-arm driver: publishes `count` frames of `size` x `size` mono16 at `rate` Hz with `reliability`,
# stamps first_sec, first_sec + 1, ...; prints "published N" and keeps serving until stopped.
PUBLISHER = """
import sys, time
import numpy as np, rclpy
from xvr_ros.core.geometry import Detector
from xvr_ros.ros import convert, qos
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
size, count, first_sec = (int(a) for a in (sys.argv[1], sys.argv[2], sys.argv[4]))
rate, reliability = float(sys.argv[3]), sys.argv[5]
rclpy.init()
node = rclpy.create_node("carm_driver")
profile = qos.image_qos(reliability)
image_pub = node.create_publisher(Image, "xray/image", profile)
info_pub = node.create_publisher(CameraInfo, "xray/camera_info", profile)
deadline = time.monotonic() + 60
while min(image_pub.get_subscription_count(), info_pub.get_subscription_count()) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(3.0)  # matched here is not yet matched there: let discovery (and image_qos=auto) settle
v, u = np.mgrid[0:size, 0:size] / size - 0.5
body = np.exp(-((u / 0.3) ** 2 + (v / 0.4) ** 2)) + 0.3 * (np.abs(u - 0.1) < 0.05)
image = convert.numpy_to_image(np.round(50000 * np.exp(-2.0 * body)).astype(np.uint16), "mono16")
pixel = 200.0 / size  # mm: a 20 cm detector
info = convert.camera_info_from_detector(Detector(sdd=1020.0, height=size, width=size, delx=pixel, dely=pixel))
start = time.monotonic()
for i in range(count):
    header = Header(stamp=convert.time_from_ns((first_sec + i) * 1_000_000_000), frame_id="carm_source_optical")
    info.header = image.header = header
    info_pub.publish(info)
    image_pub.publish(image)
    time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
print(f"published {count} in {time.monotonic() - start:.2f} s", flush=True)
while True:
    time.sleep(1)
"""


class Listener:
    """The test's node: ModelInfo out; initial poses, results, dropped stamps and /diagnostics in."""

    def __init__(self, env: dict[str, str]):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=int(env["ROS_DOMAIN_ID"]))
        self.node = n = rclpy.create_node("large_image_listener", context=self.ctx)
        self.model_pub = n.create_publisher(ModelInfo, "xvr/model_info", qos.LATCHED)
        self.lock = threading.Lock()
        self.stamps: dict[str, set] = {k: set() for k in ("pose", "result", "pose_dropped", "result_dropped")}
        self.diag: list = []
        for kind, msg_type, topic in (
            ("pose", PoseWithCovarianceStamped, "xray/initial_pose"),
            ("result", RegistrationResult, "xray/registration"),
            ("pose_dropped", Header, "xray/initial_pose/dropped"),
            ("result_dropped", Header, "xray/registration/dropped"),
        ):
            n.create_subscription(msg_type, topic, self._stamp(kind), qos.DROPPED)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._diag, QoSProfile(depth=500))
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _stamp(self, kind):
        def callback(msg):
            with self.lock:
                self.stamps[kind].add(convert.stamp_key(getattr(msg, "header", msg).stamp))  # a Header is its own

        return callback

    def _diag(self, msg):
        with self.lock:
            self.diag.extend(msg.status)

    def seen(self, kind) -> set:
        with self.lock:
            return set(self.stamps[kind])

    def statuses(self) -> list:
        with self.lock:
            return list(self.diag)

    def close(self):
        stop_spinning(self.executor, self.thread, self.node, self.ctx)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Both nodes running (separate processes) with a model loaded; yields (env, listener, tmp)."""
    tmp = tmp_path_factory.mktemp("large_images")
    env = dict(ros_env(tmp), FASTRTPS_DEFAULT_PROFILES_FILE=str(PROFILE))  # the driver's and the nodes'
    # The shipped configuration and start-up (both nodes in one process), with light refinements:
    # this test is about transport, and the machine is shared.
    config = tmp / "intraop.yaml"
    config.write_text(
        (Path(__file__).resolve().parents[1] / "config" / "intraop.yaml").read_text()
        + f"""
/pose_estimator:
  ros__parameters:
    sdd_mm: {SDD}
    camera_info_timeout: 2.0
    diagnostics_period: 0.5
/refiner:
  ros__parameters:
    sdd_mm: {SDD}
    time_budget: 2.0
    max_iterations: 10
    multistart: false
    pairing_timeout: 30.0
    diagnostics_period: 0.5
"""
    )
    log = tmp / "bringup.log"
    procs = {"bringup": start(["-m", "xvr_ros.ros.bringup", "--config", str(config), "--only",
                               "pose_estimator,refiner"], env, log)}
    listener = None
    try:
        x, y, z = np.meshgrid(*(np.linspace(-30, 30, n) for n in (40, 36, 48)), indexing="ij")
        hu = 1000.0 * np.exp(-((x - 8) ** 2 + y**2 + (z + 5) ** 2) / 200.0) - 1000.0 * (x**2 + y**2 > 900)
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        affine[:3, 3] = -1.5 * (np.array(hu.shape) - 1) / 2
        volume_path = tmp / "phantom.nii.gz"
        nib.save(nib.Nifti1Image(hu.astype(np.float32), affine), volume_path)
        ranges = dict(alpha=(-20, 20), beta=(-10, 10), gamma=(-5, 5), x=(-10, 10), y=(500, 600), z=(-10, 10))
        config = TrainConfig(ranges=ranges, height=32, delx=8.0, sdd=SDD, batch_size=4, warmup_steps=2,
                             n_val=8, augment_p=0.0, max_steps=4, w_ncc=0.0)
        model_path = train(load_volume(volume_path), config, tmp / "phantom.pt").path
        listener = Listener(env)
        listener.model_pub.publish(ModelInfo(model_name="phantom", model_path=str(model_path),
                                             volume_path=str(volume_path), volume_frame="volume"))

        def ready():
            for proc in procs.values():
                assert proc.poll() is None, log.read_text()[-3000:]
            loaded = {(s.name, s.message.split(":")[0]) for s in listener.statuses() if s.level == DiagnosticStatus.OK}
            return {("/pose_estimator", "model loaded"), ("/refiner", "volume loaded")} <= loaded

        wait_for(ready, TIMEOUT, what="both nodes to load the model and the volume")
        yield env, listener, tmp
    finally:
        if listener is not None:
            listener.close()
        for proc in procs.values():
            stop(proc)


def publish(env, tmp, size: int, count: int, rate: float, first_sec: int, reliability: str = "reliable"):
    """Start the driver process; return it (stop it with conftest.stop)."""
    args = ["-c", PUBLISHER, str(size), str(count), str(rate), str(first_sec), reliability]
    return start(args, env, tmp / f"driver_{size}_{first_sec}.log")


@pytest.mark.parametrize("size", [1024, 2048])
def test_every_full_size_frame_is_answered(nodes, size):
    env, listener, tmp = nodes
    stamps = {(size * 10 + i, 0) for i in range(3)}
    driver = publish(env, tmp, size, 3, 0.5, size * 10)  # slower than a refinement: nothing superseded
    try:
        wait_for(lambda: stamps <= listener.seen("pose"), TIMEOUT, what=f"an initial pose for each {size} px frame")

        def refined():
            return stamps <= listener.seen("result") | listener.seen("result_dropped")

        wait_for(refined, TIMEOUT, what=f"a result or a drop from the refiner for each {size} px frame")
    finally:
        stop(driver)
    registered = stamps & listener.seen("result")
    print(f"\n{size}x{size} mono16: 3/3 initial poses, {len(registered)}/3 registered")
    assert registered, "no full-size frame registered"


def settle(listener, kinds: tuple[str, ...], stamps: set, quiet: float = 10.0) -> set:
    """The stamps of ``stamps`` seen on ``kinds`` once all are seen or none came for ``quiet`` s."""
    seen, last, t = set(), -1, time.monotonic()
    while time.monotonic() - t < quiet:
        seen = stamps & set().union(*(listener.seen(k) for k in kinds))
        if seen == stamps:
            break
        if len(seen) != last:
            last, t = len(seen), time.monotonic()
        time.sleep(0.1)
    return seen


def test_2048_at_15_hz_frames_are_received_and_accounted_for(nodes):
    env, listener, tmp = nodes
    count, first = 30, 100_000
    stamps = {(first + i, 0) for i in range(count)}
    mark = len(listener.statuses())
    driver = publish(env, tmp, 2048, count, 15.0, first)
    try:
        wait_for(lambda: stamps & listener.seen("pose"), TIMEOUT, what="the first initial pose")
        received = settle(listener, ("pose", "pose_dropped"), stamps)
        answered = settle(listener, ("result", "result_dropped"), stamps)
    finally:
        stop(driver)
    poses, results = stamps & listener.seen("pose"), stamps & listener.seen("result")
    print(
        f"\n2048x2048 mono16 at 15 Hz from another process: pose estimator received {len(received)}/{count} "
        f"({len(poses)} estimated, the rest superseded), refiner answered {len(answered)}/{count} "
        f"({len(results)} registered)"
    )
    # Reliable, keep last 10 on a shared 2-core machine: a writer whose history wraps before the
    # reader acknowledges loses a frame now and then (30/30 in most runs, 27/30 seen); the nodes
    # must still answer every frame they received.
    assert len(received) >= 0.9 * count, f"{count - len(received)}/{count} frames never reached the pose estimator"
    assert answered >= received, f"the refiner did not account for {sorted(received - answered)}"
    assert not poses & listener.seen("pose_dropped") and not results & listener.seen("result_dropped")
    # A frame lost on its way to the pose estimator but not to the refiner times out there: that
    # one is an ERROR by design (nothing told the refiner); any other ERROR is a failure.
    lost = {convert.stamp_to_str(k) for k in stamps - received}
    errors = [
        s.message for s in listener.statuses()[mark:]
        if s.level == DiagnosticStatus.ERROR and {kv.value for kv in s.values if kv.key == "stamp"}.isdisjoint(lost)
    ]
    assert not errors, errors


def test_a_best_effort_driver_is_followed_and_warned_about(nodes):
    env, listener, tmp = nodes
    mark = len(listener.statuses())
    # Best effort may lose any one frame (it did in CI on a loaded machine): five, one of them must arrive.
    stamps = {(200_000 + i, 0) for i in range(5)}
    driver = publish(env, tmp, 64, len(stamps), 1.0, 200_000, reliability="best_effort")
    try:

        def warned():
            return {
                s.name for s in listener.statuses()[mark:]
                if s.level == DiagnosticStatus.WARN and "offers best-effort QoS" in s.message
            } >= {"/pose_estimator", "/refiner"}

        wait_for(warned, TIMEOUT, what="both nodes to switch to best effort and say so")
        wait_for(lambda: stamps & listener.seen("pose"), TIMEOUT, what="a pose for one of the best-effort frames")
    finally:
        stop(driver)
