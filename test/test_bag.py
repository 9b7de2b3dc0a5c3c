"""Tests for xvr_ros.ros.tools.bag (rosbag2 I/O) and xvr_ros.ros.tools.simulate_bag."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ament_index_python.packages import get_package_share_directory
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from test_render import phantom
from test_train import blobs
from tf2_msgs.msg import TFMessage

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.msg import ModelInfo, RegistrationResult
from xvr_ros.ros import convert
from xvr_ros.ros.tools.bag import BagError, BagWriter, bag_info, msgtype_of, read_messages
from xvr_ros.ros.tools.simulate_bag import (
    DEFAULT_TOPICS,
    encoding_of,
    fault_frames,
    simulate_bag,
)

DET = Detector(sdd=1020.0, height=6, width=5, delx=2.0, dely=2.0, x0=1.0)


def sample_messages():
    """One message of each type the package writes or reads, with non-default fields."""
    header = Header(stamp=Time(sec=1_767_225_600, nanosec=123), frame_id="carm_source_optical")
    pose = carm_pose(torch.tensor([[10.0, -5.0, 2.0]]), torch.tensor([[3.0, 850.0, -4.0]]), degrees=True)[0].double()
    image = convert.numpy_to_image(np.arange(30, dtype=np.uint16).reshape(6, 5) * 1000, "mono16", header=header)
    info = convert.camera_info_from_detector(DET, header)
    gt = PoseStamped(header=Header(stamp=header.stamp, frame_id="volume"), pose=convert.pose_to_msg(pose))
    tf = TFMessage(transforms=[convert.transform_stamped(pose, "volume", "carm_source_optical", header.stamp)])
    result = RegistrationResult(header=Header(stamp=header.stamp, frame_id="volume"), similarity=0.93, iterations=41,
                                converged=True, status="converged; dropped 0 older input(s) while busy (total 0)")
    model = ModelInfo(
        model_name="chest",
        model_path="/m/chest.pth",
        volume_path="/v/ct.nii.gz",
        volume_sha256="ab" * 32,
        canonical_camera=info,
        training_steps=7,
        heldout_mtre_median=0.02,
    )
    diag = DiagnosticArray(
        header=header,
        status=[
            DiagnosticStatus(
                level=DiagnosticStatus.WARN, name="/refiner", message="m", values=[KeyValue(key="stamp", value="1.2")]
            )
        ],
    )
    return [
        ("/xray/image", image),
        ("/xray/camera_info", info),
        ("/xray/ground_truth", gt),
        ("/tf", tf),
        ("/xray/registration", result),
        ("/xvr/model_info", model),
        ("/diagnostics", diag),
    ]


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_round_trip(tmp_path, storage):
    msgs = sample_messages()
    path = tmp_path / "bag"
    with BagWriter(path, storage) as w:
        for i, (topic, msg) in enumerate(msgs):
            w.write(topic, msg, 1_000 + i)
        w.set_custom_data("xvr_ros.volume", "/v/ct.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag"], "a temporary directory was left behind"
    info = bag_info(path)
    assert info.storage == storage and info.custom_data == {"xvr_ros.volume": "/v/ct.nii.gz"}
    assert info.topics == {t: (msgtype_of(m), 1) for t, m in msgs}
    assert (info.start_ns, info.end_ns) == (1_000, 1_000 + len(msgs))
    back = list(read_messages(path))
    assert [(m.topic, m.time_ns) for m in back] == [(t, 1_000 + i) for i, (t, _) in enumerate(msgs)]
    for (_, want), got in zip(msgs, back):
        assert got.error == "" and got.msg == want


def test_types_and_definitions_as_jazzy_names_them(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path) as w:
        for topic, msg in sample_messages():
            w.write(topic, msg, 1)
    import yaml

    meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 8 and meta["storage_identifier"] == "mcap"
    topics = {t["topic_metadata"]["name"]: t["topic_metadata"] for t in meta["topics_with_message_count"]}
    expected = {
        "/xray/image": "sensor_msgs/msg/Image",
        "/tf": "tf2_msgs/msg/TFMessage",
        "/xray/registration": "xvr_ros/msg/RegistrationResult",
        "/xvr/model_info": "xvr_ros/msg/ModelInfo",
        "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
    }
    for topic, msgtype in expected.items():
        md = topics[topic]
        assert md["type"] == msgtype and md["serialization_format"] == "cdr"
        # The type hash rosidl generated for the installed interface (what ros2 bag checks).
        pkg, _, name = msgtype.split("/")
        description = json.loads((Path(get_package_share_directory(pkg)) / "msg" / f"{name}.json").read_text())
        assert md["type_description_hash"] == description["type_hashes"][0]["hash_string"]
        qos = yaml.safe_load(md["offered_qos_profiles"])
        assert qos and qos[0]["reliability"] == 1  # reliable: ros2 bag play republishes with it
    assert yaml.safe_load(topics["/xvr/model_info"]["offered_qos_profiles"])[0]["durability"] == 1  # latched


def test_writer_refuses_existing_and_discards_on_error(tmp_path):
    path = tmp_path / "bag"
    with BagWriter(path) as w:
        w.write("/a", Image(), 1)
    with pytest.raises(BagError, match="exists"):
        BagWriter(path)
    with pytest.raises(RuntimeError, match="boom"):
        with BagWriter(path, overwrite=True) as w:
            w.write("/b", Image(), 2)
            raise RuntimeError("boom")
    assert bag_info(path).topics == {"/a": ("sensor_msgs/msg/Image", 1)}, "the old bag must survive a failed write"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag"]
    with BagWriter(path, overwrite=True) as w:
        w.write("/b", Image(), 2)
    assert list(bag_info(path).topics) == ["/b"]
    with pytest.raises(BagError, match="storage"):
        BagWriter(tmp_path / "x", "rosbag1")


def test_unreadable_bags_and_corrupt_messages(tmp_path):
    with pytest.raises(BagError, match="no bag"):
        bag_info(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match="cannot read bag"):
        bag_info(tmp_path / "empty")
    path = tmp_path / "bag"
    with BagWriter(path) as w:
        w.write_raw("/xray/image", "sensor_msgs/msg/Image", b"\x00\x01\x00\x00\xde\xad", 1)
        w.write("/xray/image", Image(height=1, width=1, encoding="mono8", step=1, data=b"\x07"), 2)
    first, second = read_messages(path)
    assert first.msg is None and "cannot deserialise" in first.error
    assert second.msg.data.tobytes() == b"\x07"


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    vol = phantom(shape=(40, 36, 48), spacing=(1.5, 1.5, 1.5), fn=blobs)
    path = tmp_path_factory.mktemp("bagvol") / "phantom.nii.gz"
    nib.save(nib.Nifti1Image((vol.data.numpy() * 1000.0 - 1000.0).astype(np.float32), vol.affine.numpy()), path)
    return path


def test_simulated_bag(tmp_path, volume_file):
    kw = dict(frames=12, size=32, faults=True, seed=5)
    a = simulate_bag(volume_file, tmp_path / "a", **kw)
    simulate_bag(volume_file, tmp_path / "b", storage="sqlite3", **kw)
    info = bag_info(a.path)
    assert info.topics[DEFAULT_TOPICS["image"]] == ("sensor_msgs/msg/Image", 12)
    assert info.topics[DEFAULT_TOPICS["camera_info"]] == ("sensor_msgs/msg/CameraInfo", 11)  # one left out on purpose
    assert info.topics[DEFAULT_TOPICS["ground_truth"]] == ("geometry_msgs/msg/PoseStamped", 12)
    assert "/carm/status" in info.topics and info.custom_data["xvr_ros.volume"] == str(volume_file.resolve())
    assert a.faults == fault_frames(12) and set(a.faults.values()) == {"corrupt", "no_camera_info", "bad_encoding"}
    # Seeded: the same arguments give the same messages, in either storage.
    ma, mb = list(read_messages(a.path)), list(read_messages(tmp_path / "b"))
    assert [(m.topic, m.time_ns, m.msg) for m in ma] == [(m.topic, m.time_ns, m.msg) for m in mb]

    images = [m for m in ma if m.topic == DEFAULT_TOPICS["image"]]
    infos = {convert.stamp_key(m.msg.header.stamp): m.msg for m in ma if m.topic == DEFAULT_TOPICS["camera_info"]}
    truth = {convert.stamp_key(m.msg.header.stamp): m.msg for m in ma if m.topic == DEFAULT_TOPICS["ground_truth"]}
    bad = {i for i, f in a.faults.items()}
    for i, m in enumerate(images):
        if a.faults.get(i) == "corrupt":
            assert m.msg is None and m.error
            continue
        key = convert.stamp_key(m.msg.header.stamp)
        assert m.time_ns == convert.ns_from_time(m.msg.header.stamp), "bag time = capture stamp"
        assert m.msg.header.frame_id == "carm_source_optical"
        assert (key in infos) == (a.faults.get(i) != "no_camera_info")
        want = "yuv422" if a.faults.get(i) == "bad_encoding" else encoding_of(i)
        assert m.msg.encoding == want
        if i not in bad:
            arr = convert.image_to_numpy(m.msg)
            assert arr.shape == (infos[key].height, infos[key].width)
        gt = truth[key]
        assert gt.header.frame_id == "volume"
        p = gt.pose.position
        assert 0.5 < float(np.linalg.norm([p.x, p.y, p.z])) < 1.2, "ground truth not in metres"
    assert {m.msg.encoding for m in images if m.msg is not None} >= {"mono16", "16UC1"}
    assert {m.msg.height for m in images if m.msg is not None} == {32, 25}, "the zoom changes the intrinsics"
    with pytest.raises(BagError, match="exists"):
        simulate_bag(volume_file, a.path, frames=2, size=32)
