"""xvr_ros.ros.convert: units, poses, covariances, images and intrinsics between ROS and the core.

No ROS graph is needed: messages are built and read in-process. The TF consumer checks use only
numpy and the message fields (what a ROS user's code would do), not the module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from geometry_msgs.msg import Pose, Quaternion
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from test_render import phantom

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.register.uncertainty import world_axes_covariance
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.rotations import se3_exp
from xvr_ros.ros import convert

GOOD_DET = Detector(sdd=1000.0, height=48, width=64, delx=1.6, dely=1.2, x0=7.5, y0=-4.0)


def random_pose(seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor(
        [60.0, 30.0, 20.0], dtype=torch.float64
    )
    xyz = (
        torch.tensor([0.0, 800.0, 0.0], dtype=torch.float64)
        + (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 60
    )
    return carm_pose(angles[None], xyz[None], degrees=True)[0]


def quat_to_matrix(q) -> np.ndarray:
    """Plain ROS (x, y, z, w) quaternion -> matrix, independent of the code under test."""
    x, y, z, w = q.x, q.y, q.z, q.w
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def project_with_tf(tf, info: CameraInfo, points_m: np.ndarray) -> np.ndarray:
    """What a ROS consumer does: parent-frame points (m) -> child optical frame -> K -> pixels."""
    R = quat_to_matrix(tf.transform.rotation)
    t = np.array([tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z])
    cam = (points_m - t) @ R  # R^T (X - t), row vectors
    uvw = cam @ np.asarray(info.k).reshape(3, 3).T
    return uvw[:, :2] / uvw[:, 2:]


# --------------------------------------------------------------------------------------------
# units and poses
# --------------------------------------------------------------------------------------------
def test_length_units_round_trip():
    assert convert.mm_to_m(1234.5) == pytest.approx(1.2345)
    assert convert.m_to_mm(0.25) == pytest.approx(250.0)
    a = np.array([1.0, -2.0, 1e3])
    np.testing.assert_allclose(convert.m_to_mm(convert.mm_to_m(a)), a)
    t = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(convert.mm_to_m(t), t / 1000)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pose_messages_round_trip_in_metres(seed):
    T = random_pose(seed)
    msg = convert.pose_to_msg(T)
    assert isinstance(msg, Pose)
    np.testing.assert_allclose([msg.position.x, msg.position.y, msg.position.z], (T[:3, 3] / 1000).numpy(), atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(msg.orientation), T[:3, :3].numpy(), atol=1e-12)
    assert torch.allclose(convert.pose_from_msg(msg), T, atol=1e-9)
    tf = convert.transform_to_msg(T[None])  # (1, 4, 4) accepted too
    assert tf.translation.y == pytest.approx(float(T[1, 3]) / 1000)
    assert torch.allclose(convert.transform_from_msg(tf), T, atol=1e-9)
    # numpy input, float32
    assert torch.allclose(convert.pose_from_msg(convert.pose_to_msg(T.float().numpy())), T, atol=1e-3)


def test_covariance_scaling():
    cov_mm = np.zeros((6, 6))
    cov_mm[:3, :3] = np.diag([4.0e6, 1.0e6, 9.0e6])  # (2 m)^2, (1 m)^2, (3 m)^2 in mm^2
    cov_mm[3:, 3:] = np.diag([0.01, 0.02, 0.03])  # rad^2: untouched
    cov_mm[0, 3] = cov_mm[3, 0] = 500.0  # mm rad -> 0.5 m rad
    cov_m = convert.covariance_mm_to_m(cov_mm)
    np.testing.assert_allclose(np.diag(cov_m), [4.0, 1.0, 9.0, 0.01, 0.02, 0.03])
    assert cov_m[0, 3] == pytest.approx(0.5) and cov_m[3, 0] == pytest.approx(0.5)
    np.testing.assert_allclose(convert.covariance_m_to_mm(cov_m), cov_mm)
    T = random_pose(3)
    msg = convert.pose_with_covariance_to_msg(T, cov_mm)
    assert msg.pose.position.z == pytest.approx(float(T[2, 3]) / 1000)
    assert np.asarray(msg.covariance).reshape(6, 6)[1, 1] == pytest.approx(1.0)
    T2, cov2 = convert.pose_with_covariance_from_msg(msg)
    assert torch.allclose(T2, T, atol=1e-9)
    np.testing.assert_allclose(cov2, cov_mm)
    with pytest.raises(ValueError, match="36"):
        convert.covariance_mm_to_m(np.eye(3))


def test_refined_pose_covariance_in_ros_units_order_and_frame():
    """The refiner's chain: a covariance of the C-arm pose's right perturbation (core: mm, rad,
    C-arm axes) -> ``world_axes_covariance`` -> ``pose_with_covariance_to_msg`` of the *optical*
    frame's pose. Checked against what a ROS consumer means: the covariance of (dp m, dtheta rad)
    with p_true = p + dp, R_true = exp(dtheta) R along the volume's axes, propagated here by finite
    differences of the optical frame's pose itself (first order, independent of the code's maps)."""
    T = random_pose(5)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0, 3.0, 0.01, 0.02, 0.005])[:, None]
    C = A @ A.T  # mm^2, mm rad, rad^2; a full matrix, so the order of rows and columns matters
    msg = convert.pose_with_covariance_to_msg(convert.optical_from_carm(T, GOOD_DET), world_axes_covariance(T, C))

    def optical_error(xi: torch.Tensor) -> np.ndarray:
        """(dp m, dtheta rad) of the optical frame for the true pose T exp(xi), along the volume's axes."""
        F0 = convert.optical_from_carm(T, GOOD_DET).numpy()
        F = convert.optical_from_carm(T @ se3_exp(xi[None])[0], GOOD_DET).numpy()
        dR = F[:3, :3] @ F0[:3, :3].T
        dtheta = 0.5 * np.array([dR[2, 1] - dR[1, 2], dR[0, 2] - dR[2, 0], dR[1, 0] - dR[0, 1]])
        return np.concatenate([(F[:3, 3] - F0[:3, 3]) / 1000.0, dtheta])

    eps = 1e-5
    J = np.stack([(optical_error(eps * e) - optical_error(-eps * e)) / (2 * eps)
                  for e in torch.eye(6, dtype=torch.float64)], axis=1)
    expected = J @ C.numpy() @ J.T
    got = np.asarray(msg.covariance).reshape(6, 6)  # row-major
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-15)
    # Units: a translation variance of mm^2 is 1e-6 m^2; the rotation block is radians, untouched.
    assert np.trace(got[:3, :3]) == pytest.approx(float(C[:3, :3].trace()) * 1e-6)
    assert np.trace(got[3:, 3:]) == pytest.approx(float(C[3:, 3:].trace()))


def test_bad_poses_are_refused():
    T = random_pose(0)
    mirrored = T.clone()
    mirrored[:3, 0] *= -1
    with pytest.raises(ValueError, match="rigid"):
        convert.pose_to_msg(mirrored)
    bad = T.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        convert.pose_to_msg(bad)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        convert.pose_to_msg(torch.eye(3))
    with pytest.raises(ValueError, match="unit quaternion"):
        convert.pose_from_msg(Pose(orientation=Quaternion(x=0.0, y=0.0, z=0.0, w=0.0)))
    with pytest.raises(ValueError, match="frames"):
        convert.transform_stamped(T, "", "child")


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
SINGLE = [
    ("mono8", np.uint8),
    ("8UC1", np.uint8),
    ("mono16", np.uint16),
    ("16UC1", np.uint16),
    ("16SC1", np.int16),
    ("32SC1", np.int32),
    ("32FC1", np.float32),
    ("64FC1", np.float64),
]


@pytest.mark.parametrize("encoding,dtype", SINGLE)
@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("padding", [0, 3])
def test_image_round_trip(encoding, dtype, bigendian, padding):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        arr = rng.normal(size=(5, 7)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=(5, 7), endpoint=True).astype(dtype)
    msg = convert.numpy_to_image(arr, encoding, bigendian=bigendian, row_padding=padding)
    assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (5, 7, encoding, int(bigendian))
    assert msg.step == 7 * arr.itemsize + padding and len(msg.data) == msg.step * 5
    out = convert.image_to_numpy(msg)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_big_endian_bytes_on_the_wire():
    msg = convert.numpy_to_image(np.array([[0x0102, 0xA0B0]], dtype=np.uint16), "mono16", bigendian=True)
    assert bytes(msg.data) == bytes([0x01, 0x02, 0xA0, 0xB0])
    # A hand-made little-endian message with 2 bytes of row padding.
    img = Image(
        height=2,
        width=2,
        encoding="16UC1",
        is_bigendian=0,
        step=6,
        data=bytes([1, 0, 2, 0, 99, 99, 3, 0, 0, 1, 99, 99]),
    )
    np.testing.assert_array_equal(convert.image_to_numpy(img), [[1, 2], [3, 256]])


def test_colour_images_become_grey():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    out = convert.image_to_numpy(convert.numpy_to_image(rgb, "rgb8", row_padding=2))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, grey)
    colour = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    luma = colour.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    np.testing.assert_allclose(convert.image_to_numpy(convert.numpy_to_image(colour, "rgb8")), luma, rtol=1e-6)
    np.testing.assert_allclose(
        convert.image_to_numpy(convert.numpy_to_image(colour[..., ::-1].copy(), "bgr8")), luma, rtol=1e-6
    )


def test_image_errors_are_clear():
    good = convert.numpy_to_image(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="unsupported image encoding 'yuv422'"):
        convert.image_to_numpy(Image(height=4, width=4, encoding="yuv422", step=8, data=bytes(32)))
    with pytest.raises(ValueError, match="need 32"):
        convert.image_to_numpy(Image(height=4, width=4, encoding="mono16", step=8, data=bytes(30)))
    with pytest.raises(ValueError, match="shorter than a row"):
        convert.image_to_numpy(Image(height=4, width=4, encoding="mono16", step=4, data=bytes(16)))
    with pytest.raises(ValueError, match="empty"):
        convert.image_to_numpy(Image(height=0, width=4, encoding="mono16", step=8, data=b""))
    with pytest.raises(ValueError, match="needs u2"):
        convert.numpy_to_image(np.zeros((4, 4), np.float32), "mono16")
    assert convert.image_to_numpy(good).shape == (4, 4)


# --------------------------------------------------------------------------------------------
# intrinsics and the optical frame
# --------------------------------------------------------------------------------------------
def test_camera_info_detector_round_trip():
    info = convert.camera_info_from_detector(GOOD_DET, Header(frame_id="carm_source_optical"))
    K = np.asarray(info.k).reshape(3, 3)
    K_core = GOOD_DET.intrinsic_matrix().numpy()
    assert K[0, 0] == pytest.approx(1000.0 / 1.6) and K[1, 1] == pytest.approx(1000.0 / 1.2)
    assert K[0, 2] == pytest.approx(K_core[0, 2] - 0.5) and K[1, 2] == pytest.approx(K_core[1, 2] - 0.5)
    assert (info.height, info.width, info.header.frame_id) == (48, 64, "carm_source_optical")
    np.testing.assert_allclose(np.asarray(info.p).reshape(3, 4)[:, :3], K)
    det = convert.detector_from_camera_info(info, 1000.0)
    for name in ("sdd", "height", "width", "delx", "dely", "x0", "y0"):
        assert getattr(det, name) == pytest.approx(getattr(GOOD_DET, name)), name
    assert det.reverse_x_axis and det.orientation == "AP"
    # A different SDD keeps the rays (same K): only the spacing scales.
    det2 = convert.detector_from_camera_info(info, 500.0)
    assert det2.delx == pytest.approx(0.8) and torch.allclose(det2.intrinsic_matrix(), det.intrinsic_matrix())
    # Empty distortion is fine too.
    info.d = []
    assert convert.detector_from_camera_info(info, 1000.0).x0 == pytest.approx(7.5)


def test_camera_info_errors():
    info = convert.camera_info_from_detector(GOOD_DET)
    info.d = [0.1, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="distortion"):
        convert.detector_from_camera_info(info, 1000.0)
    info = convert.camera_info_from_detector(GOOD_DET)
    k = list(info.k)
    k[1] = 2.0
    info.k = k
    with pytest.raises(ValueError, match="skew"):
        convert.detector_from_camera_info(info, 1000.0)
    info = convert.camera_info_from_detector(GOOD_DET)
    info.binning_x = 2
    with pytest.raises(ValueError, match="binning"):
        convert.detector_from_camera_info(info, 1000.0)
    with pytest.raises(ValueError, match="sdd_mm"):
        convert.detector_from_camera_info(convert.camera_info_from_detector(GOOD_DET), float("nan"))
    with pytest.raises(ValueError, match="reverse_x_axis"):
        convert.camera_info_from_detector(Detector(1000.0, 8, 8, 1.0, 1.0, reverse_x_axis=False))


def test_optical_frame_round_trip_and_is_rigid():
    T = random_pose(4)
    F = convert.optical_from_carm(T, GOOD_DET)
    R = F[:3, :3]
    assert torch.allclose(R.T @ R, torch.eye(3, dtype=torch.float64), atol=1e-12) and torch.det(R) > 0
    assert torch.allclose(F[:3, 3], T[:3, 3])  # same origin: the X-ray source
    assert torch.allclose(convert.carm_from_optical(F, GOOD_DET), T, atol=1e-12)
    # z (forward) points from the source towards the detector centre, i.e. towards the isocenter.
    iso_dir = -T[:3, 3] / T[:3, 3].norm()
    assert float(R[:, 2] @ iso_dir) > 0.95


@pytest.mark.parametrize("seed", [0, 5])
def test_tf_and_camera_info_project_like_the_core(seed):
    """A TF consumer: CT points (metres, volume frame) through the published transform and the
    CameraInfo's K land where Detector.project puts them (minus the half-pixel convention)."""
    T = random_pose(seed)
    stamp = Header().stamp
    tf = convert.transform_stamped(convert.optical_from_carm(T, GOOD_DET), "volume", "carm_source_optical", stamp)
    assert (tf.header.frame_id, tf.child_frame_id) == ("volume", "carm_source_optical")
    info = convert.camera_info_from_detector(GOOD_DET, Header(frame_id="carm_source_optical"))
    X = (torch.rand(50, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5) * 120
    uv_ros = project_with_tf(tf, info, X.numpy() / 1000.0)
    uv_core = GOOD_DET.project(T[None], X)[0].numpy()
    np.testing.assert_allclose(uv_ros, uv_core - 0.5, atol=1e-6)


def test_tf_and_camera_info_project_where_the_renderer_draws():
    """A small dense blob off the isocenter: the DRR's intensity centroid (ROS pixel coordinates,
    centres at integers) sits where the TF + K consumer projects the blob's centre."""
    centre = torch.tensor([-6.0, 5.0, -4.0], dtype=torch.float64)

    def blob(x, y, z):
        return torch.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * 2.0**2))

    vol = phantom(shape=(48, 48, 48), spacing=(1.0, 1.0, 1.0), fn=blob)
    det = Detector(sdd=1000.0, height=40, width=56, delx=0.9, dely=0.7, x0=3.0, y0=-2.0)
    T = carm_pose(
        torch.tensor([[12.0, -7.0, 4.0]], dtype=torch.float64),
        torch.tensor([[3.0, 600.0, -5.0]], dtype=torch.float64),
        degrees=True,
    )[0]
    with torch.no_grad():
        drr = Renderer(vol, method="siddon")(T[None], det)[0, 0].double().numpy()
    # Through an Image message, as a consumer would receive it.
    drr = convert.image_to_numpy(convert.numpy_to_image(drr, "64FC1"))
    w = np.where(drr > 0.05 * drr.max(), drr, 0.0)
    rows, cols = np.indices(w.shape)
    centroid = np.array([(cols * w).sum(), (rows * w).sum()]) / w.sum()
    tf = convert.transform_stamped(convert.optical_from_carm(T, det), "volume", "carm_source_optical")
    info = convert.camera_info_from_detector(det)
    uv = project_with_tf(tf, info, centre.numpy()[None] / 1000.0)[0]
    assert 8 < uv[0] < det.width - 8 and 8 < uv[1] < det.height - 8  # well inside the image
    assert abs(uv[0] - (det.width - 1) / 2) > 5 and abs(uv[1] - (det.height - 1) / 2) > 3  # off-centre
    assert np.abs(uv - centroid).max() < 0.15, (uv, centroid)  # a half-pixel slip would show


# --------------------------------------------------------------------------------------------
# Image + CameraInfo -> Xray
# --------------------------------------------------------------------------------------------
def test_xray_from_messages_log_intensity():
    rng = np.random.default_rng(2)
    L = rng.uniform(0.0, 3.0, size=(48, 64))
    L[0, 0] = 0.0  # an unattenuated pixel: I0 is the image's maximum
    intensity = np.round(60000 * np.exp(-L)).astype(np.uint16)
    image = convert.numpy_to_image(intensity, "mono16", bigendian=True, row_padding=4)
    info = convert.camera_info_from_detector(GOOD_DET)
    xray = convert.xray_from_messages(image, info, sdd_mm=1000.0, intensity="log", i0=60000.0)
    assert xray.image.shape == (1, 1, 48, 64)
    np.testing.assert_allclose(xray.image[0, 0].numpy(), L, atol=2e-3)
    assert xray.detector.x0 == pytest.approx(7.5) and xray.detector.reverse_x_axis
    lin = convert.xray_from_messages(
        convert.numpy_to_image(L.astype(np.float32)), info, sdd_mm=1000.0, intensity="linear"
    )
    np.testing.assert_allclose(lin.image[0, 0].numpy(), L, rtol=1e-6)


def test_xray_from_messages_errors():
    info = convert.camera_info_from_detector(GOOD_DET)
    with pytest.raises(ValueError, match="CameraInfo says 48x64"):
        convert.xray_from_messages(convert.numpy_to_image(np.ones((40, 64), np.uint16)), info, sdd_mm=1000.0)
    nan = np.ones((48, 64), np.float32)
    nan[3, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        convert.xray_from_messages(convert.numpy_to_image(nan), info, sdd_mm=1000.0, intensity="linear")
