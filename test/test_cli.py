import nibabel as nib
import numpy as np
from PIL import Image

from xvr_ros.cli import main


def write_phantom(path):
    hu = np.full((32, 32, 24), -1000, dtype=np.int16)
    hu[8:24, 10:22, 6:18] = 0  # a block of water
    hu[14:18, 14:18, 8:16] = 1200  # with a bone rod inside
    # and bone beads off every axis, so that all six pose parameters show in a projection
    for i, j, k in ((10, 12, 7), (21, 19, 9), (12, 20, 16), (20, 11, 15)):
        hu[i - 1 : i + 1, j - 1 : j + 1, k - 1 : k + 1] = 1500
    nib.save(nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.5, 1.0])), path)


def test_render_writes_png(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    write_phantom(ct)
    out = tmp_path / "drr.png"
    args = [
        "render",
        "--volume",
        str(ct),
        "--pose",
        "0",
        "0",
        "0",
        "0",
        "600",
        "0",
        "--height",
        "48",
        "--delx",
        "2.0",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (48, 48) and img.dtype == np.uint8
    # The bone rod is the brightest structure and it projects near the image centre.
    r, c = np.unravel_index(np.argmax(img), img.shape)
    assert abs(r - 24) < 8 and abs(c - 24) < 8
    assert img[0, 0] == 0  # air around the phantom
    assert "wrote" in capsys.readouterr().out


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    args = [
        "render",
        "--volume",
        str(tmp_path / "missing.nii.gz"),
        "--pose",
        "0",
        "0",
        "0",
        "0",
        "600",
        "0",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "missing.nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_train_then_summary(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    write_phantom(ct)
    out = tmp_path / "model.pth"
    args = [
        "train",
        "--volume",
        str(ct),
        "--preset",
        "chest",
        "--range",
        "y",
        "600",
        "700",
        "--max-steps",
        "2",
        "--height",
        "32",
        "--delx",
        "8",
        "--batch-size",
        "2",
        "--no-ncc",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "mTRE median" in printed.out and "steps" in printed.out
    assert "step 2" in printed.err  # the progress bar
    from xvr_ros.core.model.checkpoint import load_checkpoint

    meta = load_checkpoint(out).metadata
    assert meta["ranges"]["y"] == [600.0, 700.0] and meta["preset"] == "chest"


def test_train_must_be_bounded(tmp_path, capsys):
    assert main(["train", "--volume", "ct.nii", "--out", str(tmp_path / "m.pth")]) == 2
    assert "--time-budget" in capsys.readouterr().err


def test_register_plain_image(tmp_path, capsys):
    import json

    import torch

    from xvr_ros.core.geometry import Detector, carm_pose
    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.metrics import mtre
    from xvr_ros.core.render.renderer import Renderer

    ct = tmp_path / "ct.nii.gz"
    write_phantom(ct)
    det = Detector(sdd=1000.0, height=64, width=64, delx=1.6, dely=1.6)
    truth = carm_pose(torch.tensor([[4.0, -3.0, 2.0]]), torch.tensor([[2.0, 600.0, -1.0]]), degrees=True)
    with torch.no_grad():
        img = Renderer(load_volume(ct), method="siddon")(truth, det)[0, 0]
    xray = tmp_path / "shot.npy"
    np.save(xray, img.numpy())
    args = [
        "register",
        "--volume",
        str(ct),
        "--xray",
        str(xray),
        "--sdd",
        "1000",
        "--pixel-spacing",
        "1.6",
        "--intensity",
        "linear",
        "--init",
        "6",
        "-1",
        "0",
        "0",
        "590",
        "3",
        "--out-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "refined pose" in out and "similarity" in out
    record = json.loads((tmp_path / "shot_registration.json").read_text())
    # Target error on points spread through the phantom (its 8 corners), before and after.
    corners = torch.tensor(
        [[x, y, z] for x in (-30.0, 30.0) for y in (-30.0, 30.0) for z in (-28.0, 28.0)], dtype=torch.float64
    )
    before = mtre(truth.double(), torch.tensor([record["initial_pose_mm"]], dtype=torch.float64), corners)
    after = mtre(truth.double(), torch.tensor([record["pose_mm"]], dtype=torch.float64), corners)
    assert after < 0.5 * before, (before, after)
    overlay = np.asarray(Image.open(tmp_path / "shot_overlay.png"))
    assert overlay.shape == (64, 64, 3) and (overlay[..., 1] == 255).any()


def test_register_collimated_counts_with_principal_point(tmp_path, capsys):
    """Detector counts with two collimator blades (dark, noisy, rotated) and an off-centre principal
    point: the record keeps pose_mm, seconds and the detected field of view (fraction + RLE), and
    the overlay draws the field's boundary."""
    import json

    import torch

    from xvr_ros.core.geometry import Detector, carm_pose
    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.metrics import mtre
    from xvr_ros.core.render.renderer import Renderer
    from xvr_ros.core.sim.appearance import AppearanceModel

    ct = tmp_path / "ct.nii.gz"
    write_phantom(ct)
    det = Detector(sdd=1000.0, height=96, width=96, delx=1.2, dely=1.2, x0=6.0, y0=-4.0)
    truth = carm_pose(torch.tensor([[4.0, -3.0, 2.0]]), torch.tensor([[2.0, 600.0, -1.0]]), degrees=True)
    with torch.no_grad():
        lines = Renderer(load_volume(ct), method="siddon")(truth, det)[0, 0].double().numpy()
    model = AppearanceModel(field="blades", saturation=None, text=False, photons=1e5, leakage=0.03)
    out = model.apply(np.exp(-2.5 * lines / lines.max()), det, np.random.default_rng(2))
    assert 0.05 < 1 - out.fov.mean() < 0.5
    np.save(tmp_path / "shot.npy", out.counts)
    args = ["register", "--volume", str(ct), "--xray", str(tmp_path / "shot.npy"), "--sdd", "1000",
            "--pixel-spacing", "1.2", "--principal-point", "6", "-4", "--init", "6", "-1", "0", "0", "590", "3",
            "--out-dir", str(tmp_path)]
    assert main(args) == 0
    record = json.loads((tmp_path / "shot_registration.json").read_text())
    assert record["detector"]["x0"] == 6.0 and record["detector"]["y0"] == -4.0 and record["seconds"] > 0
    fov = record["field_of_view"]
    assert fov["detected"] and fov["shape"] == [96, 96] and sum(fov["rle"]) == 96 * 96
    values = np.concatenate([np.full(n, i % 2 == 1) for i, n in enumerate(fov["rle"])]).reshape(96, 96)
    assert abs(values.mean() - fov["fraction"]) < 1e-9
    assert (values & out.fov).sum() / (values | out.fov).sum() > 0.95
    corners = torch.tensor(
        [[x, y, z] for x in (-30.0, 30.0) for y in (-30.0, 30.0) for z in (-28.0, 28.0)], dtype=torch.float64
    )
    before = mtre(truth.double(), torch.tensor([record["initial_pose_mm"]], dtype=torch.float64), corners)
    after = mtre(truth.double(), torch.tensor([record["pose_mm"]], dtype=torch.float64), corners)
    assert after < 0.5 * before, (before, after)
    overlay = np.asarray(Image.open(tmp_path / "shot_overlay.png"))
    assert ((overlay == (255, 128, 0)).all(-1)).any() and (overlay[..., 1] == 255).any()
    # --no-detect-fov: nothing detected, every pixel scored
    assert main([*args, "--no-detect-fov"]) == 0
    record = json.loads((tmp_path / "shot_registration.json").read_text())
    assert not record["field_of_view"]["detected"] and record["field_of_view"]["fraction"] == 1.0
    # a DICOM's principal point comes from the file
    capsys.readouterr()


def test_register_plain_image_needs_intrinsics(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((8, 8)))
    assert (
        main(
            [
                "register",
                "--volume",
                "ct.nii",
                "--xray",
                str(tmp_path / "x.npy"),
                "--init",
                "0",
                "0",
                "0",
                "0",
                "600",
                "0",
            ]
        )
        == 2
    )
    assert "--sdd" in capsys.readouterr().err


def test_simulate_bag_then_replay_errors(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    write_phantom(ct)
    bag = tmp_path / "session"
    args = [
        "simulate-bag",
        "--volume",
        str(ct),
        "--out",
        str(bag),
        "--frames",
        "3",
        "--size",
        "64",
        "--storage",
        "sqlite3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {bag} (sqlite3): 3 frames" in out and "ros2 bag play" in out
    assert (bag / "metadata.yaml").is_file()
    assert main(args) == 2  # never overwrites silently
    err = capsys.readouterr().err
    assert "exists" in err and "Traceback" not in err
    # Replay of something that is no bag, and of a bag whose topics are not the nodes': one line each.
    assert main(["replay", str(tmp_path / "nothing")]) == 2
    assert "no bag at" in capsys.readouterr().err
    assert main(["replay", str(bag), "--image-topic", "/camera/image_raw"]) == 2
    err = capsys.readouterr().err
    assert "/camera/image_raw (sensor_msgs/msg/Image)" in err and "/xray/image (sensor_msgs/msg/Image, 3)" in err


# --------------------------------------------------------------------------------------------
# bringup: the nodes in one process, from any directory
# --------------------------------------------------------------------------------------------
def test_bringup_bad_config_is_one_clear_error(tmp_path, capsys):
    assert main(["bringup", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the parameters file" in capsys.readouterr().err
    assert main(["bringup", "--only", "planner"]) == 2
    assert "unknown node(s) ['planner']" in capsys.readouterr().err


def test_bringup_from_another_directory(tmp_path, ros_domain):
    """The installed ``xvr-ros bringup`` from a directory that is not the repository, ROS args forwarded."""
    import os
    import shutil
    import signal
    import subprocess

    import yaml
    from conftest import start, stop, wait_for

    from xvr_ros.ros.bringup import default_config_path

    config = yaml.safe_load(default_config_path().read_text())
    config["/**/model_manager"]["ros__parameters"]["models_dir"] = str(tmp_path / "models")
    (tmp_path / "intraop.yaml").write_text(yaml.safe_dump(config))
    work = tmp_path / "elsewhere"
    work.mkdir()
    log = tmp_path / "bringup.log"
    args = ["bringup", "--config", "../intraop.yaml", "--only", "model_manager", "--ros-args", "--log-level", "debug"]
    proc = start([shutil.which("xvr-ros"), *args], None, log, cwd=work)
    try:
        wait_for(lambda: proc.poll() is not None or "bringup: running /model_manager" in log.read_text(), 120,
                 what="xvr-ros bringup to come up")
        assert proc.poll() is None, f"xvr-ros bringup exited ({proc.returncode}):\n{log.read_text()}"
        assert "[DEBUG]" in log.read_text()  # --ros-args reached rclpy
        assert (tmp_path / "models").is_dir()  # the relative --config was read from the working directory
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"no clean exit on SIGINT ({code}):\n{log.read_text()}"
    finally:
        stop(proc)
