"""Tests for xvr_ros.ros.pipeline: stamp pairing and the queue-of-one worker (no ROS graph needed)."""

from __future__ import annotations

import threading
import time

import pytest
from builtin_interfaces.msg import Time
from conftest import stop_spinning, wait_for
from sensor_msgs.msg import CameraInfo, Image

from xvr_ros.ros import qos
from xvr_ros.ros.pipeline import LatestWorker, StampPairer, number_list


def stamped(cls, sec: int, nanosec: int = 0):
    msg = cls()
    msg.header.stamp = Time(sec=sec, nanosec=nanosec)
    return msg


def test_pairs_by_exact_stamp_in_any_order():
    pairer = StampPairer(("image", "camera_info"), timeout=1.0)
    assert pairer.add("image", stamped(Image, 1), now=0.0) is None
    assert pairer.add("camera_info", stamped(CameraInfo, 1, 1), now=0.0) is None  # 1 ns apart: no pair
    done = pairer.add("camera_info", stamped(CameraInfo, 1), now=0.1)
    assert done is not None and done.key == (1, 0) and set(done.parts) == {"image", "camera_info"}
    assert done.arrived == {"image": 0.0, "camera_info": 0.1}
    info_first = stamped(CameraInfo, 2)
    assert pairer.add("camera_info", info_first, now=0.2) is None
    done = pairer.add("image", stamped(Image, 2), now=0.3)
    assert done.parts["camera_info"] is info_first
    assert len(pairer) == 1  # the lone 1.000000001 CameraInfo
    with pytest.raises(ValueError, match="unknown kind"):
        pairer.add("initial_pose", stamped(Image, 3))


def test_timeouts_report_images_only():
    pairer = StampPairer(("image", "camera_info", "initial_pose"), timeout=1.0)
    pairer.add("camera_info", stamped(CameraInfo, 1), now=0.0)  # its image never comes
    pairer.add("image", stamped(Image, 2), now=0.5)
    pairer.add("camera_info", stamped(CameraInfo, 2), now=0.6)
    assert pairer.expire(now=0.9) == []
    assert pairer.expire(now=1.2) == [] and len(pairer) == 1  # the lone CameraInfo went silently
    (dropped,) = pairer.expire(now=1.5)
    assert dropped.key == (2, 0) and dropped.reason == "no initial_pose with its stamp within 1 s"
    assert len(pairer) == 0


def test_bounded_buffer_evicts_the_oldest():
    pairer = StampPairer(("image", "camera_info"), timeout=10.0, max_pending=2)
    for sec in (1, 2, 3):
        pairer.add("image", stamped(Image, sec), now=0.0)
    assert len(pairer) == 2
    (evicted,) = pairer.expire(now=0.0)
    assert evicted.key == (1, 0) and "more than 2 stamps" in evicted.reason
    with pytest.raises(ValueError):
        StampPairer(("camera_info",), timeout=1.0)  # no image to anchor on
    with pytest.raises(ValueError):
        StampPairer(("image",), timeout=0.0)


def test_discarded_stamps_are_forgotten_with_their_late_messages():
    pairer = StampPairer(("image", "camera_info", "initial_pose"), timeout=1.0)
    pairer.add("image", stamped(Image, 1), now=0.0)
    pairer.discard((1, 0), now=0.1)  # dropped upstream while its image waits
    pairer.discard((2, 0), now=0.1)  # dropped upstream before its image arrived here
    assert len(pairer) == 0
    assert pairer.add("image", stamped(Image, 2), now=0.2) is None
    assert pairer.add("camera_info", stamped(CameraInfo, 1), now=0.3) is None
    assert len(pairer) == 0 and pairer.expire(now=5.0) == []  # nothing waits, nothing is reported
    pairer.add("image", stamped(Image, 2), now=5.0)  # long after: an ordinary stamp again
    assert len(pairer) == 1


def test_offered_reliability_follows_the_publishers():
    from rclpy.qos import ReliabilityPolicy

    class Info:
        def __init__(self, reliability):
            self.qos_profile = qos.image_qos(reliability)

    assert qos.offered_reliability([]) is None
    assert qos.offered_reliability([Info("reliable"), Info("reliable")]) == "reliable"
    assert qos.offered_reliability([Info("reliable"), Info("best_effort")]) == "best_effort"
    assert qos.image_qos("best_effort").reliability == ReliabilityPolicy.BEST_EFFORT
    with pytest.raises(ValueError, match="reliability"):
        qos.image_qos("sensor_data")


def test_latest_worker_keeps_only_the_newest_and_survives_errors():
    started, release = threading.Event(), threading.Event()
    done, errors = [], []

    def work(job):
        if job == "slow":
            started.set()
            release.wait(5.0)
        if job == "bad":
            raise RuntimeError("boom")
        done.append(job)

    worker = LatestWorker(work, "test-worker", on_error=lambda job, exc: errors.append((job, str(exc))))
    try:
        assert worker.submit("slow") is None
        assert started.wait(5.0) and worker.busy
        assert worker.submit("a") is None  # waits: the running job is never interrupted
        assert worker.submit("b") == "a"  # replaces the waiting one, which is handed back
        release.set()
        deadline = time.monotonic() + 5.0
        while worker.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done == ["slow", "b"]
        worker.submit("bad")
        deadline = time.monotonic() + 5.0
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert errors == [("bad", "boom")]
        worker.submit("after")
        deadline = time.monotonic() + 5.0
        while "after" not in done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done[-1] == "after", "the thread must keep going after an exception"
    finally:
        worker.stop()


def test_number_list():
    assert number_list("scales", [16, 8.0, 1], float) == [16.0, 8.0, 1.0]
    assert number_list("labels", [1, 2.0], int) == [1, 2]
    assert number_list("labels", [], int) == []
    for bad, kind in (([1.5], int), (["a"], float), ([True], int), ("16 8", float)):
        with pytest.raises(ValueError, match="must be a list of"):
            number_list("x", bad, kind)


def test_refiner_takes_array_parameters_from_a_parameters_file():
    """Rclpy types an empty-list default as a byte array; a YAML list of numbers must still be accepted."""
    import rclpy
    from rclpy.parameter import Parameter

    from xvr_ros.ros.refiner import Refiner

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = Refiner(context=context, parameter_overrides=[Parameter("scales", value=[16.0, 8.0, 4.0, 2.0, 1.0]),
                                                             Parameter("labels", value=[1, 2])])
        assert node._scales == (16.0, 8.0, 4.0, 2.0, 1.0) and node._labels == [1, 2]
        node.destroy_node()
        default = Refiner(context=context)
        assert default._scales == () and default._labels == []
        default.destroy_node()
        with pytest.raises(ValueError, match="scales must be a list of numbers"):
            Refiner(context=context, parameter_overrides=[Parameter("scales", value=["fine"])])
    finally:
        rclpy.try_shutdown(context=context)


def test_image_node_parameters_are_typed_with_ranges():
    import rclpy
    from rcl_interfaces.msg import ParameterType
    from rclpy.exceptions import InvalidParameterValueException
    from rclpy.parameter import Parameter

    from xvr_ros.ros.pose_estimator import PoseEstimator

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = PoseEstimator(context=context)
        (sdd,) = node.describe_parameters(["sdd_mm"])
        assert sdd.type == ParameterType.PARAMETER_DOUBLE and sdd.read_only
        assert sdd.floating_point_range[0].from_value > 0 and "mm" in sdd.description
        (size,) = node.describe_parameters(["min_image_size"])
        assert size.type == ParameterType.PARAMETER_INTEGER and size.integer_range[0].from_value >= 2
        (image_qos,) = node.describe_parameters(["image_qos"])
        assert "best_effort" in image_qos.additional_constraints
        node.destroy_node()
        with pytest.raises(InvalidParameterValueException):
            PoseEstimator(context=context, parameter_overrides=[Parameter("sdd_mm", value=-5.0)])
        with pytest.raises(ValueError, match="intensity must be one of"):
            PoseEstimator(context=context, parameter_overrides=[Parameter("intensity", value="exp")])
        with pytest.raises(ValueError, match="image_qos must be one of"):
            PoseEstimator(context=context, parameter_overrides=[Parameter("image_qos", value="sensor_data")])
    finally:
        rclpy.try_shutdown(context=context)


def test_an_incompatible_image_publisher_is_reported(ros_domain):
    """image_qos=reliable and a best-effort driver: no image can arrive, and the node says why."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from xvr_ros.ros.pose_estimator import PoseEstimator

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = PoseEstimator(context=context, parameter_overrides=[Parameter("image_qos", value="reliable")])
        driver = rclpy.create_node("driver", context=context)
        driver.create_publisher(Image, "xray/image", qos.image_qos("best_effort"))
        errors = []
        driver.create_subscription(
            DiagnosticArray,
            "/diagnostics",
            lambda m: errors.extend(s.message for s in m.status if s.level == DiagnosticStatus.ERROR),
            50,
        )
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        executor.add_node(driver)
        deadline = time.monotonic() + 10.0
        while not errors and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
        assert errors and "RELIABILITY" in errors[0] and "image_qos" in errors[0], errors
    finally:
        rclpy.try_shutdown(context=context)


def test_the_pose_estimator_reuses_a_recent_field_of_view_of_the_same_intrinsics(ros_domain, monkeypatch):
    """Fluoroscopy frames share their collimation: detection (~10x the network) runs once per period."""
    import dataclasses

    import rclpy
    import torch
    from rclpy.parameter import Parameter

    from xvr_ros.core.geometry import Detector
    from xvr_ros.core.io.xray import Xray
    from xvr_ros.ros import pose_estimator

    calls = []
    monkeypatch.setattr(pose_estimator, "detected_field_of_view",
                        lambda image: calls.append(1) or torch.ones(image.shape, dtype=torch.bool))
    det = Detector(sdd=1020.0, height=32, width=32, delx=1.0, dely=1.0)
    xray = Xray(torch.rand(1, 1, 32, 32), det)
    zoomed = Xray(torch.rand(1, 1, 32, 32), dataclasses.replace(det, delx=0.5, dely=0.5))
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = pose_estimator.PoseEstimator(context=context,
                                            parameter_overrides=[Parameter("field_of_view_period", value=1.0)])
        first = node._field_of_view(xray)
        assert node._field_of_view(xray) is first and len(calls) == 1  # the next frame: reused
        node._field_of_view(zoomed)
        assert len(calls) == 2  # other intrinsics: detected
        node.destroy_node()
        node = pose_estimator.PoseEstimator(context=context)  # the default: every frame
        node._field_of_view(xray)
        node._field_of_view(xray)
        assert len(calls) == 4  # period 0: every frame
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_while_the_refiner_tracks_one_frame_per_period_gets_an_estimate(ros_domain, monkeypatch):
    """A tracked frame needs no network start; on a CPU the network on every frame takes the
    refiner's core. Skipped frames go on dropped_topic (the refiner must not wait) uncounted."""
    from types import SimpleNamespace

    import rclpy
    import torch
    from rclpy.parameter import Parameter

    from xvr_ros.core.geometry import Detector
    from xvr_ros.core.io.xray import Xray
    from xvr_ros.msg import RegistrationResult
    from xvr_ros.ros import pose_estimator

    det = Detector(sdd=1020.0, height=32, width=32, delx=1.0, dely=1.0)
    pose = torch.eye(4, dtype=torch.float64)
    pose[1, 3] = 800.0  # mm from the isocenter
    monkeypatch.setattr(pose_estimator, "predict_initial_pose", lambda *args: pose[None])
    clock = [100.0]
    monkeypatch.setattr(pose_estimator.time, "monotonic", lambda: clock[0])
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = pose_estimator.PoseEstimator(
            context=context, parameter_overrides=[Parameter("tracking_estimate_period", value=1.0)])
        node._model = SimpleNamespace(checkpoint=SimpleNamespace(metadata={}), canonical=det, covariance_mm=None,
                                      path="model.pt")
        monkeypatch.setattr(node, "read_xray", lambda entry, **_: Xray(torch.rand(1, 1, 32, 32), det))
        out = []
        monkeypatch.setattr(node._pose_pub, "publish", lambda msg: out.append("pose"))
        monkeypatch.setattr(node._dropped_pub, "publish", lambda msg: out.append("passed on"))

        def frame(dt=0.1):
            clock[0] += dt
            stamp = SimpleNamespace(sec=int(clock[0]), nanosec=0)
            node._estimate(SimpleNamespace(key=(int(clock[0] * 10), 0), arrived={"image": clock[0]},
                                           parts={"image": SimpleNamespace(header=SimpleNamespace(stamp=stamp))}))
            return out.pop()

        assert [frame() for _ in range(3)] == ["pose"] * 3  # not tracking: every frame
        node._on_registration(RegistrationResult(accepted=True, path="tracking"))
        assert [frame(0.3) for _ in range(4)] == ["passed on", "passed on", "passed on", "pose"]  # 1 s apart
        assert node.skipped_total == 3 and node.dropped_total == 0
        node._on_registration(RegistrationResult(accepted=False, path="tracking"))  # the track ended
        assert frame() == "pose"
        node._on_registration(RegistrationResult(accepted=True, path="tracking"))
        assert frame() == "passed on"
        clock[0] += 2.5  # no tracked result for longer than TRACKING_FRESH: the refiner stalled or stopped
        assert frame() == "pose"
        node.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_following_the_publishers_qos_never_breaks_a_multithreaded_executor(ros_domain):
    """image_qos=auto resubscribes from a timer thread while the executor builds its wait set.

    rclpy (Humble, Jazzy) raises InvalidHandle in the executor's thread when a subscription's event
    handlers are destroyed as it adds them to a wait set (ros2/rclpy#1284): the whole executor
    stopped in CI. Switch many times while spinning; the executor must keep running and the node
    must still receive images afterwards.
    """
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    from xvr_ros.ros.pose_estimator import PoseEstimator

    context = rclpy.Context()
    rclpy.init(context=context)
    failures = []
    try:
        node = PoseEstimator(context=context)
        subscriptions, waitables = len(list(node.subscriptions)), len(list(node.waitables))
        executor = MultiThreadedExecutor(num_threads=4, context=context)
        executor.add_node(node)

        def spin():
            try:
                executor.spin()
            except Exception as error:  # noqa: BLE001
                failures.append(error)

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        for i in range(300):
            node._subscribe_inputs("best_effort" if i % 2 else "reliable")
            time.sleep(0.002)
        wait_for(lambda: not node._retired, 5.0, what="the retired subscriptions to be destroyed")
        assert not failures, failures
        assert thread.is_alive()
        assert node.reliability == "best_effort"
        assert (len(list(node.subscriptions)), len(list(node.waitables))) == (subscriptions, waitables)
        stop_spinning(executor, thread, node, context)
    finally:
        rclpy.try_shutdown(context=context)
