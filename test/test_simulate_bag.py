"""Tests for xvr_ros.ros.tools.simulate_bag's continuous fluoroscopy mode and its command line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from test_render import phantom
from test_train import blobs

from xvr_ros.cli import main
from xvr_ros.core.sim.session import plan_fluoro
from xvr_ros.ros import convert
from xvr_ros.ros.tools.bag import bag_info, read_messages
from xvr_ros.ros.tools.simulate_bag import DEFAULT_TOPICS, EPOCH_NS, simulate_bag


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    vol = phantom(shape=(40, 36, 48), spacing=(1.5, 1.5, 1.5), fn=blobs)
    path = tmp_path_factory.mktemp("fluorovol") / "phantom.nii.gz"
    nib.save(nib.Nifti1Image((vol.data.numpy() * 1000.0 - 1000.0).astype(np.float32), vol.affine.numpy()), path)
    return path


def test_continuous_bag_round_trip(tmp_path, volume_file):
    fps = 7.5
    r = simulate_bag(volume_file, tmp_path / "fluoro", mode="continuous", fps=fps, duration_s=2.0, size=32, seed=3)
    assert (r.mode, r.fps, r.frames, r.faults) == ("continuous", fps, 15, {})
    assert r.duration_s == pytest.approx(14 / fps) and r.encodings == {"mono16": 15}
    info = bag_info(r.path)
    for topic, kind in (("image", "Image"), ("camera_info", "CameraInfo")):
        assert info.topics[DEFAULT_TOPICS[topic]] == (f"sensor_msgs/msg/{kind}", 15)
    assert info.topics[DEFAULT_TOPICS["ground_truth"]] == ("geometry_msgs/msg/PoseStamped", 15)
    assert set(info.topics) == set(DEFAULT_TOPICS.values()), "no faults unless asked"
    session = json.loads(info.custom_data["xvr_ros.session"])
    assert session["mode"] == "continuous" and session["fps"] == fps and session["frames"] == 15

    messages = list(read_messages(r.path))
    images = [m for m in messages if m.topic == DEFAULT_TOPICS["image"]]
    stamps = [convert.ns_from_time(m.msg.header.stamp) for m in images]
    # Frame i is captured i / fps after the first (to the nanosecond), and bag time = stamp.
    assert stamps == [EPOCH_NS + round(i * 1e9 / fps) for i in range(15)]
    assert [m.time_ns for m in images] == stamps
    assert {(m.msg.encoding, m.msg.height) for m in images} == {("mono16", 32)}, "one detector, one stream"
    truth = [m.msg for m in messages if m.topic == DEFAULT_TOPICS["ground_truth"]]
    plan = plan_fluoro(2.0, size=32, fps=fps, seed=3)
    for gt, fr in zip(truth, plan):
        want = convert.optical_from_carm(fr.pose, fr.detector)
        p = gt.pose.position
        np.testing.assert_allclose([p.x, p.y, p.z], want[:3, 3].numpy() / 1000.0, atol=1e-9)

    with pytest.raises(ValueError, match="not both"):
        simulate_bag(volume_file, tmp_path / "x", mode="continuous", frames=3, duration_s=1.0)
    with pytest.raises(ValueError, match="continuous"):
        simulate_bag(volume_file, tmp_path / "x", duration_s=1.0)
    with pytest.raises(ValueError, match="mode"):
        simulate_bag(volume_file, tmp_path / "x", mode="cine")


def test_cli_continuous_mode(tmp_path, volume_file, capsys):
    bag = tmp_path / "run"
    args = [
        "simulate-bag",
        "--volume",
        str(volume_file),
        "--out",
        str(bag),
        "--mode",
        "continuous",
        "--fps",
        "15",
        "--frames",
        "4",
        "--size",
        "32",
    ]
    assert main(args) == 0
    assert "4 frames (continuous, 15/s)" in capsys.readouterr().out
    info = bag_info(bag)
    assert json.loads(info.custom_data["xvr_ros.session"])["mode"] == "continuous"
    stamps = [m.time_ns for m in read_messages(bag) if m.topic == DEFAULT_TOPICS["image"]]
    assert np.diff(stamps).tolist() == [66666667, 66666666, 66666667]
    assert main(["simulate-bag", "--volume", str(volume_file), "--out", str(tmp_path / "y"), "--duration", "1"]) == 2
    assert "continuous" in capsys.readouterr().err
