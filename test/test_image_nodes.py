"""The pose_estimator and refiner nodes as separate processes over loopback (conftest).

One module-scoped set-up: a phantom CT written as NIfTI, a tiny pose network trained on it here
(a few steps: its poses are rough, the refiner fixes them), both nodes started with non-default
frame names, and an in-test rclpy client that publishes ModelInfo (transient local), CameraInfo
and Image (simulated X-rays of the phantom as 16-bit detector intensity) and listens to the
outputs and to /diagnostics.
"""

from __future__ import annotations

import math
import threading
import time

import nibabel as nib
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
from test_convert import project_with_tf
from test_render import phantom
from test_train import RANGES, blobs
from tf2_msgs.msg import TFMessage

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.io.volume import load_volume
from xvr_ros.core.metrics import body_points, mtre
from xvr_ros.core.sim.simulate import simulate_xray
from xvr_ros.core.train.loop import TrainConfig, train
from xvr_ros.msg import ModelInfo, RegistrationResult
from xvr_ros.ros import convert, qos

VOLUME_FRAME, SOURCE_FRAME, CAMERA_FRAME = "ct_volume", "xray_source", "xray_source"
SDD = 1000.0
# The stream's detector: 64 px of 4 mm (the network's canonical one is 32 px of 8 mm) and an
# off-centre principal point, so the Eq. 26 resampling and the K conversion are exercised.
DET = Detector(sdd=SDD, height=64, width=64, delx=4.0, dely=4.0, x0=6.0, y0=-4.0)
BIG = Detector(sdd=SDD, height=128, width=128, delx=2.0, dely=2.0, x0=6.0, y0=-4.0)  # slower to refine
TRUE_POSE = carm_pose(torch.tensor([[8.0, -4.0, 3.0]], dtype=torch.float64),
                      torch.tensor([[4.0, 560.0, -3.0]], dtype=torch.float64), degrees=True)[0]
TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
class Client:
    """The test's own node: publishers for the inputs, everything received, a spinning thread."""

    def __init__(self, env: dict[str, str]):
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, domain_id=int(env["ROS_DOMAIN_ID"]))
        self.node = rclpy.create_node("test_client", context=self.ctx)
        reliable = QoSProfile(depth=10)
        n = self.node
        self.image_pub = n.create_publisher(Image, "xray/image", reliable)
        self.info_pub = n.create_publisher(CameraInfo, "xray/camera_info", reliable)
        self.model_pub = n.create_publisher(ModelInfo, "xvr/model_info", qos.LATCHED)
        self.pose_pub = n.create_publisher(PoseWithCovarianceStamped, "xray/initial_pose", reliable)
        self.lock = threading.Lock()
        kinds = ("pose", "result", "tf", "overlay", "diag", "pose_dropped", "result_dropped")
        self.received: dict[str, list] = {k: [] for k in kinds}
        self.arrival: dict[str, list[float]] = {k: [] for k in kinds}  # time.monotonic() of each message
        n.create_subscription(PoseWithCovarianceStamped, "xray/initial_pose", self._store("pose"), reliable)
        n.create_subscription(Header, "xray/initial_pose/dropped", self._store("pose_dropped"), QoSProfile(depth=100))
        n.create_subscription(Header, "xray/registration/dropped", self._store("result_dropped"), QoSProfile(depth=100))
        n.create_subscription(RegistrationResult, "xray/registration", self._store("result"), reliable)
        n.create_subscription(TFMessage, "/tf", self._store("tf"), QoSProfile(depth=100))
        n.create_subscription(Image, "xray/overlay", self._store("overlay"), reliable)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._store("diag"), QoSProfile(depth=200))
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _store(self, kind):
        def callback(msg):
            with self.lock:
                self.received[kind].append(msg)
                self.arrival[kind].append(time.monotonic())

        return callback

    def messages(self, kind) -> list:
        with self.lock:
            return list(self.received[kind])

    def arrivals(self, kind) -> dict[tuple[int, int], float]:
        """Stamp -> arrival time of the first message of ``kind`` with that stamp."""
        with self.lock:
            pairs = list(zip(self.received[kind], self.arrival[kind]))
        out = {}
        for msg, t in pairs:
            out.setdefault(convert.stamp_key(getattr(msg, "header", msg).stamp), t)  # a Header is its own
        return out

    def close(self):
        stop_spinning(self.executor, self.thread, self.node, self.ctx)


class System:
    """Both nodes, the client, the artefacts and helpers to drive them."""

    def __init__(self, client, procs, logs, model_path, volume_path, volume):
        self.client, self.procs, self.logs = client, procs, logs
        self.model_path, self.volume_path, self.volume = model_path, volume_path, volume
        self._sec = 1000
        self.points = body_points(volume, n=100)
        self.intensity, self.intensity_big = (self.simulate(det) for det in (DET, BIG))

    def simulate(self, det: Detector) -> np.ndarray:
        """A simulated X-ray at the true pose as 16-bit detector intensity (bright = transmitted)."""
        sim = simulate_xray(
            self.volume,
            TRUE_POSE[None].float(),
            det,
            seed=0,
            appearance=None,  # an ideal detector; the 16-bit quantisation below is the only noise
            blur=0.5,
            foreign_object=None,
        )
        L = sim.image[0, 0].double().numpy()
        return np.round(50000.0 * np.exp(-2.5 * L / L.max())).astype(np.uint16)

    def stamp(self):
        self._sec += 1
        return Header(stamp=rclpy.time.Time(seconds=self._sec).to_msg(), frame_id=CAMERA_FRAME)

    def publish_model(self, model_path=None, volume_path=None):
        self.client.model_pub.publish(
            ModelInfo(
                header=Header(frame_id=VOLUME_FRAME),
                model_name="phantom",
                model_path=str(model_path or self.model_path),
                volume_path=str(volume_path or self.volume_path),
                volume_frame=VOLUME_FRAME,
                source_frame=SOURCE_FRAME,
            )
        )

    def send(self, image: Image | None = None, info: CameraInfo | None = True, header=None) -> Header:
        """Publish a CameraInfo and an Image with one new stamp (defaults: the good ones)."""
        header = header or self.stamp()
        if info is True:
            info = convert.camera_info_from_detector(DET)
        if info is not None:
            info.header = header
            self.client.info_pub.publish(info)
        image = image or convert.numpy_to_image(self.intensity, "mono16")
        image.header = header
        self.client.image_pub.publish(image)
        return header

    def wait(self, kind, header, timeout=TIMEOUT):
        key = convert.stamp_key(header.stamp)

        def stamp_of(m):
            return m.transforms[0].header.stamp if kind == "tf" else m.header.stamp

        return wait_for(
            lambda: next((m for m in self.client.messages(kind) if convert.stamp_key(stamp_of(m)) == key), None),
            timeout,
            what=f"{kind} for stamp {convert.stamp_to_str(key)}",
        )

    def diag_mark(self) -> int:
        return len(self.client.messages("diag"))

    def wait_diag(self, node, level, text, since=0, timeout=TIMEOUT) -> DiagnosticStatus:
        def find():
            for arr in self.client.messages("diag")[since:]:
                for s in arr.status:
                    if s.name == f"/{node}" and s.level == level and text in s.message:
                        return s
            return None

        return wait_for(find, timeout, what=f"{node} diagnostic containing {text!r}")

    def wait_ready(self):
        """Until both nodes say their model / volume is loaded (the status is re-published at 1 Hz)."""
        mark = self.diag_mark()
        for node in ("pose_estimator", "refiner"):

            def ready(node=node):
                return any(
                    s.name == f"/{node}" and s.level == DiagnosticStatus.OK
                    and not s.message.startswith("render kernels")
                    for arr in self.client.messages("diag")[mark:]
                    for s in arr.status
                )

            wait_for(ready, TIMEOUT, what=f"{node} to be ready")

    def assert_alive(self):
        for name, proc in self.procs.items():
            assert proc.poll() is None, (
                f"{name} exited with {proc.returncode}; log:\n{self.logs[name].read_text()[-3000:]}"
            )


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_nodes")
    env = ros_env(tmp)
    common = [
        "-p",
        f"volume_frame:={VOLUME_FRAME}",
        "-p",
        f"sdd_mm:={SDD}",
        "-p",
        "intensity:=log",
        "-p",
        "diagnostics_period:=0.5",
    ]
    procs, logs = {}, {}
    for name, extra in (
        ("pose_estimator", ["-p", "camera_info_timeout:=1.0"]),
        # accept_threshold 0 = publish every registration's TF: a 64 px phantom is far from what the
        # quality model was fitted on (it rejects it); the gate has its own test (test_refiner_gate.py).
        ("refiner", ["-p", f"source_frame:={SOURCE_FRAME}", "-p", "time_budget:=3.0", "-p", "pairing_timeout:=3.0",
                     "-p", "accept_threshold:=0.0",
                     # frame by frame, each from the network (tracking has its own test, test_refiner_gate.py)
                     "-p", "tracking:=false"]),
    ):
        logs[name] = tmp / f"{name}.log"
        procs[name] = start(["-m", f"xvr_ros.ros.{name}", "--ros-args", *common, *extra], env, logs[name])
    client = None
    try:
        # While the nodes start: the phantom as a NIfTI CT (HU) and a briefly trained network.
        vol = phantom(shape=(40, 36, 48), spacing=(1.5, 1.5, 1.5), fn=blobs)
        volume_path = tmp / "phantom.nii.gz"
        nib.save(
            nib.Nifti1Image((vol.data.numpy() * 1000.0 - 1000.0).astype(np.float32), vol.affine.numpy()), volume_path
        )
        volume = load_volume(volume_path)
        config = TrainConfig(
            ranges=RANGES,
            height=32,
            delx=8.0,
            sdd=SDD,
            batch_size=4,
            lr=2e-3,
            warmup_steps=3,
            n_val=32,
            augment_p=0.0,
            carm_p=0.0,  # the clean, seeded 12-step network the assertions were written for
            pool_size=0,
            max_steps=12,
            w_ncc=0.0,
        )
        model_path = train(volume, config, tmp / "phantom.pt").path
        client = Client(env)
        sys_ = System(client, procs, logs, model_path, volume_path, volume)

        def subscribed():
            sys_.assert_alive()  # fail at once, with the log, if a node died
            return (
                client.image_pub.get_subscription_count() >= 2
                and client.info_pub.get_subscription_count() >= 2
                and client.model_pub.get_subscription_count() >= 2
                and client.node.count_subscribers("xray/initial_pose") >= 2
            )

        wait_for(subscribed, TIMEOUT, what="both nodes to subscribe")
        yield sys_
    finally:
        if client is not None:
            client.close()
        for proc in procs.values():
            stop(proc)


def good_model(system: System) -> None:
    system.publish_model()
    system.wait_ready()


def reprojection_px(pose_mm: torch.Tensor, points: torch.Tensor) -> float:
    """Mean pixel distance between projections with ``pose_mm`` and with the true pose."""
    a = DET.project(pose_mm[None].double(), points.double())
    b = DET.project(TRUE_POSE[None], points.double())
    return float((a - b).norm(dim=-1).mean())


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_image_in_initial_pose_and_tf_out(system):
    good_model(system)
    header = system.send()
    pose = system.wait("pose", header)
    assert pose.header.frame_id == VOLUME_FRAME
    p = pose.pose.pose.position
    distance = math.sqrt(p.x**2 + p.y**2 + p.z**2)
    assert 0.2 < distance < 1.5, f"source-to-isocenter distance {distance} m (truth 0.56 m): not metres?"
    cov = np.asarray(pose.pose.covariance).reshape(6, 6)
    assert (np.diag(cov) > 0).all() and cov[:3, :3].max() < 1.0, "covariance not from the validation, or not m^2"

    result = system.wait("result", header)
    assert result.header.frame_id == VOLUME_FRAME and result.iterations > 0
    assert result.initial_pose.pose == pose.pose.pose
    assert result.dropped == 0 and "0 frame(s) dropped" in result.status and result.registration_time > 0
    assert result.similarity >= result.initial_similarity - 1e-6
    assert result.accepted and result.rejection_reason == "" and 0.0 <= result.p_success <= 1.0
    cov = np.asarray(result.refined_pose.covariance).reshape(6, 6)
    assert np.linalg.eigvalsh(cov).min() > 0 and cov[:3, :3].max() < 1.0, "no covariance, or not m^2"

    tf = system.wait("tf", header).transforms[0]
    assert (tf.header.frame_id, tf.child_frame_id) == (VOLUME_FRAME, SOURCE_FRAME)
    r = result.refined_pose.pose.position
    assert (tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z) == pytest.approx(
        (r.x, r.y, r.z)
    )

    overlay = system.wait("overlay", header)
    assert (overlay.encoding, overlay.height, overlay.width) == ("rgb8", DET.height, DET.width)
    rgb = np.frombuffer(bytes(overlay.data), np.uint8).reshape(DET.height, DET.width, 3)
    assert ((rgb[..., 1] == 255) & (rgb[..., 0] == 0)).any(), "no DRR edges drawn"

    # The source (the TF's origin) is where the truth puts it, in metres.
    source = np.array([tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z])
    assert np.linalg.norm(source - TRUE_POSE[:3, 3].numpy() / 1000.0) < 0.1

    # A TF consumer (plain numpy on the message fields): CT points in metres through the published
    # TF and the CameraInfo's K land where Detector.project puts them for the refined pose (ROS
    # pixel centres are at integers, the core's at +0.5), and near the truth's projections.
    info = convert.camera_info_from_detector(DET)
    uv_tf = project_with_tf(tf, info, system.points.numpy() / 1000.0)
    refined = convert.carm_from_optical(convert.pose_from_msg(result.refined_pose.pose), DET)
    np.testing.assert_allclose(uv_tf, DET.project(refined[None], system.points)[0].numpy() - 0.5, atol=1e-3)
    initial = convert.carm_from_optical(convert.pose_from_msg(pose.pose.pose), DET)
    err_initial, err_refined = reprojection_px(initial, system.points), reprojection_px(refined, system.points)
    mtre_i = float(mtre(TRUE_POSE[None], initial[None], system.points)[0])
    mtre_r = float(mtre(TRUE_POSE[None], refined[None], system.points)[0])
    print(
        f"\nreprojection error: initial {err_initial:.2f} px -> refined {err_refined:.2f} px; "
        f"mTRE {mtre_i:.1f} -> {mtre_r:.1f} mm; {result.iterations} iterations, {result.registration_time:.2f} s"
    )
    assert err_refined < 2.0 and err_refined <= err_initial + 0.25
    system.assert_alive()


def test_bad_inputs_are_reported_and_the_nodes_keep_working(system):
    good_model(system)
    E = DiagnosticStatus.ERROR
    sent = {}

    def expect(text, **send):
        mark = system.diag_mark()
        header = system.send(**send)
        sent[convert.stamp_key(header.stamp)] = time.monotonic()
        status = system.wait_diag("pose_estimator", E, text, since=mark)
        assert {v.key: v.value for v in status.values}["outcome"] in ("refused", "timeout")

    good = convert.numpy_to_image(system.intensity, "mono16")
    expect(
        "unsupported image encoding 'yuv422'",
        image=Image(height=good.height, width=good.width, encoding="yuv422", step=good.step, data=bytes(good.data)),
    )
    expect("CameraInfo says 48x64", info=convert.camera_info_from_detector(Detector(SDD, 48, 64, DET.delx, DET.dely)))
    nan = system.intensity.astype(np.float32)
    nan[10, 20] = np.nan
    expect("NaN", image=convert.numpy_to_image(nan, "32FC1"))
    expect("no camera_info with its stamp", info=None)
    distorted = convert.camera_info_from_detector(DET)
    distorted.d = [0.2, 0.0, 0.0, 0.0, 0.0]
    expect("distortion", info=distorted)
    expect(
        "need",
        image=Image(
            height=good.height, width=good.width, encoding="mono16", step=good.step, data=bytes(good.data)[:-10]
        ),
    )
    # A 1x1 image with a 1 mm pixel: refused at the first node.
    tiny = Detector(sdd=SDD, height=1, width=1, delx=1.0, dely=1.0)
    expect(
        "too small to register",
        image=convert.numpy_to_image(np.full((1, 1), 1000, np.uint16), "mono16"),
        info=convert.camera_info_from_detector(tiny),
    )
    system.assert_alive()

    # The refiner got none of these (no initial pose came): it learns of each from the pose
    # estimator's drop topic and passes it on at once, without waiting its pairing timeout (3 s)
    # and without reporting it a second time.
    def released():
        seen = system.client.arrivals("result_dropped")
        return all(key in seen for key in sent) and seen

    seen = wait_for(released, TIMEOUT, what="the refiner to pass on every upstream drop")
    assert set(sent) <= set(system.client.arrivals("pose_dropped"))
    waited = {convert.stamp_to_str(key): round(seen[key] - t, 2) for key, t in sent.items()}
    assert max(waited.values()) < 2.5, f"the refiner waited for upstream drops: {waited}"
    refiner_reports = [
        s for arr in system.client.messages("diag") for s in arr.status
        if s.name == "/refiner" and any(v.key == "stamp" and v.value in waited for v in s.values)
    ]
    assert not refiner_reports, [s.message for s in refiner_reports]

    # Both still answer a good image.
    header = system.send()
    system.wait("pose", header)
    system.wait("result", header)
    system.wait("tf", header)
    system.assert_alive()


def test_no_model_and_unreadable_volume(system, tmp_path):
    E = DiagnosticStatus.ERROR
    mark = system.diag_mark()
    system.publish_model(model_path=tmp_path / "missing.pt", volume_path=tmp_path / "missing.nii.gz")
    system.wait_diag("pose_estimator", E, "cannot load model", since=mark)
    system.wait_diag("refiner", E, "cannot load volume", since=mark)

    mark = system.diag_mark()
    header = system.send()
    system.wait_diag("pose_estimator", E, "no model loaded", since=mark)
    # The refiner needs an initial pose to get that far: give it one for this stamp.
    system.client.pose_pub.publish(
        PoseWithCovarianceStamped(
            header=Header(stamp=header.stamp, frame_id=VOLUME_FRAME),
            pose=convert.pose_with_covariance_to_msg(convert.optical_from_carm(TRUE_POSE, DET)),
        )
    )
    system.wait_diag("refiner", E, "no volume loaded", since=mark)
    system.assert_alive()

    good_model(system)
    header = system.send()
    system.wait("pose", header)
    system.wait("result", header)
    system.assert_alive()


def test_refiner_keeps_only_the_newest_input(system):
    """Three images while the refiner is busy with the first: the second is replaced by the
    third, reported on /diagnostics and counted in a result."""
    good_model(system)
    mark = system.diag_mark()
    headers = [
        system.send(image=convert.numpy_to_image(system.intensity_big), info=convert.camera_info_from_detector(BIG))
    ]
    system.wait("pose", headers[0])  # the refiner starts on this 128 px image now and takes a while
    for _ in range(2):
        headers.append(system.send())
        time.sleep(0.05)
    system.wait_diag(
        "refiner", DiagnosticStatus.WARN, f"image {convert.stamp_to_str(headers[1].stamp)} dropped", since=mark
    )
    result = system.wait("result", headers[2])
    # Counted once, in whichever result came first after the drop (the first image's, if the
    # drop happened while it was refined).
    first = system.wait("result", headers[0])
    assert first.dropped + result.dropped == 1
    assert f"{result.dropped} frame(s) dropped since the previous result" in result.status
    assert not any(
        convert.stamp_key(r.header.stamp) == convert.stamp_key(headers[1].stamp)
        for r in system.client.messages("result")
    )
    system.assert_alive()


def test_a_burst_is_accounted_for_exactly_once(system):
    """20 frames at 30 Hz: each gets a result or is dropped (superseded), once; no ERROR."""
    good_model(system)
    system.wait("result", system.send())  # the count of drops starts after this result
    mark, result_mark = system.diag_mark(), len(system.client.messages("result"))
    headers = []
    for _ in range(20):
        headers.append(system.send())
        time.sleep(1 / 30)
    burst = {convert.stamp_key(h.stamp) for h in headers}

    def accounted():
        results = {convert.stamp_key(r.header.stamp) for r in system.client.messages("result")[result_mark:]}
        dropped = set(system.client.arrivals("result_dropped")) & burst
        return (results, dropped) if (results | dropped) >= burst else None

    results, dropped = wait_for(accounted, TIMEOUT, what="every frame of the burst to be accounted for")
    assert not results & dropped, "a frame both registered and dropped"
    new = system.client.messages("result")[result_mark:]
    assert sum(r.dropped for r in new) + len(new) == len(burst), [(r.dropped, r.status) for r in new]
    statuses = [s for arr in system.client.messages("diag")[mark:] for s in arr.status]
    errors = [s.message for s in statuses if s.level == DiagnosticStatus.ERROR]
    assert not errors, errors
    drops = [{v.key: v.value for v in s.values} for s in statuses if " dropped: " in s.message]
    assert all(d["outcome"] == "superseded" and d["reason"] for d in drops), drops
    reported = [d["stamp"] for d in drops]
    assert len(reported) == len(set(reported)) == len(dropped), "each drop reported once, by the node that dropped it"
    print(f"\nburst of {len(burst)} frames at 30 Hz: {len(results)} registered, {len(dropped)} dropped")
    system.assert_alive()
