"""The model_manager node: Finetune action (feedback, result, one-goal policy, cancel, bad goals),
LoadModel, latched ModelInfo, diagnostics.

Most tests talk over loopback to one node in a subprocess (``python -m xvr_ros.ros.model_manager``)
with an rclpy client in this process; one runs the node in-process on an executor thread. The
trainings are tiny (32 px, batch 2, a few steps of resnet18 on a 32x32x24 phantom).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import rclpy
from action_msgs.msg import GoalStatus
from conftest import ros_env, start, stop, stop_spinning, wait_for
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter

from xvr_ros.action import Finetune
from xvr_ros.core.model.checkpoint import (
    config_from_model,
    load_checkpoint,
    save_checkpoint,
)
from xvr_ros.core.model.network import PoseRegressor
from xvr_ros.msg import ModelInfo
from xvr_ros.ros.model_manager import (
    GoalError,
    ModelManager,
    check_model_name,
)
from xvr_ros.ros.qos import LATCHED
from xvr_ros.srv import LoadModel

ROS_KEYS = ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY", "ROS_LOG_DIR")
# Small and fast: what the node trains with in these tests.
NODE_PARAMS = dict(
    height=32, batch_size=2, use_ncc=False, validation_poses=8, canonical_delx_mm=8.0, feedback_rate_hz=20.0
)
# The chest preset in ROS units: alpha, beta, gamma lo/hi (rad), x, y, z lo/hi (m).
CHEST_RANGES = [math.radians(v) for v in (-30, 30, -15, 15, -10, 10)] + [-0.03, 0.03, 0.75, 0.95, -0.03, 0.03]


def write_phantom(path):
    hu = np.full((32, 32, 24), -1000, dtype=np.int16)
    hu[8:24, 10:22, 6:18] = 0  # a block of water
    hu[14:18, 14:18, 8:16] = 1200  # with a bone rod inside
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.5, 1.0])), path)


def write_checkpoint(path, volume_path="ct.nii.gz"):
    """An (untrained) 32 px model with the metadata a training writes."""
    model = PoseRegressor("resnet18", height=32)
    config = config_from_model(model, sdd=1020.0, delx=8.0, orientation="AP", reverse_x_axis=False)
    meta = {
        "volume": {"path": str(volume_path), "sha256": "ab" * 32},
        "intrinsics": {"sdd": 1020.0, "height": 32, "width": 32, "delx": 8.0, "dely": 8.0, "reverse_x_axis": False},
        "steps": 7,
        "validation": {"mtre_median_mm": 12.5, "mtre_iqr_mm": [10.0, 15.0], "dgeo_median_mm": 20.0},
    }
    save_checkpoint(path, model, config, metadata=meta, itr=7)
    return path


class Client:
    """An rclpy client node on its own context and executor thread."""

    def __init__(self, namespace=""):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("mm_test_client", context=self.context)
        self.executor = MultiThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.ns = namespace
        self.finetune = ActionClient(self.node, Finetune, f"{namespace}/xvr/finetune")
        self.load = self.node.create_client(LoadModel, f"{namespace}/xvr/load_model")
        self.diagnostics: list[DiagnosticStatus] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diagnostics.extend(m.status), 50)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        stop_spinning(self.executor, self.thread, self.node, self.context)

    def model_infos(self) -> list[ModelInfo]:
        """A *new* subscription to the latched ModelInfo: what a late subscriber receives."""
        got: list[ModelInfo] = []
        self.node.create_subscription(ModelInfo, f"{self.ns}/xvr/model_info", got.append, LATCHED)
        return got

    def send(self, timeout=20.0, feedback=None, **fields):
        goal = Finetune.Goal(**fields)
        future = self.finetune.send_goal_async(goal, feedback_callback=feedback)
        return wait_for(lambda: future.result() if future.done() else None, timeout, what="goal response")

    def result(self, handle, timeout=120.0):
        future = handle.get_result_async()
        return wait_for(lambda: future.result() if future.done() else None, timeout, what="finetune result")

    def run(self, timeout=120.0, **fields):
        handle = self.send(**fields)
        assert handle.accepted, f"goal {fields} rejected"
        return self.result(handle, timeout)

    def call_load(self, model, timeout=20.0):
        future = self.load.call_async(LoadModel.Request(model=model))
        return wait_for(lambda: future.result() if future.done() else None, timeout, what="LoadModel response")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model_manager")
    write_phantom(tmp / "ct.nii.gz")
    (tmp / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file" * 10)
    (tmp / "garbage.pth").write_bytes(b"not a checkpoint")
    write_checkpoint(tmp / "premade.pth", tmp / "ct.nii.gz")
    (tmp / "allowed").mkdir()  # the node's model_dirs_allowed
    write_checkpoint(tmp / "allowed" / "kept_elsewhere.pth", tmp / "ct.nii.gz")
    (tmp / "allowed" / "garbage.pth").write_bytes(b"not a checkpoint")
    return tmp


@pytest.fixture(scope="module")
def node(files):
    """The node in a subprocess and a client on the same isolated domain."""
    env = ros_env(files)
    saved = {k: os.environ.get(k) for k in ROS_KEYS}
    os.environ.update({k: env[k] for k in ROS_KEYS})
    models = files / "models"
    args = [
        "-m",
        "xvr_ros.ros.model_manager",
        "--ros-args",
        "-p",
        f"models_dir:={models}",
        "-p",
        f"model:={files / 'missing_at_startup.pth'}",  # a bad start-up model must not stop it
        "-p",
        f"model_dirs_allowed:=[{files / 'allowed'}]",
    ]
    for key, value in NODE_PARAMS.items():
        args += ["-p", f"{key}:={str(value).lower() if isinstance(value, bool) else value}"]
    proc = start(args, env, files / "model_manager.log")
    client = Client()
    try:
        if not client.finetune.wait_for_server(timeout_sec=30):
            pytest.fail("finetune action server did not come up:\n" + (files / "model_manager.log").read_text())
        assert client.load.wait_for_service(timeout_sec=10)
        yield proc, client, models
    finally:
        client.close()
        code = stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert code == 0, "model_manager did not exit cleanly:\n" + (files / "model_manager.log").read_text()


@pytest.fixture(scope="module")
def trained(node, files):
    """One successful de novo training from ROS-unit ranges, with its feedback."""
    _, client, _ = node
    feedback: list[Finetune.Feedback] = []
    handle = client.send(
        feedback=lambda m: feedback.append(m.feedback),
        volume_path=str(files / "ct.nii.gz"),
        ranges=CHEST_RANGES,
        max_steps=3,
        output_name="m1",
    )
    assert handle.accepted
    response = client.result(handle)
    return response, feedback


# --------------------------------------------------------------------------------------------
def test_model_names_cannot_escape():
    assert check_model_name("patient_7") == "patient_7.pth"
    assert check_model_name("p7.v2.pth") == "p7.v2.pth"
    for bad, why in [
        ("../x", "separator"),
        ("a/b", "separator"),
        ("/abs/model", "path"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".hidden", "not allowed"),
        ("a b", "not allowed"),
        ("", "empty"),
        ("~/m", "path"),
        ("a\\b", "separator"),
    ]:
        with pytest.raises(GoalError, match=why):
            check_model_name(bad)


def test_finetune_feedback_result_in_metres(node, trained, files):
    _, client, models = node
    response, feedback = trained
    result = response.result
    assert response.status == GoalStatus.STATUS_SUCCEEDED, result.message
    assert result.success and result.steps == 3
    path = files / "models" / "m1.pth"
    assert result.model_path == str(path) and path.is_file()
    assert os.path.dirname(result.model_path) == str(models)
    # Feedback for every step (the test's rate limit is above the step rate), in order.
    steps = [f.step for f in feedback]
    assert steps and steps == sorted(steps) and steps[-1] == 3 and steps[0] == 1
    assert all(f.max_steps == 3 and f.elapsed > 0 for f in feedback)
    assert feedback[-1].loss_names[0] == "dgeo" and "total" in feedback[-1].loss_names
    assert len(feedback[-1].loss_names) == len(feedback[-1].loss_values)
    # Metres: the result's figures are the checkpoint's mm figures / 1000, and the ranges sent in
    # rad/m arrived in the core as deg/mm.
    ckpt = load_checkpoint(path)
    v = ckpt.metadata["validation"]
    assert result.mtre_median == pytest.approx(v["mtre_median_mm"] / 1000)
    assert result.mtre_q25 == pytest.approx(v["mtre_iqr_mm"][0] / 1000)
    assert result.mtre_q75 == pytest.approx(v["mtre_iqr_mm"][1] / 1000)
    assert result.dgeo_median == pytest.approx(v["dgeo_median_mm"] / 1000)
    assert 0 < result.mtre_median < 5  # metres, not mm
    ranges = ckpt.metadata["ranges"]
    assert ranges["alpha"] == pytest.approx([-30, 30]) and ranges["y"] == pytest.approx([750, 950])
    assert ckpt.config["height"] == 32 and ckpt.metadata["volume"]["path"] == str(files / "ct.nii.gz")
    # The new model is active: a subscriber that starts now still gets its ModelInfo.
    infos = client.model_infos()
    info = wait_for(lambda: infos[-1] if infos else None, 10, what="latched ModelInfo")
    assert info.model_path == str(path) and info.model_name == "m1"
    assert info.volume_path == str(files / "ct.nii.gz") and len(info.volume_sha256) == 64
    assert (info.volume_frame, info.source_frame) == ("volume", "carm_source_optical")
    assert info.training_steps == 3 and info.heldout_mtre_median == pytest.approx(result.mtre_median)
    cam = info.canonical_camera
    assert (cam.height, cam.width, cam.header.frame_id) == (32, 32, "carm_source_optical")
    # Canonical detector 32 px of 8 mm at 1020 mm: f = 127.5 px, principal point at the centre.
    assert np.allclose(np.reshape(cam.k, (3, 3)), [[127.5, 0, 15.5], [0, 127.5, 15.5], [0, 0, 1]])


def test_second_goal_rejected_and_cancel_saves(node, trained, files):
    _, client, models = node
    feedback: list[Finetune.Feedback] = []
    handle = client.send(
        feedback=lambda m: feedback.append(m.feedback),
        volume_path=str(files / "ct.nii.gz"),
        preset="chest",
        time_budget=300.0,
        output_name="long",
    )
    assert handle.accepted
    wait_for(lambda: feedback, 60, what="training to start")
    # One goal at a time: a second one is rejected while the first runs.
    second = client.send(volume_path=str(files / "ct.nii.gz"), preset="chest", max_steps=1, output_name="second")
    assert not second.accepted
    assert not (models / "second.pth").exists()
    step_at_cancel = feedback[-1].step
    t0 = time.monotonic()
    cancel = handle.cancel_goal_async()
    wait_for(lambda: cancel.done(), 10, what="cancel response")
    assert len(cancel.result().goals_canceling) == 1
    response = client.result(handle, timeout=60)
    elapsed = time.monotonic() - t0
    result = response.result
    assert response.status == GoalStatus.STATUS_CANCELED
    assert not result.success and result.message.startswith("cancelled")
    assert result.model_path == str(models / "long.pth") and (models / "long.pth").is_file()
    assert result.steps <= step_at_cancel + 2, "training went on after the cancel"
    assert elapsed < 30
    assert 0 < result.mtre_median < 5
    load_checkpoint(models / "long.pth")  # a complete, loadable model
    # Not made active; the node accepts goals again.
    infos = client.model_infos()
    info = wait_for(lambda: infos[-1] if infos else None, 10, what="latched ModelInfo")
    assert info.model_name == "m1"


BAD_GOALS = [
    (dict(volume_path="{tmp}/missing.nii.gz"), "does not exist"),
    (dict(volume_path=""), "volume_path is empty"),
    (dict(volume_path="{tmp}/garbage.nii.gz"), "unreadable volume"),
    (dict(preset="lung"), "unknown preset 'lung'"),
    (dict(preset="", ranges=[0.0, 1.0]), "12 values"),
    (dict(preset=""), "give a preset"),
    (dict(max_steps=0, time_budget=0.0), "no time or step limit"),
    (dict(max_steps=-3), "max_steps must be >= 0"),
    (dict(time_budget=float("nan")), "time_budget must be"),
    (dict(output_name="../evil"), "path separator"),
    (dict(output_name="/tmp/evil"), "is a path"),
    (dict(output_name=".."), "'..'"),
    (dict(base_checkpoint="{tmp}/allowed/garbage.pth"), "not a readable torch checkpoint"),
    (dict(base_checkpoint="{tmp}/premade.pth"), "bad base checkpoint: '{tmp}/premade.pth' resolves to"),
    (dict(base_checkpoint="../premade.pth"), "outside the models directory"),
    (dict(base_checkpoint="no_such_model"), "bad base checkpoint: no model 'no_such_model'"),
    (dict(labels=[1, 2]), "no labelmap_path"),
    (dict(device="bogus_device"), "unknown device"),
]


def test_bad_goals_fail_with_a_message(node, trained, files):
    proc, client, models = node
    before = sorted(p.name for p in models.iterdir())
    for fields, expected in BAD_GOALS:
        goal = dict(volume_path=str(files / "ct.nii.gz"), preset="chest", max_steps=1, output_name="bad")
        goal.update({k: v.format(tmp=files) if isinstance(v, str) else v for k, v in fields.items()})
        response = client.run(timeout=60, **goal)
        assert response.status == GoalStatus.STATUS_ABORTED, (fields, response.result.message)
        assert not response.result.success and response.result.model_path == ""
        assert expected.format(tmp=files) in response.result.message, (fields, response.result.message)
        assert proc.poll() is None, "the node died"
    assert sorted(p.name for p in models.iterdir()) == before  # nothing written
    assert not (files / "evil.pth").exists() and not (files / "evil").exists()
    # Reported on /diagnostics too.
    errors = [s for s in client.diagnostics if s.level == DiagnosticStatus.ERROR and "bad goal" in s.message]
    assert errors and errors[0].name == "/model_manager"


def test_load_model(node, trained, files):
    proc, client, models = node
    infos = client.model_infos()
    ok = client.call_load("long")  # by name
    assert ok.success and ok.model_path == str(models / "long.pth"), ok.message
    (models / "alias.pth").symlink_to(models / "long.pth")  # a symlink inside to a model inside
    ok = client.call_load("alias")
    assert ok.success and ok.model_path == str(models / "long.pth"), ok.message
    kept = files / "allowed" / "kept_elsewhere.pth"
    ok = client.call_load(str(kept))  # by path, in an allow-listed directory
    assert ok.success and ok.model_path == str(kept), ok.message
    info = wait_for(lambda: infos[-1] if infos and infos[-1].model_path == str(kept) else None, 10, what="ModelInfo")
    assert info.heldout_mtre_median == pytest.approx(0.0125) and info.training_steps == 7
    (models / "escape.pth").symlink_to(files / "premade.pth")  # a symlink inside to a model outside
    outside = f"outside the models directory {models} and the allowed directories [{files / 'allowed'}]"
    for ref, expected in [
        ("../premade.pth", outside),
        ("../../../../../../etc/passwd", "resolves to /etc/passwd, " + outside),
        ("/etc/passwd", outside),
        (str(files / "premade.pth"), outside),  # a real checkpoint, but not where models may come from
        ("escape", f"'escape' resolves to {files / 'premade.pth'}, {outside}"),
        ("..", outside),
        ("nope", "no model 'nope'"),
        (str(files / "allowed" / "garbage.pth"), "not a usable model"),
        ("", "empty"),
    ]:
        bad = client.call_load(ref)
        assert not bad.success and expected in bad.message, (ref, bad.message)
    # A failed load leaves the active model alone; a late subscriber gets the last good one.
    late = client.model_infos()
    assert wait_for(lambda: late[-1] if late else None, 10, what="latched ModelInfo").model_path == str(kept)
    assert proc.poll() is None


_OPENED: list[str] | None = None  # while a list: every path this process opens is appended


def _record_opens(event, args):
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; this one is idle unless _OPENED is a list


def test_refused_models_are_never_opened(files, tmp_path, ros_domain, monkeypatch):
    """The containment check comes before any open(): a refused reference leaves no trace in the audit log.

    Empty or relative allow-list entries are ignored (they would allow the node's working directory).
    """
    global _OPENED
    models = tmp_path / "models"
    models.mkdir()
    (models / "escape.pth").symlink_to(files / "premade.pth")
    (models / "dangling.pth").symlink_to(tmp_path / "not_there.pth")
    write_checkpoint(models / "inside.pth")
    write_checkpoint(tmp_path / "in_cwd.pth")
    monkeypatch.chdir(tmp_path)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        mm = ModelManager(
            context=context,
            parameter_overrides=[
                Parameter("models_dir", value=str(models)),
                Parameter("model_dirs_allowed", value=["", ".", str(files / "allowed")]),
            ],
        )
        try:
            assert mm.activate(str(files / "allowed" / "kept_elsewhere.pth")).model_name == "kept_elsewhere"
            _OPENED = []
            refs = ["escape", "dangling", str(files / "premade.pth"), "../premade.pth", "../../etc/passwd"]
            for ref in [*refs, str(tmp_path / "in_cwd.pth")]:
                with pytest.raises(GoalError, match="resolves to .*, outside the models directory"):
                    mm.activate(ref)
            outside = ("premade", "passwd", "not_there", "in_cwd")
            assert not [p for p in _OPENED if any(x in p for x in outside)], _OPENED
            _OPENED = []
            assert mm.activate("inside").model_path == str(models / "inside.pth")
            assert str(models / "inside.pth") in _OPENED  # the recorder does see opens
        finally:
            _OPENED = None
            mm.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)


def test_in_process_startup_model_latched(files, tmp_path, ros_domain):
    """The node in this process (executor thread), a model given at start-up, a late subscriber."""
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        mm = ModelManager(
            namespace="inproc",
            context=context,
            parameter_overrides=[
                Parameter("models_dir", value=str(tmp_path / "models_inproc")),
                Parameter("model", value=str(files / "premade.pth")),
                Parameter("volume_frame", value="ct"),
                Parameter("source_frame", value="src_optical"),
            ],
        )
        executor = MultiThreadedExecutor(context=context)
        executor.add_node(mm)
        thread = threading.Thread(target=executor.spin, daemon=True)
        thread.start()
        time.sleep(0.5)  # published well before anyone subscribes
        sub = rclpy.create_node("late_subscriber", context=context)
        got: list[ModelInfo] = []
        sub.create_subscription(ModelInfo, "/inproc/xvr/model_info", got.append, LATCHED)
        executor.add_node(sub)
        info = wait_for(lambda: got[-1] if got else None, 10, what="latched ModelInfo")
        assert info.model_path == str(files / "premade.pth") and info.model_name == "premade"
        assert (info.volume_frame, info.source_frame, info.header.frame_id) == ("ct", "src_optical", "ct")
        assert info.canonical_camera.header.frame_id == "src_optical"
        assert (tmp_path / "models_inproc").is_dir()
        with pytest.raises(GoalError, match="resolves outside"):
            (tmp_path / "models_inproc" / "link.pth").symlink_to(files / "premade.pth")
            mm.output_path("link")
        executor.shutdown()
        sub.destroy_node()
        mm.destroy_node()
    finally:
        rclpy.try_shutdown(context=context)
