"""The refiner's TF gate, as a separate process over loopback: a registration from a start inside
the capture range is accepted (TF, and the refined pose with its covariance); one from far
outside it is rejected (result with ``accepted`` false and a reason, WARN on /diagnostics, no TF,
no refined pose, nothing republished).

The quality model was fitted on the demo chest CT with the default refinement, whose finest
scale is 96 px here as there (the gate's refiner registers to it: ``tracking_coarse_start``
off); the test feeds that CT with the simulator's default image degradations, so the model is
inside what it was fitted on. The initial poses are given (no network): the refiner alone is
under test. The last tests follow a few frames of continuous fluoroscopy through the tracking
path and its fall-backs, with the refiner's defaults (a full registration stops a scale early,
judged by the coarse model, and is finished on the tracking level).
"""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import rclpy
import torch
from conftest import ros_env, start, stop, stop_spinning, wait_for
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import QoSProfile
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from test_pose_filter import ISOCENTER, along_depth, carm, covariance
from tf2_msgs.msg import TFMessage

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.io.volume import demo_ct_path, load_volume
from xvr_ros.core.metrics import body_points, mtre
from xvr_ros.core.register.quality import COARSE_MODEL_PATH, TRACKING_MODEL_PATH, load_model
from xvr_ros.core.sim.simulate import perturb_poses, simulate_xray
from xvr_ros.core.train.presets import pose_generator, resolve_ranges, sample_poses
from xvr_ros.msg import ModelInfo, RegistrationResult
from xvr_ros.ros import convert, qos

SDD = 1020.0
DET = Detector(sdd=SDD, height=256, width=256, delx=1.0, dely=1.0)  # as bench/fit_quality.py fits on
TRUE_POSE = sample_poses(resolve_ranges("chest"), 1, pose_generator(0)).to(torch.float64)
# Inside the capture range: 1 deg, 2 mm in-plane, 5 mm depth (mTRE ~5 mm).
NEAR = perturb_poses(TRUE_POSE, 1.0, 2.0, 5.0, seed=7)
# Far outside it: turned 120 deg about the patient and 100 mm deeper: nothing of the image matches.
_angles, _xyz = carm_parameters(TRUE_POSE)
FAR = carm_pose(torch.rad2deg(_angles) + torch.tensor([120.0, 0.0, 0.0], dtype=torch.float64),
                _xyz + torch.tensor([40.0, 100.0, 0.0], dtype=torch.float64), degrees=True)
TIMEOUT = 180.0  # s: a refinement of up to 150 iterations on a busy CPU


class Client:
    """Publishers for the refiner's inputs; everything it outputs, by kind."""

    def __init__(self, env: dict[str, str]):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=int(env["ROS_DOMAIN_ID"]))
        n = self.node = rclpy.create_node("gate_client", context=self.ctx)
        reliable = QoSProfile(depth=10)
        self.image_pub = n.create_publisher(Image, "xray/image", reliable)
        self.info_pub = n.create_publisher(CameraInfo, "xray/camera_info", reliable)
        self.pose_pub = n.create_publisher(PoseWithCovarianceStamped, "xray/initial_pose", reliable)
        self.model_pub = n.create_publisher(ModelInfo, "xvr/model_info", qos.LATCHED)
        self.lock = threading.Lock()
        self.received: dict[str, list] = {"result": [], "tf": [], "refined": [], "diag": []}
        n.create_subscription(RegistrationResult, "xray/registration", self._store("result"), reliable)
        n.create_subscription(TFMessage, "/tf", self._store("tf"), qos.TF)
        n.create_subscription(PoseWithCovarianceStamped, "xray/refined_pose", self._store("refined"), reliable)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._store("diag"), QoSProfile(depth=200))
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _store(self, kind):
        def callback(msg):
            with self.lock:
                self.received[kind].append(msg)

        return callback

    def messages(self, kind) -> list:
        with self.lock:
            return list(self.received[kind])

    def statuses(self) -> list[DiagnosticStatus]:
        return [s for arr in self.messages("diag") for s in arr.status if s.name == "/refiner"]

    def close(self):
        stop_spinning(self.executor, self.thread, self.node, self.ctx)


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    yield from refiner_process(tmp_path_factory.mktemp("refiner_gate"), tracking_coarse_start="false")


@pytest.fixture(scope="module")
def tracking_gate(tmp_path_factory):
    # This refiner accepts from p_success 0.5 on both paths, so that the paths, not the models, are tested.
    yield from refiner_process(tmp_path_factory.mktemp("refiner_tracking"), accept_threshold=0.5,
                               tracking_accept_threshold=0.5)


def refiner_process(tmp, **parameters):
    """A refiner in its own process with the demo CT loaded -> (client, counts, points, log)."""
    env = ros_env(tmp)
    log = tmp / "refiner.log"
    # No multi-start and an iteration cap instead of a time budget: the outcome does not depend
    # on the CPU's speed (the near start converges in ~80 iterations).
    params = {"sdd_mm": SDD, "multistart": "false", "time_budget": 0.0, "max_iterations": 150,
              "publish_overlay": "false", "pairing_timeout": 30.0, "diagnostics_period": 0.5, **parameters}
    args = [a for k, v in params.items() for a in ("-p", f"{k}:={v}")]
    proc = start(["-m", "xvr_ros.ros.refiner", "--ros-args", *args], env, log)
    client = None
    try:
        ct, _ = demo_ct_path()
        volume = load_volume(ct)
        counts = simulate_xray(volume, TRUE_POSE.float(), DET, seed=0).counts[0, 0].numpy()
        client = Client(env)

        def subscribed():
            assert proc.poll() is None, log.read_text()[-3000:]
            return client.image_pub.get_subscription_count() and client.pose_pub.get_subscription_count()

        wait_for(subscribed, 60.0, what="the refiner to subscribe")
        client.model_pub.publish(ModelInfo(header=Header(frame_id="volume"), volume_path=str(ct)))
        wait_for(lambda: any(s.level == DiagnosticStatus.OK and "volume loaded" in s.message
                             for s in client.statuses()), 120.0, what="the refiner to load the volume")
        yield client, np.round(counts).clip(0, 65535).astype(np.uint16), body_points(volume, n=100), log
    finally:
        if client is not None:
            client.close()
        stop(proc)


def register(client: Client, counts: np.ndarray, init: torch.Tensor | None, sec: float) -> RegistrationResult:
    """Publish CameraInfo, Image and (unless None) the initial pose with stamp ``sec``; its result."""
    stamp = stamp_of(sec)
    if init is not None:
        send_initial_pose(client, init, stamp)
    send_image(client, counts, stamp)
    return result_of(client, stamp)


#: A volume for the catch-up's unit tests: nothing is rendered, nothing filtered.
NO_VOLUME = SimpleNamespace(tracking_renderer=None, renderer=SimpleNamespace(isocenter=None))


def stamp_of(sec: float):
    return rclpy.time.Time(nanoseconds=round(sec * 1e9)).to_msg()


def send_image(client: Client, counts: np.ndarray, stamp) -> None:
    header = Header(stamp=stamp, frame_id="carm_source_optical")
    client.info_pub.publish(convert.camera_info_from_detector(DET, header))
    client.image_pub.publish(convert.numpy_to_image(counts, "mono16", header=header))


def result_of(client: Client, stamp, timeout: float = TIMEOUT) -> RegistrationResult | None:
    """The result with ``stamp``, waited for up to ``timeout`` s (0: None unless it is there)."""
    def found():
        return next((m for m in client.messages("result") if m.header.stamp == stamp), None)

    return wait_for(found, timeout, what=f"the result of stamp {stamp.sec}.{stamp.nanosec:09d}") if timeout else found()


def send_initial_pose(client: Client, init: torch.Tensor, stamp) -> None:
    pose = PoseWithCovarianceStamped(header=Header(stamp=stamp, frame_id="volume"))
    pose.pose = convert.pose_with_covariance_to_msg(convert.optical_from_carm(init[0], DET))
    client.pose_pub.publish(pose)


def test_an_accepted_registration_publishes_tf_with_a_covariance(gate):
    client, counts, points, _ = gate
    result = register(client, counts, NEAR, 100)
    refined = convert.carm_from_optical(convert.pose_from_msg(result.refined_pose.pose), DET)
    error = float(mtre(TRUE_POSE, refined[None], points)[0])
    assert result.accepted, (result.status, error)
    assert result.p_success >= load_model().threshold and result.rejection_reason == ""
    assert error < 1.0, "accepted, but the pose is wrong"

    tf = wait_for(lambda: [t for m in client.messages("tf") for t in m.transforms if t.header.stamp.sec == 100],
                  10.0, what="the TF")
    assert len(tf) == 1 and (tf[0].header.frame_id, tf[0].child_frame_id) == ("volume", "carm_source_optical")
    pose = wait_for(lambda: [m for m in client.messages("refined") if m.header.stamp.sec == 100], 10.0,
                    what="the refined pose")
    assert len(pose) == 1 and pose[0].header.frame_id == "volume"
    assert pose[0].pose == result.refined_pose
    t = tf[0].transform.translation
    assert (t.x, t.y, t.z) == pytest.approx(
        (result.refined_pose.pose.position.x, result.refined_pose.pose.position.y, result.refined_pose.pose.position.z))

    cov = np.asarray(result.refined_pose.covariance).reshape(6, 6)
    np.testing.assert_allclose(cov, cov.T, rtol=1e-9, atol=1e-15)
    assert np.linalg.eigvalsh(cov).min() > 0, "not positive definite"
    sd = np.sqrt(np.diag(cov))
    # Metres and radians: a registration accepted as < 1 mm has sub-centimetre, sub-degree spreads.
    assert (sd[:3] > 1e-6).all() and (sd[:3] < 0.01).all(), sd
    assert (sd[3:] > 1e-6).all() and (sd[3:] < np.deg2rad(1.0)).all(), sd
    assert any(s.level == DiagnosticStatus.OK and "registered" in s.message for s in client.statuses())


def test_a_start_far_outside_the_capture_range_is_rejected_and_publishes_no_tf(gate):
    client, counts, points, _ = gate
    tf_before, poses_before = len(client.messages("tf")), len(client.messages("refined"))
    result = register(client, counts, FAR, 200)
    refined = convert.carm_from_optical(convert.pose_from_msg(result.refined_pose.pose), DET)
    assert float(mtre(TRUE_POSE, refined[None], points)[0]) > 10.0, "the start was not far enough to fail"
    assert not result.accepted and result.p_success < load_model().threshold
    assert result.rejection_reason.startswith("rejected") and result.rejection_reason in result.status

    def warned():
        return [s for s in client.statuses() if s.level == DiagnosticStatus.WARN
                and {(kv.key, kv.value) for kv in s.values} >= {("outcome", "rejected"), ("stamp", "200.000000000")}]

    (status, *_) = wait_for(warned, 10.0, what="a WARN for the rejection")
    assert result.rejection_reason in status.message
    # The TF (published before the result when accepted) never came, and nothing was republished.
    assert len(client.messages("tf")) == tf_before and len(client.messages("refined")) == poses_before


def waits_for_its_estimate(client: Client, counts: np.ndarray, stamp) -> RegistrationResult:
    """Send an image without its initial pose: no result for 3 s; then the (NEAR) pose: its result."""
    send_image(client, counts, stamp)
    threading.Event().wait(3.0)
    assert result_of(client, stamp, 0) is None, "answered without waiting for its initial pose"
    send_initial_pose(client, NEAR, stamp)
    return result_of(client, stamp)


def test_continuous_frames_are_tracked_from_the_last_accepted_pose(tracking_gate):
    client, counts, points, _ = tracking_gate
    first = register(client, counts, NEAR, 300)
    assert first.accepted and first.path == "full", first.status
    assert "finished on the tracking level; the registration to the scale before the finest" in first.status
    refined = convert.carm_from_optical(convert.pose_from_msg(first.refined_pose.pose), DET)
    assert float(mtre(TRUE_POSE, refined[None], points)[0]) < 1.0
    # 0.13 s later (7.5 frames/s), same intrinsics: tracked at once, without waiting for the network.
    tracked = register(client, counts, None, 300.133)
    assert tracked.path == "tracking", tracked.status
    assert tracked.accepted, tracked.status
    refined = convert.carm_from_optical(convert.pose_from_msg(tracked.refined_pose.pose), DET)
    assert float(mtre(TRUE_POSE, refined[None], points)[0]) < 1.0
    assert wait_for(lambda: [t for m in client.messages("tf") for t in m.transforms
                             if t.header.stamp == tracked.header.stamp], 10.0, what="the tracked frame's TF")
    # The network's latest estimate (of a frame whose image never came) is far from the track:
    # the next frame, ready without its own estimate, waits for it instead of being tracked ...
    send_initial_pose(client, FAR, stamp_of(300.15))
    time.sleep(1.0)  # (the topics are not ordered: handled after the image, it would come too late, as below)
    # ... and with its own estimate, near the track, it is tracked.
    rechecked = waits_for_its_estimate(client, counts, stamp_of(300.2))
    assert rechecked.path == "tracking", rechecked.status
    # The network's estimate of the next frame is far from the track: the view changed, full path
    # from that estimate (which is hopeless here, so rejected) and the track is cleared.
    # (Its estimate first: an image handled before it would be tracked against the previous, near one.)
    send_initial_pose(client, FAR, stamp_of(300.267))
    time.sleep(1.0)
    jumped = register(client, counts, None, 300.267)
    assert jumped.path == "full" and "view changed" in jumped.status, jumped.status
    assert not jumped.accepted
    # After a rejection the next frame waits for its initial pose: nothing comes without one ...
    # ... and it takes the full path when it comes.
    again = waits_for_its_estimate(client, counts, stamp_of(300.4))
    assert again.path == "full" and again.accepted, again.status


def test_frames_superseded_during_a_full_registration_are_caught_up_on(tracking_gate):
    """The frames that arrive while a full registration runs (seconds on a CPU) are dropped, but the
    track is carried through them (one per catch-up interval) before the newest is tracked."""
    client, counts, points, _ = tracking_gate
    seconds = [500.0 + i / 7.5 for i in range(8)]  # 7.5 frames/s, a track 200 s after the last
    for sec in seconds:  # published faster than the full registration of the first takes
        send_initial_pose(client, NEAR, stamp_of(sec))
        send_image(client, counts, stamp_of(sec))
        # The first one's registration under way (it takes ~1 s), the others arrive while it runs.
        time.sleep(0.25 if sec == seconds[0] else 0.01)
    first, last = result_of(client, stamp_of(seconds[0])), result_of(client, stamp_of(seconds[-1]))
    assert first.path == "full" and first.accepted, first.status
    assert last.path == "tracking" and last.accepted, last.status
    assert "caught up through" in last.status, last.status
    caught_up = int(last.status.split("caught up through ")[1].split()[0])
    assert 1 <= caught_up <= 2, last.status  # one per 0.6 s interval (or more): 500.67, (501.33)
    assert not any(result_of(client, stamp_of(sec), timeout=0) for sec in seconds[1:-1])  # dropped, as before


# --------------------------------------------------------------------------------------------
# the threshold parameter and a missing model, in this process (no image needed)
# --------------------------------------------------------------------------------------------
def refiner(**parameters):
    """A Refiner in this process with ``parameters``; yields it, then cleans up."""
    from rclpy.parameter import Parameter

    from xvr_ros.ros.refiner import Refiner

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        node = Refiner(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in parameters.items()])
    except BaseException:
        rclpy.try_shutdown(context=context)
        raise
    return node, context


def close(node, context) -> None:
    node.destroy_node()
    rclpy.try_shutdown(context=context)


def test_the_threshold_defaults_to_the_model_file_and_is_a_probability(ros_domain):
    import sys

    from xvr_ros.ros.pipeline import GIL_SWITCH_INTERVAL

    node, context = refiner()
    try:
        assert node.params["accept_threshold"] == load_model().threshold
        assert node.params["tracking_accept_threshold"] == load_model(TRACKING_MODEL_PATH).threshold
        assert node.params["coarse_accept_threshold"] == load_model(COARSE_MODEL_PATH).threshold
        assert sys.getswitchinterval() <= GIL_SWITCH_INTERVAL  # the worker's torch calls get the GIL back soon
    finally:
        close(node, context)
    node, context = refiner(accept_threshold=0.9)
    try:
        assert node.params["accept_threshold"] == 0.9
    finally:
        close(node, context)
    with pytest.raises(Exception, match="accept_threshold"):  # rclpy refuses it: out of its 0..1 range
        refiner(accept_threshold=1.5)


def test_the_first_registration_waits_for_the_kernels_before_its_time_budget_starts(ros_domain, monkeypatch):
    """A kernel build at start-up (~30 s) would otherwise eat the first registration's time budget."""
    from xvr_ros.core.render import _ext

    built = threading.Event()
    monkeypatch.setattr(_ext, "warm", lambda: built.wait(10.0) and _ext.status())
    node, context = refiner()
    try:
        registered = []
        node._volume = SimpleNamespace()
        monkeypatch.setattr(node, "read_xray", lambda entry, **_: "xray")
        monkeypatch.setattr(node, "_register", lambda entry, xray, volume: registered.append(xray) or None)
        info = CameraInfo(header=Header(frame_id="carm_source_optical"))
        entry = SimpleNamespace(key=(7, 0), parts={"camera_info": info, "image": Image()})
        worker = threading.Thread(target=node._refine_frame, args=(entry,), daemon=True)
        worker.start()
        time.sleep(0.3)
        assert not registered, "registered before the kernels were built"
        built.set()
        worker.join(10.0)
        assert registered == ["xray"]
    finally:
        built.set()
        close(node, context)


def test_without_a_quality_model_nothing_is_accepted(ros_domain, tmp_path, monkeypatch):
    from xvr_ros.core.register import quality

    (tmp_path / "quality_model.json").write_text('{"format": "something else"}')
    monkeypatch.setitem(quality.MODEL_PATHS, "full", tmp_path / "quality_model.json")
    node, context = refiner()
    try:
        level, message, _ = node.diagnostics.state
        assert level == "ERROR" and "no quality model" in message and "no TF is published" in message, message
        verdict = node._assess(None, None, None)  # never reaches the image: there is nothing to judge with
        assert not verdict.accepted and verdict.p_success == 0.0 and verdict.covariance is None
        assert "no quality model" in verdict.reason
    finally:
        close(node, context)


@pytest.mark.parametrize("rejected, order, track_ended", [
    ((), [500.6, 501.2, 501.8, 502.4], False),  # one per 0.6 s interval
    # A rejected frame is skipped (nothing is published for it anyway), and the kept frame nearest
    # halfway back to the last accepted one is tracked: the C-arm moved further than one step reaches.
    ((501.2,), [500.6, 501.2, 500.8, 501.4, 502.0], False),
    ((501.2, 500.8), [500.6, 501.2, 500.8], True),  # two in a row end the track, and the catch-up
])
def test_catch_up_steps_an_interval_and_halfway_back_after_a_rejection(ros_domain, monkeypatch, rejected, order,
                                                                       track_ended):
    from xvr_ros.ros import refiner as refiner_module

    node, context = refiner(tracking_catch_up_interval=0.6)
    try:
        tracked, calls = [], []
        monkeypatch.setattr(node, "read_xray", lambda entry, **_: entry)
        factors = set()
        monkeypatch.setattr(node, "_track", lambda t, xray, volume, network, factor=1.0: (
            tracked.append(t) or factors.add(factor) or SimpleNamespace(t=t), ""))
        monkeypatch.setattr(node, "_assess", lambda renderer, outcome, xray, far_ok=False: SimpleNamespace(
            accepted=round(outcome.t, 6) not in rejected))
        monkeypatch.setattr(node, "_update_track", lambda entry, xray, outcome, verdict, isocenter=None: calls.append(
            (outcome.t, verdict.accepted)))
        node._skipped = [(round(500.2 + 0.2 * i, 6), f"frame {i}") for i in range(12)]  # to 502.4
        hessian = SimpleNamespace(factor=1.0)
        node._tracker.use_hessian(hessian)
        node._catch_up(NO_VOLUME, accepted=True, registered=500.0)
        assert tracked == pytest.approx(order)
        assert factors == {refiner_module.CATCH_UP_TIME_FACTOR}  # the live frames' render cap, more time
        # After a skipped rejection the next frame computes its own Hessian (the shared one may not fit).
        assert (node._tracker.hessian is hessian) == (not rejected)
        assert [t for t, accepted in calls if accepted] == pytest.approx([t for t in order if t not in rejected])
        assert [a for _, a in calls].count(False) == (1 if track_ended else 0)  # a skipped one is not recorded
        assert ("caught up through" in node._catch_up_note) and refiner_module.CATCH_UP_MAX_REJECTIONS == 2
    finally:
        close(node, context)


def test_a_catch_up_falling_behind_the_stream_ends(ros_domain, monkeypatch):
    """Frames keep coming while it runs; one that loses ground (rejections, retries, a slow
    machine) would chase them as long as the stream lasts."""
    node, context = refiner(tracking_catch_up_interval=0.6)
    try:
        tracked, calls = [], []

        def slow_track(t, xray, volume, network, factor=1.0):  # 1.4 s of stream arrive per caught-up frame
            tracked.append(t)
            if len(tracked) > 20:  # without the rule it would run forever: stop it, and fail below
                node._stopping.set()
            newest = node._skipped[-1][0]
            node._skipped += [(round(newest + 0.2 * (k + 1), 6), "new") for k in range(7)]
            return SimpleNamespace(t=t), ""

        monkeypatch.setattr(node, "read_xray", lambda entry, **_: entry)
        monkeypatch.setattr(node, "_track", slow_track)
        monkeypatch.setattr(node, "_assess", lambda *args, **kwargs: SimpleNamespace(accepted=True))
        monkeypatch.setattr(node, "_update_track", lambda entry, xray, outcome, *_: calls.append(outcome.t))
        node._skipped = [(round(500.2 + 0.2 * i, 6), f"frame {i}") for i in range(10)]  # to 502.0
        node._catch_up(NO_VOLUME, accepted=True, registered=500.0)
        # Then 2.8 s behind the newest frame: more than the 2.0 s at the start and an interval.
        assert tracked == pytest.approx([500.6]) and calls == tracked
        node._skipped = [(round(500.2 + 0.2 * i, 6), f"frame {i}") for i in range(10)]
        monkeypatch.setattr(node, "_track", lambda t, *args: (tracked.append(t) or SimpleNamespace(t=t), ""))
        tracked.clear()
        node._catch_up(NO_VOLUME, accepted=True, registered=500.0)
        assert tracked == pytest.approx([500.6, 501.2, 501.8])  # gaining: to the end
    finally:
        close(node, context)


def test_a_tracked_frame_cut_short_by_its_time_budget_is_rejected_without_ending_the_track(ros_domain, monkeypatch):
    """On a busy CPU one render can outlast the budget: the prior came out unrefined, 3 mm off, and
    the gate (fitted on refinements capped by renders) accepted it at p 0.85."""
    from xvr_ros.ros import refiner as refiner_module
    from xvr_ros.ros.refiner import _Outcome

    node, context = refiner()
    try:
        node._tracker.accepted(500.0, carm_pose(torch.zeros(3), torch.tensor([0.0, 820.0, 0.0])), DET)
        cut_short = SimpleNamespace(refinement=SimpleNamespace(converged=torch.tensor([False]), iterations=1))
        outcome = _Outcome(cut_short, "tracking", 0.9, None)
        verdict = node._assess(None, outcome, None)  # never reaches the image or the quality model
        assert not verdict.accepted and not verdict.judged and "time budget" in verdict.reason, verdict.reason
        image = SimpleNamespace(header=SimpleNamespace(stamp=stamp_of(500.1)))
        node._update_track(SimpleNamespace(parts={"image": image}), None, outcome, verdict)
        assert node._tracker.why_not(500.2, DET) == ""  # the next frame is tracked from the last accepted one
        factors = []  # ... with the caught-up frames' longer time budget (its start is further back)
        near = SimpleNamespace(refinement=SimpleNamespace(similarity=torch.tensor([0.99]),
                                                          trajectory=[torch.tensor([0.989])]))
        monkeypatch.setattr(node, "_track", lambda t, xray, volume, network, factor=1.0: (
            factors.append(factor) or SimpleNamespace(note="", registration=near), ""))
        entry = SimpleNamespace(parts={"image": SimpleNamespace(header=SimpleNamespace(stamp=stamp_of(500.2)))})
        node._register(entry, SimpleNamespace(detector=DET), None)
        node._update_track(entry, None, _Outcome(None, "tracking", 0.9, None), SimpleNamespace(accepted=False,
                                                                                                judged=True, far=False))
        node._register(entry, SimpleNamespace(detector=DET), None)
        assert factors == [refiner_module.CATCH_UP_TIME_FACTOR, 1.0]  # once, after a frame cut short
    finally:
        close(node, context)


def test_a_frame_tracked_from_too_far_is_not_published_and_the_track_goes_on_from_it(ros_domain, monkeypatch):
    """In a replayed sweep of single shots, tracked frames whose similarity rose by 0.03-0.3 were
    accepted 2.5-5 mm off (the depth lags). Caught-up frames and the finishing keep the gate; the
    second such frame in a row ends the track and is registered in full instead."""
    from xvr_ros.ros import refiner as refiner_module
    from xvr_ros.ros.refiner import _Outcome

    node, context = refiner()
    try:
        node._tracker.accepted(500.0, carm_pose(torch.zeros(3), torch.tensor([0.0, 820.0, 0.0])), DET)
        prior, moved = (carm_pose(torch.zeros(1, 3), torch.tensor([[0.0, y, 0.0]])) for y in (820.0, 823.0))
        far = SimpleNamespace(refinement=SimpleNamespace(converged=torch.tensor([True]), iterations=6,
                                                         similarity=torch.tensor([0.99]),
                                                         trajectory=[torch.tensor([0.80])], init_pose=prior,
                                                         pose=moved), pose=moved, uncertainty=None)
        outcome = _Outcome(far, "tracking", 0.8, None)
        verdict = node._assess(SimpleNamespace(isocenter=torch.zeros(3)), outcome, None)
        assert not verdict.accepted and verdict.far and not verdict.judged and "too far" in verdict.reason
        assert "moving 3.0 mm / 0.00 deg" in verdict.reason, verdict.reason
        gated = SimpleNamespace(accepted=True, p_success=0.9, reason="accepted", covariance=torch.eye(6))
        monkeypatch.setattr(refiner_module, "assess_registration", lambda *args, **kwargs: gated)
        xray = SimpleNamespace(image=None, detector=DET)
        assert node._assess(None, outcome, xray, far_ok=True).accepted  # a caught-up frame: the gate judges
        entry = SimpleNamespace(parts={"image": SimpleNamespace(header=SimpleNamespace(stamp=stamp_of(500.2)))})
        node._update_track(entry, xray, outcome, verdict)
        prior, why = node._tracker.prior(500.3, DET)
        assert why == "" and float(prior[0, 1, 3]) > 822.0  # the track goes on from the far frame's pose
        assert not node._cut_short  # (not a frame cut short: the next one has the usual budget)
        skipped = SimpleNamespace(registration=SimpleNamespace(refinement=SimpleNamespace(
            similarity=torch.tensor([0.99]), trajectory=[torch.tensor([0.98])]), pose=far.pose, uncertainty=None))
        assert not node._far_again(500.35, xray, skipped)  # a rise of 0.01 (< tracking_shot_gain): not another shot
        assert node._far_again(500.4, xray, outcome)  # the second in a row ends the track and takes the full path
        assert node._tracker.why_not(500.5, DET) and node._track_fov is None
        near = SimpleNamespace(registration=SimpleNamespace(refinement=SimpleNamespace(
            similarity=torch.tensor([0.99]), trajectory=[torch.tensor([0.989])])))
        assert not node._far_again(500.6, xray, near)
        # A near start that ends on a far worse match than the frame tracked from: rejected, the track ends.
        node._tracker.accepted(501.0, carm_pose(torch.zeros(3), torch.tensor([0.0, 820.0, 0.0])), DET, similarity=0.98)
        stuck = SimpleNamespace(refinement=SimpleNamespace(converged=torch.tensor([True]), iterations=5,
                                                           similarity=torch.tensor([0.601]),
                                                           trajectory=[torch.tensor([0.598])]), pose=far.pose)
        verdict = node._assess(None, _Outcome(stuck, "tracking", 0.6, None), xray)
        assert not verdict.accepted and verdict.judged and "match fell" in verdict.reason
        assert node._assess(None, _Outcome(stuck, "tracking", 0.6, None), xray, far_ok=True).accepted  # caught up
    finally:
        close(node, context)


def test_the_gate_decides_the_multi_start_and_its_verdict_is_not_computed_twice(ros_domain, monkeypatch):
    """The full registration's ``good_enough`` is the gate on the initial pose's refinement; the
    result of that refinement is then judged by that verdict (one assessment), but one with a
    multi-start's candidates (a feature of the quality model) is assessed afresh."""
    from xvr_ros.ros.refiner import _Outcome

    node, context = refiner()
    try:
        assessed, models = [], []
        monkeypatch.setattr(node, "_assess", lambda renderer, outcome, xray: assessed.append(outcome.registration)
                            or models.append(outcome.model) or SimpleNamespace(accepted=len(assessed) == 1))
        volume = SimpleNamespace(renderer="full", for_path=lambda path: path)
        first = SimpleNamespace(refinement=object(), multistart_similarity=None)
        assert node._gate(volume, None, coarse=False)(first) is True
        verdict = node._judged(volume, _Outcome(first, "full", 0.9, None), None)
        assert verdict.accepted and assessed == [first]
        assert node._gate(volume, None, coarse=True)(first) is False  # (the fake gate rejects from now on)
        assert models == ["full", "coarse"]  # a registration stopped a scale early: the coarse model
        restarted = SimpleNamespace(refinement=first.refinement, multistart_similarity=torch.ones(9))
        assert not node._judged(volume, _Outcome(restarted, "full", 0.9, None, coarse=True), None).accepted
        assert assessed == [first, first, restarted] and models[-1] == "coarse"
    finally:
        close(node, context)


def test_an_accepted_full_registration_is_finished_on_the_tracking_level_when_that_is_accepted(ros_domain,
                                                                                               monkeypatch):
    """Finished from its pose with a caught-up frame's time budget, judged by the tracking model;
    published finished when accepted, else as it was."""
    from xvr_ros.core.register import tracking as tracking_module
    from xvr_ros.ros import refiner as refiner_module
    from xvr_ros.ros.refiner import _Outcome, _Verdict

    node, context = refiner()
    try:
        budgets, answers = [], iter([True, False])
        monkeypatch.setattr(tracking_module, "track", lambda renderer, xray, prior, field_of_view, options, callback: (
            budgets.append(options.time_budget) or SimpleNamespace(prior=prior, fov=field_of_view)))
        monkeypatch.setattr(refiner_module, "finished", lambda full, tracked: ("finished", full, tracked))
        monkeypatch.setattr(node, "_assess", lambda renderer, outcome, xray, far_ok=False: _Verdict(
            next(answers), 0.9, "tracking gate", None) if outcome.path == "tracking" else None)
        volume = SimpleNamespace(tracking_renderer="tracking")
        full = SimpleNamespace(pose="full pose", field_of_view="fov")
        outcome, verdict = _Outcome(full, "full", 0.5, None), _Verdict(True, 0.6, "full gate", None)
        done, judged = node._finish(volume, None, outcome, verdict)
        kind, was, tracked = done.registration
        assert kind == "finished" and was is full and tracked.prior == "full pose" and tracked.fov == "fov"
        assert done.path == "full" and judged.accepted
        assert "tracking gate" in judged.reason and "full gate" in judged.reason
        assert budgets == [refiner_module.CATCH_UP_TIME_FACTOR * node._tracker.options.time_budget]
        assert node._finish(volume, None, outcome, verdict) == (outcome, verdict)  # rejected: as it was
        # Stopped a scale early, its model vouched for the finished pose: rejected when that is.
        coarse = _Outcome(full, "full", 0.5, None, coarse=True)
        answers = iter([False])
        done, judged = node._finish(volume, None, coarse, _Verdict(True, 0.7, "coarse gate", None))
        assert done is coarse and not judged.accepted
        assert "tracking gate" in judged.reason and "coarse gate" in judged.reason

        def unfinishable(*args, **kwargs):
            raise ValueError("not finite")

        monkeypatch.setattr(tracking_module, "track", unfinishable)
        assert node._finish(volume, None, outcome, verdict) == (outcome, verdict)
        done, judged = node._finish(volume, None, coarse, _Verdict(True, 0.7, "coarse gate", None))
        assert not judged.accepted and "not finite" in judged.reason
    finally:
        close(node, context)


def test_a_frame_overtaken_by_the_track_is_dropped_not_registered_in_full(ros_domain, monkeypatch):
    """Released late (its initial pose came after newer frames were tracked), its full
    registration would hold up the stream for a second; far older, the stream restarted."""
    from xvr_ros.ros.refiner import STALE_S

    node, context = refiner()
    try:
        drops = []
        monkeypatch.setattr(node, "drop", lambda key, outcome, reason, *a, **kw: drops.append((key, outcome, reason)))
        node._tracker.accepted(10.0, torch.eye(4), DET)
        assert node._register(SimpleNamespace(key="9.5", parts={"image": Image(header=Header(stamp=stamp_of(9.5)))}),
                              None, None) is None
        assert drops == [("9.5", "superseded", drops[0][2])] and "0.50 s older" in drops[0][2]
        assert not node._stale(SimpleNamespace(key="old"), 10.0 - STALE_S - 1.0)  # a restarted stream
        assert not node._stale(SimpleNamespace(key="new"), 10.1) and len(drops) == 1
    finally:
        close(node, context)


def test_with_tracking_a_full_registration_stops_a_scale_before_the_finest(ros_domain):
    from xvr_ros.core.register.registration import coarse_scales

    for parameters, coarse, expected in (({}, True, {"scales": coarse_scales(DET)}),
                                         ({}, False, {}),
                                         ({"scales": [8.0, 4.0, 2.0]}, True, {"scales": (8.0, 4.0)}),
                                         ({"scales": [8.0, 4.0, 2.0]}, False, {"scales": (8.0, 4.0, 2.0)})):
        node, context = refiner(**parameters)
        try:
            assert node._scale_options(DET, coarse) == expected
        finally:
            close(node, context)


def test_frames_are_kept_to_catch_up_on_at_twice_a_caught_up_frames_cost(ros_domain, monkeypatch):
    """Caught up at the interval's own cost, the refiner would chase the stream as long as it lasts."""
    from xvr_ros.ros import refiner as refiner_module

    node, context = refiner(tracking_catch_up_interval=0.4)
    try:
        monkeypatch.setattr(node, "read_xray", lambda entry, **_: entry)
        monkeypatch.setattr(node, "_update_track", lambda *args: None)

        def slow_track(t, xray, volume, network, factor=1.0):  # a caught-up frame costing 0.3 s of a monotonic clock
            clock[0] += 0.3
            return SimpleNamespace(t=t), ""

        clock = [100.0]
        monkeypatch.setattr(refiner_module.time, "monotonic", lambda: clock[0])
        monkeypatch.setattr(node, "_track", slow_track)
        monkeypatch.setattr(node, "_assess", lambda *args, **kwargs: SimpleNamespace(accepted=True))

        def kept(stamps):
            node._catching_up, node._skipped, node._last_kept = True, [], -math.inf
            for t in stamps:
                secs, nsecs = int(t), round((t - int(t)) * 1e9)
                stamp = SimpleNamespace(sec=secs, nanosec=nsecs)
                node.superseded(SimpleNamespace(parts={"image": SimpleNamespace(header=SimpleNamespace(stamp=stamp)),
                                                       "camera_info": None}))
            return [t for t, _ in node._skipped]

        frames = [500.0 + i / 16 for i in range(64)]  # 4 s at 16 frames/s
        per = refiner_module.CATCH_UP_FRAMES_PER_INTERVAL
        assert per == 3 and kept(frames) == pytest.approx(frames[::3])  # >= 0.4 / 3 s apart: the parameter
        node._skipped = [(500.0, "frame")]
        node._catch_up(NO_VOLUME, accepted=True, registered=499.0)
        assert node._catch_up_interval() == pytest.approx(0.6)  # twice 0.3 s
        assert kept(frames) == pytest.approx(frames[::4])  # >= 0.6 / 3 s apart
    finally:
        close(node, context)


def test_an_upstream_drop_while_tracking_is_decided_when_the_frame_is_paired(ros_domain):
    """The pose estimator skips frames while the refiner tracks, unreported: one must be tracked
    (released early) or dropped with a report, never dropped silently."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    node, context = refiner()
    try:
        reports = []
        node.diagnostics.report = lambda level, message, **kv: reports.append((level, kv.get("outcome")))
        drop = Header(stamp=Time(sec=500, nanosec=0))
        node._tracked_at = time.monotonic()  # an accepted tracked result was just published
        node._on_upstream_drop(drop)
        assert (500, 0) in node._upstream_dropped and node.dropped_total == 0  # up to the pairing
        node._upstream_dropped.clear()
        node._needs_network.add((500, 0))  # not trackable, waiting for its estimate: dropped now, reported
        node._on_upstream_drop(drop)
        assert node.dropped_total == 1 and reports == [("WARN", "upstream")]
        node._tracked_at = -math.inf  # not tracking: the pose estimator reported its drop itself
        node._on_upstream_drop(Header(stamp=Time(sec=501, nanosec=0)))
        assert node.dropped_total == 2 and len(reports) == 1 and not node._upstream_dropped
    finally:
        close(node, context)


def test_the_overlay_is_rendered_beside_the_next_frame_not_before_it(ros_domain, monkeypatch):
    """A result and its TF go out while the overlay still renders (one costs as much as a tracked
    frame), and the overlay follows when it is done."""
    from builtin_interfaces.msg import Time

    from xvr_ros.ros import refiner as refiner_module
    from xvr_ros.ros.pipeline import Pending

    node, context = refiner()
    try:
        rendering, release, published = threading.Event(), threading.Event(), []

        def slow_overlay(*args):
            rendering.set()
            assert release.wait(10.0)
            return np.zeros((4, 4, 3), np.uint8)

        monkeypatch.setattr(refiner_module, "registration_overlay", slow_overlay)
        monkeypatch.setattr(node, "_overlay_due", lambda: True)
        monkeypatch.setattr(node._overlay_pub, "publish", published.append)
        detector = Detector(sdd=1000.0, height=4, width=4, delx=1.0, dely=1.0)
        pose = carm_pose(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.0, 600.0, 0.0]]))
        refinement = SimpleNamespace(message="m", similarity=torch.ones(1), iterations=3,
                                     converged=torch.tensor([True]))
        outcome = refiner_module._Outcome(SimpleNamespace(pose=pose, refinement=refinement, field_of_view=None),
                                          "tracking", 0.5, PoseWithCovarianceStamped().pose)
        verdict = refiner_module._Verdict(True, 0.99, "accepted", None)
        image = Image(header=Header(stamp=Time(sec=7)))
        entry = Pending((7, 0), {"image": image}, {"image": time.monotonic()})

        # Rendered inline, the overlay would block _publish until the release below (then fail).
        node._publish(entry, SimpleNamespace(detector=detector), None, outcome, verdict, 0.0)
        assert rendering.wait(10.0) and not published, "the overlay should be rendering"
        release.set()
        assert wait_for(lambda: len(published) == 1, 10.0)
        assert published[0].header.stamp == image.header.stamp and published[0].encoding == "rgb8"
    finally:
        close(node, context)


@pytest.mark.parametrize("filtered", [True, False])
def test_an_accepted_tracked_frame_is_published_filtered_with_the_track(ros_domain, filtered):
    """A tracked frame's depth scatters by a millimetre or two; with ``tracking_filter`` its pose and
    covariance are the track's filter's (the frames before weigh in), else its own."""
    from xvr_ros.core.register.refine import RefineResult
    from xvr_ros.core.register.registration import Registration
    from xvr_ros.ros.refiner import _Outcome, _Verdict

    node, context = refiner(tracking_filter=filtered)
    try:
        for i in range(6):
            frame = along_depth(carm(), 2.0 * (-1) ** i)  # a still C-arm, the depth +-2 mm off
            refinement = RefineResult(pose=frame[None].float(), init_pose=frame[None].float(),
                                      similarity=torch.tensor([0.9]), message="tracking: 4 renders, converged")
            outcome = _Outcome(Registration(frame[None].float(), refinement, "tracking", 0.05), "tracking", 0.9, None)
            verdict = _Verdict(True, 0.95, "accepted", covariance(frame))
            entry = SimpleNamespace(parts={"image": SimpleNamespace(header=SimpleNamespace(stamp=stamp_of(
                500.0 + 0.1 * i)))})
            published, said = node._update_track(entry, SimpleNamespace(detector=DET), outcome, verdict, ISOCENTER)
            if i == 0:
                assert (published, said) == (outcome, verdict)  # the filter's first frame: as it is
        depth = float((torch.linalg.inv(carm()) @ published.registration.pose[0].double())[:3, 3].norm())
        if filtered:
            assert depth < 1.0 and "filtered over 6 frames" in published.registration.refinement.message, depth
            assert float(said.covariance[:3, :3].trace()) < float(covariance(frame)[:3, :3].trace())
        else:
            assert (published, said) == (outcome, verdict) and depth == pytest.approx(2.0, abs=1e-3)
        node._set_volume(None)  # another ModelInfo: the track's poses were in the old volume's frame
        assert node._tracker.why_not(500.5, DET) and node._tracker.recent_pose(500.5, DET) is None
    finally:
        close(node, context)


def test_a_frame_from_a_little_too_far_is_published_when_the_gate_and_the_filter_vouch_for_it(ros_domain,
                                                                                             monkeypatch):
    """On a running filter, a fluoroscopy frame whose similarity rose a little over
    tracking_max_gain (frames skipped, the first live frame after a catch-up) is judged by the
    gate and the filter instead of withheld; one the filter does not expect stays withheld."""
    from xvr_ros.ros import refiner as refiner_module
    from xvr_ros.ros.refiner import _Outcome

    node, context = refiner()
    try:
        sharp = covariance(carm(), depth_sd=0.7)
        for i in range(4):
            node._tracker.accepted(500.0 + 0.1 * i, carm(), DET, covariance=sharp, isocenter=ISOCENTER)

        def rose(pose):
            refinement = SimpleNamespace(converged=torch.tensor([True]), iterations=5, similarity=torch.tensor([0.99]),
                                         trajectory=[torch.tensor([0.98])], init_pose=pose[None], pose=pose[None])
            return _Outcome(SimpleNamespace(refinement=refinement, pose=pose[None]), "tracking", 0.98, None, t=500.4)

        gated = SimpleNamespace(accepted=True, p_success=0.9, reason="accepted: p 0.9", covariance=sharp)
        monkeypatch.setattr(refiner_module, "assess_registration", lambda *args, **kwargs: gated)
        renderer, xray = SimpleNamespace(isocenter=ISOCENTER), SimpleNamespace(image=None, detector=DET)
        verdict = node._assess(renderer, rose(carm()), xray)
        assert verdict.accepted and verdict.judged and "further than a frame" in verdict.reason, verdict.reason
        verdict = node._assess(renderer, rose(along_depth(carm(), 8.0)), xray)  # the depth lags
        assert not verdict.accepted and verdict.far and "too far" in verdict.reason
        assert "filter expect" in verdict.reason, verdict.reason
        gated.accepted = False
        verdict = node._assess(renderer, rose(carm()), xray)  # the gate's rejection: withheld, the track goes on
        assert verdict.far and "the gate would reject it too" in verdict.reason, verdict.reason
    finally:
        close(node, context)
