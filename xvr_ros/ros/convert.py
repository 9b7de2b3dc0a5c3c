"""THE one place for units and ROS message conversion (REP 103: metres on every interface).

The core (``xvr_ros.core``) works in millimetres and radians with ``(4, 4)`` camera-to-world
poses of the *C-arm frame*; ROS interfaces carry metres and the C-arm source's *optical frame*
(x right, y down, z forward: the frame a ``sensor_msgs/CameraInfo`` describes). Every crossing
between the two goes through a function of this module:

- lengths: :func:`mm_to_m` / :func:`m_to_mm` (the only unit conversion; everything below uses it);
- poses: :func:`pose_to_msg` / :func:`pose_from_msg` (``geometry_msgs/Pose``),
  :func:`transform_to_msg` / :func:`transform_from_msg` (``Transform``),
  :func:`pose_with_covariance_to_msg` / :func:`pose_with_covariance_from_msg`
  (``PoseWithCovariance``; covariances with :func:`covariance_mm_to_m` / :func:`covariance_m_to_mm`),
  :func:`transform_stamped` (a TF ``TransformStamped``);
- C-arm frame <-> optical frame: :func:`optical_from_carm` / :func:`carm_from_optical`;
- images: :func:`image_to_numpy` / :func:`numpy_to_image` (``sensor_msgs/Image``);
- intrinsics: :func:`detector_from_camera_info` / :func:`camera_info_from_detector`;
- both at once: :func:`xray_from_messages` (``Image`` + ``CameraInfo`` -> core ``Xray``);
- stamps: :func:`stamp_key`, :func:`stamp_to_str`.

Poses come back as ``torch.float64`` ``(4, 4)`` tensors in mm (the core's type); they are accepted
as tensors or arrays, ``(4, 4)`` or ``(1, 4, 4)``. Invalid input raises ``ValueError`` with a
message that says what is wrong; nothing here logs or touches a node.

Pixel conventions: ROS/OpenCV ``K`` puts pixel centres at integer coordinates, the core's
:meth:`~xvr_ros.core.geometry.Detector.intrinsic_matrix` at ``+0.5``; so
``cx_ros = K_core[0, 2] - 0.5`` and ``cy_ros = K_core[1, 2] - 0.5``. A ``K`` fixes only
``sdd / pixel spacing``: the source-to-detector distance (mm) is therefore an argument of
:func:`detector_from_camera_info` (a node parameter), and the spacing follows from it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from builtin_interfaces.msg import Time
from geometry_msgs.msg import (
    Point,
    Pose,
    PoseWithCovariance,
    Quaternion,
    Transform,
    TransformStamped,
    Vector3,
)
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from std_msgs.msg import Header

from xvr_ros.core.geometry import Detector, invert
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.io.xray_image import read_xray_image
from xvr_ros.core.rotations import matrix_to_quaternion, quaternion_to_matrix

__all__ = [
    "MM_PER_M",
    "ENCODINGS",
    "mm_to_m",
    "m_to_mm",
    "covariance_mm_to_m",
    "covariance_m_to_mm",
    "pose_to_msg",
    "pose_from_msg",
    "transform_to_msg",
    "transform_from_msg",
    "pose_with_covariance_to_msg",
    "pose_with_covariance_from_msg",
    "transform_stamped",
    "optical_from_carm",
    "carm_from_optical",
    "image_to_numpy",
    "numpy_to_image",
    "detector_from_camera_info",
    "camera_info_from_detector",
    "xray_from_messages",
    "stamp_key",
    "stamp_to_str",
]

MM_PER_M = 1000.0


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------
def mm_to_m(value):
    """Millimetres -> metres (floats, numpy arrays and torch tensors alike)."""
    return value / MM_PER_M


def m_to_mm(value):
    """Metres -> millimetres (floats, numpy arrays and torch tensors alike)."""
    return value * MM_PER_M


def _covariance_scale(cov, length_factor) -> np.ndarray:
    c = np.asarray(cov, dtype=np.float64)
    if c.size != 36:
        raise ValueError(f"a pose covariance has 36 entries (6x6), got {c.size}")
    c = c.reshape(6, 6)
    if not np.isfinite(c).all():
        raise ValueError("the covariance contains NaN or infinite values")
    # Order (x, y, z, rx, ry, rz): lengths for the first three, radians (untouched) for the rest.
    s = np.array([length_factor(1.0)] * 3 + [1.0] * 3)
    return c * s[:, None] * s[None, :]


def covariance_mm_to_m(cov) -> np.ndarray:
    """6x6 pose covariance (x, y, z mm; rotation rad) -> (m; rad): translation block x1e-6,
    translation-rotation cross terms x1e-3, rotation block unchanged."""
    return _covariance_scale(cov, mm_to_m)


def covariance_m_to_mm(cov) -> np.ndarray:
    """Inverse of :func:`covariance_mm_to_m`."""
    return _covariance_scale(cov, m_to_mm)


# --------------------------------------------------------------------------------------------
# Poses
# --------------------------------------------------------------------------------------------
def _as_pose(T) -> torch.Tensor:
    """(4, 4) or (1, 4, 4) tensor/array -> finite rigid (4, 4) float64 tensor, else ValueError."""
    t = torch.as_tensor(np.asarray(T.detach().cpu() if isinstance(T, torch.Tensor) else T, dtype=np.float64))
    if t.shape == (1, 4, 4):
        t = t[0]
    if t.shape != (4, 4):
        raise ValueError(f"a pose must be a (4, 4) matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("the pose contains NaN or infinite values")
    R = t[:3, :3]
    if float((R.T @ R - torch.eye(3, dtype=torch.float64)).abs().max()) > 1e-4 or float(torch.linalg.det(R)) <= 0:
        raise ValueError("the pose is not a rigid transform (its rotation is not orthonormal with det +1)")
    if float((t[3] - torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)).abs().max()) > 1e-9:
        raise ValueError(f"the pose's last row must be (0, 0, 0, 1), got {t[3].tolist()}")
    return t


def _quaternion_msg(R: torch.Tensor) -> Quaternion:
    w, x, y, z = (float(v) for v in matrix_to_quaternion(R))
    return Quaternion(x=x, y=y, z=z, w=w)


def _rotation_from_msg(q: Quaternion) -> torch.Tensor:
    wxyz = torch.tensor([q.w, q.x, q.y, q.z], dtype=torch.float64)
    if not bool(torch.isfinite(wxyz).all()):
        raise ValueError("the orientation quaternion contains NaN or infinite values")
    norm = float(wxyz.norm())
    if abs(norm - 1.0) > 1e-3:  # ROS expects unit quaternions; a zero one has no rotation
        raise ValueError(f"the orientation quaternion is not a unit quaternion (norm {norm:.6g})")
    return quaternion_to_matrix(wxyz)


def _matrix(R: torch.Tensor, t_m) -> torch.Tensor:
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = R
    T[:3, 3] = m_to_mm(torch.tensor([float(v) for v in t_m], dtype=torch.float64))
    if not bool(torch.isfinite(T).all()):
        raise ValueError("the position contains NaN or infinite values")
    return T


def pose_to_msg(T_mm) -> Pose:
    """(4, 4) pose in mm -> ``geometry_msgs/Pose`` in metres."""
    T = _as_pose(T_mm)
    p = mm_to_m(T[:3, 3])
    return Pose(position=Point(x=float(p[0]), y=float(p[1]), z=float(p[2])), orientation=_quaternion_msg(T[:3, :3]))


def pose_from_msg(msg: Pose) -> torch.Tensor:
    """``geometry_msgs/Pose`` in metres -> (4, 4) float64 pose in mm."""
    p = msg.position
    return _matrix(_rotation_from_msg(msg.orientation), (p.x, p.y, p.z))


def transform_to_msg(T_mm) -> Transform:
    """(4, 4) transform in mm -> ``geometry_msgs/Transform`` in metres."""
    T = _as_pose(T_mm)
    p = mm_to_m(T[:3, 3])
    translation = Vector3(x=float(p[0]), y=float(p[1]), z=float(p[2]))
    return Transform(translation=translation, rotation=_quaternion_msg(T[:3, :3]))


def transform_from_msg(msg: Transform) -> torch.Tensor:
    """``geometry_msgs/Transform`` in metres -> (4, 4) float64 transform in mm."""
    p = msg.translation
    return _matrix(_rotation_from_msg(msg.rotation), (p.x, p.y, p.z))


def pose_with_covariance_to_msg(T_mm, covariance_mm=None) -> PoseWithCovariance:
    """Pose (mm) and optional 6x6 covariance (x, y, z mm^2; rotation rad^2) -> metres.

    The covariance is ROS's: of the error (dp, dtheta) with ``p_true = p + dp`` and
    ``R_true = exp(dtheta) R``, both along the parent (volume) frame's fixed axes, ordered
    (x, y, z, rotation about x, y, z), row-major in the message. Such a covariance does not
    depend on the child frame's axes, only on its origin: the C-arm frame and the source's
    optical frame share theirs. ``None`` gives all zeros (unknown).
    """
    msg = PoseWithCovariance(pose=pose_to_msg(T_mm))
    if covariance_mm is not None:
        msg.covariance = covariance_mm_to_m(covariance_mm).reshape(36).tolist()
    return msg


def pose_with_covariance_from_msg(msg: PoseWithCovariance) -> tuple[torch.Tensor, np.ndarray]:
    """``PoseWithCovariance`` (metres) -> ((4, 4) pose mm, 6x6 covariance in mm^2 / rad^2)."""
    return pose_from_msg(msg.pose), covariance_m_to_mm(np.asarray(msg.covariance, dtype=np.float64))


def transform_stamped(T_mm, parent_frame: str, child_frame: str, stamp: Time | None = None) -> TransformStamped:
    """A TF transform: the pose of ``child_frame`` in ``parent_frame`` (``T_mm`` maps child
    coordinates to parent coordinates, mm) -> ``TransformStamped`` in metres."""
    if not parent_frame or not child_frame:
        raise ValueError(f"TF frames must be non-empty, got parent {parent_frame!r}, child {child_frame!r}")
    if parent_frame == child_frame:
        raise ValueError(f"TF parent and child frames are the same ({parent_frame!r})")
    return TransformStamped(
        header=Header(stamp=stamp if stamp is not None else Time(), frame_id=parent_frame),
        child_frame_id=child_frame,
        transform=transform_to_msg(T_mm),
    )


def _check_optical(detector: Detector) -> None:
    if not detector.reverse_x_axis:
        raise ValueError(
            "the detector has reverse_x_axis=False: its image frame is mirrored and is no optical "
            "frame; use the detector of the ROS image (detector_from_camera_info)"
        )


def optical_from_carm(T_mm, detector: Detector) -> torch.Tensor:
    """Core C-arm pose (mm) -> the source's optical frame (camera-to-world, mm) that a
    ``CameraInfo`` for ``detector`` describes; ``detector.reverse_x_axis`` must be True."""
    _check_optical(detector)
    return detector.image_frame(_as_pose(T_mm))


def carm_from_optical(F_mm, detector: Detector) -> torch.Tensor:
    """Inverse of :func:`optical_from_carm`: optical frame (mm) -> the core's C-arm pose (mm)."""
    _check_optical(detector)
    M = detector.image_frame(torch.eye(4, dtype=torch.float64))  # C-arm frame -> optical frame
    return _as_pose(F_mm) @ invert(M)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
#: Supported ``sensor_msgs/Image`` encodings: numpy dtype (little-endian spelling) and channels.
ENCODINGS: dict[str, tuple[str, int]] = {
    "mono8": ("u1", 1),
    "8UC1": ("u1", 1),
    "mono16": ("<u2", 1),
    "16UC1": ("<u2", 1),
    "16SC1": ("<i2", 1),
    "32SC1": ("<i4", 1),
    "32FC1": ("<f4", 1),
    "64FC1": ("<f8", 1),
    "rgb8": ("u1", 3),
    "bgr8": ("u1", 3),
    "rgba8": ("u1", 4),
    "bgra8": ("u1", 4),
}
_COLOUR_ORDER = {"rgb8": (0, 1, 2), "bgr8": (2, 1, 0), "rgba8": (0, 1, 2), "bgra8": (2, 1, 0)}
_DEFAULT_ENCODING = {"u1": "mono8", "u2": "mono16", "i2": "16SC1", "i4": "32SC1", "f4": "32FC1", "f8": "64FC1"}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, for colour images that are not grey


def _encoding_dtype(encoding: str, bigendian: bool) -> tuple[np.dtype, int]:
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    code, channels = ENCODINGS[encoding]
    dtype = np.dtype(code)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if bigendian else "<")
    return dtype, channels


def image_to_numpy(msg: Image) -> np.ndarray:
    """``sensor_msgs/Image`` -> 2D greyscale array ``(height, width)`` in native byte order.

    Single-channel encodings keep their type (uint8, uint16, int16, int32, float32, float64).
    Colour encodings (rgb8, bgr8, rgba8, bgra8; alpha ignored) become one channel: the common
    value when all colour channels are equal (uint8, exact), else BT.601 luma (float32).
    Row padding (``step`` larger than a row) and big-endian data are handled.

    Raises:
        ValueError: unsupported encoding, empty image, a ``step`` shorter than a row, or a data
            length other than ``step * height``.

    """
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    dtype, channels = _encoding_dtype(msg.encoding, bool(msg.is_bigendian))
    if height <= 0 or width <= 0:
        raise ValueError(f"empty image ({height}x{width})")
    row = width * channels * dtype.itemsize
    if step < row:
        raise ValueError(f"step {step} is shorter than a row of {width} {msg.encoding} pixels ({row} bytes)")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size != step * height:
        raise ValueError(f"image data has {data.size} bytes, but {height} rows of step {step} need {step * height}")
    rows = np.ascontiguousarray(data.reshape(height, step)[:, :row])
    arr = rows.view(dtype).reshape(height, width, channels).astype(dtype.newbyteorder("="), copy=False)
    if channels == 1:
        return arr[..., 0]
    rgb = arr[..., list(_COLOUR_ORDER[msg.encoding])]
    if (rgb == rgb[..., :1]).all():
        return np.ascontiguousarray(rgb[..., 0])
    return (rgb.astype(np.float32) @ np.asarray(_LUMA, dtype=np.float32)).astype(np.float32)


def numpy_to_image(
    array: np.ndarray,
    encoding: str | None = None,
    *,
    header: Header | None = None,
    bigendian: bool = False,
    row_padding: int = 0,
) -> Image:
    """2D (or ``(H, W, C)`` for colour encodings) array -> ``sensor_msgs/Image``.

    encoding: default from the dtype (uint8 mono8, uint16 mono16, int16 16SC1, int32 32SC1,
    float32 32FC1, float64 64FC1; ``(H, W, 3)`` uint8 rgb8). The array's values are written as
    they are: the dtype must be the encoding's. bigendian: write big-endian data.
    row_padding: extra bytes at the end of each row (``step = row + row_padding``).
    """
    arr = np.asarray(array)
    if encoding is None:
        if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
            encoding = "rgb8"
        elif arr.dtype.kind + str(arr.dtype.itemsize) in {"u1", "u2", "i2", "i4", "f4", "f8"}:
            encoding = _DEFAULT_ENCODING[arr.dtype.kind + str(arr.dtype.itemsize)]
        else:
            raise ValueError(f"no image encoding for dtype {arr.dtype}; pass encoding=")
    dtype, channels = _encoding_dtype(encoding, bigendian)
    if arr.dtype.kind != dtype.kind or arr.dtype.itemsize != dtype.itemsize:
        raise ValueError(f"a {encoding} image needs {dtype.kind}{dtype.itemsize} values, got {arr.dtype}")
    expect = 2 if channels == 1 else 3
    if arr.ndim != expect or (channels > 1 and arr.shape[-1] != channels) or 0 in arr.shape:
        shape = "(H, W)" if channels == 1 else f"(H, W, {channels})"
        raise ValueError(f"a {encoding} image must be a non-empty {shape} array, got shape {arr.shape}")
    if row_padding < 0:
        raise ValueError(f"row_padding must be >= 0, got {row_padding}")
    height, width = arr.shape[:2]
    rows = np.ascontiguousarray(arr, dtype=dtype).reshape(height, -1).view(np.uint8)
    if row_padding:
        rows = np.concatenate([rows, np.zeros((height, row_padding), dtype=np.uint8)], axis=1)
    return Image(
        header=header if header is not None else Header(),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=int(bool(bigendian)),
        step=rows.shape[1],
        data=rows.tobytes(),
    )


# --------------------------------------------------------------------------------------------
# Intrinsics
# --------------------------------------------------------------------------------------------
def detector_from_camera_info(info: CameraInfo, sdd_mm: float, *, orientation: str | None = "AP") -> Detector:
    """``CameraInfo`` (ROS ``K``: pixel centres at integers, no distortion) -> core ``Detector``.

    ``sdd_mm`` is the source-to-detector distance (mm): the pixel spacing is ``sdd / f``. The
    detector has ``reverse_x_axis=True``, so its image frame is the ``CameraInfo``'s optical frame.

    Raises:
        ValueError: non-zero distortion, binning or a partial ROI, skew, a ``K`` that is not a
            pinhole matrix with positive focal lengths, an empty size, or a bad ``sdd_mm``.

    """
    if not (isinstance(sdd_mm, (int, float)) and math.isfinite(sdd_mm) and sdd_mm > 0):
        raise ValueError(f"sdd_mm must be a positive distance in mm, got {sdd_mm!r}")
    height, width = int(info.height), int(info.width)
    if height <= 0 or width <= 0:
        raise ValueError(f"CameraInfo has an empty image size ({height}x{width})")
    d = np.asarray(info.d, dtype=np.float64)
    if d.size and not (np.isfinite(d).all() and (d == 0).all()):
        raise ValueError(
            f"CameraInfo has non-zero distortion ({info.distortion_model}: {d.tolist()}); "
            "X-ray registration needs an undistorted (rectified) image"
        )
    if int(info.binning_x) > 1 or int(info.binning_y) > 1:
        raise ValueError(
            f"CameraInfo binning {info.binning_x}x{info.binning_y} is not supported (publish the binned K)"
        )
    roi = info.roi
    if (roi.width or roi.height) and not (
        roi.x_offset == 0 and roi.y_offset == 0 and roi.width == width and roi.height == height
    ):
        raise ValueError("CameraInfo has a region of interest; publish the cropped image's own K instead")
    K = np.asarray(info.k, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(K).all():
        raise ValueError("CameraInfo K contains NaN or infinite values")
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    if not (fx > 0 and fy > 0):
        raise ValueError(f"CameraInfo K must have positive focal lengths, got fx={fx}, fy={fy}")
    if K[0, 1] != 0 or K[1, 0] != 0 or K[2, 0] != 0 or K[2, 1] != 0 or K[2, 2] != 1:
        raise ValueError(f"CameraInfo K is not a skew-free pinhole matrix: {K.tolist()}")
    delx, dely = sdd_mm / fx, sdd_mm / fy
    # Core pixel centres are at +0.5: u_core = u_ros + 0.5; K_core[0, 2] = W / 2 + x0 / delx.
    x0 = (cx + 0.5 - width / 2) * delx
    y0 = (cy + 0.5 - height / 2) * dely
    return Detector(
        float(sdd_mm),
        height,
        width,
        float(delx),
        float(dely),
        float(x0),
        float(y0),
        reverse_x_axis=True,
        orientation=orientation,
    )


def camera_info_from_detector(
    detector: Detector, header: Header | None = None, *, frame_id: str | None = None
) -> CameraInfo:
    """Core ``Detector`` -> ``CameraInfo`` (ROS ``K``, ``P = [K | 0]``, ``R = I``, zero plumb_bob
    distortion). ``detector.reverse_x_axis`` must be True (the only proper optical frame).
    ``frame_id`` (the C-arm source's optical frame) overrides ``header.frame_id``."""
    _check_optical(detector)
    header = header if header is not None else Header()
    if frame_id is not None:
        header.frame_id = frame_id
    K = detector.intrinsic_matrix(torch.float64).numpy().copy()
    K[0, 2] -= 0.5
    K[1, 2] -= 0.5
    P = np.zeros((3, 4))
    P[:, :3] = K
    return CameraInfo(
        header=header,
        height=detector.height,
        width=detector.width,
        distortion_model="plumb_bob",
        d=[0.0] * 5,
        k=K.reshape(9).tolist(),
        r=np.eye(3).reshape(9).tolist(),
        p=P.reshape(12).tolist(),
        binning_x=0,
        binning_y=0,
        roi=RegionOfInterest(),
    )


def xray_from_messages(
    image: Image,
    info: CameraInfo,
    *,
    sdd_mm: float,
    intensity: str = "log",
    i0: float | None = None,
    orientation: str | None = "AP",
    mask_clipped: bool = False,
) -> Xray:
    """``Image`` + ``CameraInfo`` -> core ``Xray`` (line integrals at the image's own intrinsics).

    intensity: ``"log"`` -- pixel values are transmitted intensity, converted to
    ``-log(I / I0)`` (``I0 = i0`` or a robust maximum); ``"linear"`` -- already line integrals.
    mask_clipped: pixels at a clipped extreme value (shutters delivered as a constant,
    saturation) are left out of the returned ``valid_mask`` (``xray.clipped_mask``).

    Raises:
        ValueError: bad encoding/size/data (:func:`image_to_numpy`), bad intrinsics
            (:func:`detector_from_camera_info`), an image whose size differs from the
            ``CameraInfo``'s, NaN/inf pixels, or an intensity conversion that is impossible.

    """
    arr = image_to_numpy(image)
    detector = detector_from_camera_info(info, sdd_mm, orientation=orientation)
    if arr.shape != detector.shape:
        raise ValueError(
            f"image is {arr.shape[0]}x{arr.shape[1]} (rows x columns) but its CameraInfo says "
            f"{detector.height}x{detector.width}"
        )
    return read_xray_image(
        arr,
        sdd=detector.sdd,
        pixel_spacing=(detector.dely, detector.delx),
        intensity=intensity,
        i0=i0,
        x0=detector.x0,
        y0=detector.y0,
        reverse_x_axis=True,
        orientation=orientation,
        mask_clipped=mask_clipped,
    )


# --------------------------------------------------------------------------------------------
# Stamps
# --------------------------------------------------------------------------------------------
def stamp_key(stamp: Time) -> tuple[int, int]:
    """A hashable key for a ``builtin_interfaces/Time`` (pairing messages by stamp)."""
    return (int(stamp.sec), int(stamp.nanosec))


def time_from_ns(ns: int) -> Time:
    """Nanoseconds since the epoch (a bag's time) -> ``builtin_interfaces/Time``."""
    ns = int(ns)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def ns_from_time(stamp: Time) -> int:
    """``builtin_interfaces/Time`` -> nanoseconds since the epoch."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def stamp_to_str(stamp: Time | tuple[int, int]) -> str:
    """``1700000000.000000123`` for log and diagnostic messages."""
    sec, nanosec = stamp if isinstance(stamp, tuple) else stamp_key(stamp)
    return f"{sec}.{nanosec:09d}"
