"""``refiner`` node: X-ray + CameraInfo + initial pose -> refined pose, TF and an overlay.

Inputs: ``sensor_msgs/Image`` and ``sensor_msgs/CameraInfo`` (sensor-data QoS), the pose
estimator's ``geometry_msgs/PoseWithCovarianceStamped`` (all three paired by header stamp) and
``xvr_ros/ModelInfo`` (transient local: which volume to render). Outputs, stamped with the image's
stamp:

- ``xvr_ros/RegistrationResult`` (initial and refined pose of the C-arm source optical frame in
  the volume frame, metres; similarities, iterations, time, converged, status text);
- the TF ``volume frame -> source optical frame`` as ``tf2_msgs/TFMessage`` on ``/tf`` (what
  ``tf2_ros.TransformBroadcaster`` does: QoS depth 100), consistent with the ``CameraInfo``;
- an ``rgb8`` overlay ``sensor_msgs/Image`` for RViz: the X-ray with the edges of the DRR rendered
  at the refined pose (green).

The refinement (``core.registration.register``) renders at the image's original intrinsics under
a time budget, in a worker thread. Only the newest input is worked on: while a refinement runs, a
newer complete input replaces the waiting one (a queue of one) and every replaced input is
reported (log, ``/diagnostics`` and a counter in the next result's status). Bad input never stops
the node: it is logged, reported on ``/diagnostics`` and dropped.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import ParameterType
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage

from xvr_ros.core.imaging import to_uint8
from xvr_ros.core.io.volume import load_volume
from xvr_ros.core.io.xray import Xray
from xvr_ros.core.register.registration import MULTISTART_OFFSETS, register
from xvr_ros.core.register.similarity import sobel
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.msg import ModelInfo, RegistrationResult
from xvr_ros.ros import convert
from xvr_ros.ros.pipeline import (
    IMAGE_NODE_PARAMETERS,
    ImageNode,
    Pending,
    check_image_parameters,
    declare_parameters,
    file_key,
    number_list,
)

__all__ = ["PARAMETERS", "Refiner", "main", "overlay_image", "tf_qos"]

#: name -> (default, description with units). Read once at start-up (read-only parameters).
PARAMETERS: dict[str, tuple] = {
    **IMAGE_NODE_PARAMETERS,
    "initial_pose_topic": (
        "xray/initial_pose",
        "geometry_msgs/PoseWithCovarianceStamped input from the pose estimator",
    ),
    "model_info_topic": ("xvr/model_info", "xvr_ros/ModelInfo input (transient local): the volume to render"),
    "result_topic": ("xray/registration", "xvr_ros/RegistrationResult output"),
    "overlay_topic": ("xray/overlay", "sensor_msgs/Image output (rgb8): the X-ray with the registered DRR's edges"),
    "tf_topic": ("/tf", "tf2_msgs/TFMessage output (dynamic TF)"),
    "volume_frame": ("volume", "TF parent frame and frame_id of the result: the CT/MR volume's frame"),
    "source_frame": (
        "carm_source_optical",
        "TF child frame: the C-arm source's optical frame (the CameraInfo's frame)",
    ),
    "device": ("cpu", "torch device for rendering (cpu, cuda, ...)"),
    "time_budget": (10.0, "s allowed for the refinement of one image (0 = no limit)"),
    "max_iterations": (500, "iteration cap of the refinement (count)"),
    "scales": (
        [],
        "refinement downsampling factors, coarsest first (e.g. [16., 8., 4., 2.]); "
        "[] = the core's choice for the image size",
        ParameterType.PARAMETER_DOUBLE_ARRAY,
    ),
    "labelmap": ("", "label map file of the volume (same grid); empty = none"),
    "labels": (
        [],
        "render only these labels (needs labelmap); [] = the whole volume",
        ParameterType.PARAMETER_INTEGER_ARRAY,
    ),
    "multistart": (
        True,
        "before refining, try the initial pose turned by +-15 deg (LAO/RAO) and +-10 deg (CRA/CAU) "
        "on the two coarsest scales and start from the best (widens the capture range, ~1 s)",
    ),
    "mask_clipped": (
        True,
        "leave pixels at the image's extreme value (shutters delivered as a constant, saturation; "
        "when they cover >= 0.5 % of it) out of the similarity",
    ),
    "hu_to_mu": ("linear", "CT HU -> attenuation mapping used to load the volume ('linear' or 'diffdrr')"),
    "pairing_timeout": (5.0, "s an image waits for its CameraInfo and initial pose before it is dropped"),
    "publish_overlay": (True, "publish the overlay image"),
    "overlay_max_size": (512, "px: the overlay's DRR is rendered at most this large (then upsampled)"),
}

_KINDS = ("image", "camera_info", "initial_pose")


def tf_qos() -> QoSProfile:
    """QoS of ``/tf`` as ``tf2_ros.TransformBroadcaster`` uses it: reliable, volatile, depth 100."""
    return QoSProfile(depth=100)


@torch.no_grad()
def overlay_image(
    renderer: Renderer, xray: Xray, pose_mm: torch.Tensor, max_size: int = 512, edge_fraction: float = 0.08
) -> np.ndarray:
    """(H, W, 3) uint8: the X-ray (bone white) with the strongest ``edge_fraction`` of the DRR's
    gradient magnitude at ``pose_mm`` drawn in green. The DRR is rendered at most ``max_size`` px
    on a side (same physical detector) and upsampled."""
    det = xray.detector
    factor = max(1.0, max(det.height, det.width) / max(1, max_size))
    small = det.scaled(factor) if factor > 1 else det
    drr = renderer(pose_mm.reshape(1, 4, 4).to(renderer.dtype), small).sum(1, keepdim=True).to(torch.float32)
    grad, weight = sobel(drr, sigma=1.0)
    mag = grad.square().sum(1, keepdim=True).sqrt() * weight
    if small.shape != det.shape:
        mag = F.interpolate(mag, size=det.shape, mode="bilinear", align_corners=False)
    mag = mag[0, 0].cpu().numpy()
    gray = to_uint8(xray.image[0, 0])
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    if (mag > 0).any():
        edges = mag >= max(float(np.quantile(mag[mag > 0], 1 - edge_fraction)), 1e-12)
        rgb[edges] = (0, 255, 0)
    return rgb


@dataclass
class _Volume:
    renderer: Renderer
    path: str
    key: Any


class Refiner(ImageNode):
    """The ``refiner`` node (see the module docstring). ``kwargs`` go to ``rclpy.node.Node``
    (``parameter_overrides``, ``context``, ``namespace``, ...)."""

    def __init__(self, node_name: str = "refiner", **kwargs):
        super().__init__(node_name, **kwargs)
        p = self.params = declare_parameters(self, PARAMETERS)
        check_image_parameters(p)
        if not p["time_budget"] >= 0:
            raise ValueError(f"parameter time_budget must be >= 0 s, got {p['time_budget']}")
        self._scales = tuple(number_list("scales", p["scales"], float))
        self._labels = number_list("labels", p["labels"], int)
        if self._scales and (min(self._scales) < 1 or any(b >= a for a, b in zip(self._scales, self._scales[1:]))):
            raise ValueError(f"parameter scales must be >= 1 and strictly decreasing, got {list(p['scales'])}")
        self._volume: _Volume | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._warned_frames: set[str] = set()
        self._result_pub = self.create_publisher(RegistrationResult, p["result_topic"], 10)
        self._tf_pub = self.create_publisher(TFMessage, p["tf_topic"], tf_qos())
        self._overlay_pub = self.create_publisher(Image, p["overlay_topic"], 2) if p["publish_overlay"] else None
        self.start_pipeline(
            _KINDS, p["pairing_timeout"], p["max_pending"], self._load_volume, self._refine, "a refinement"
        )
        self.create_subscription(PoseWithCovarianceStamped, p["initial_pose_topic"], self._on_initial_pose, 10)
        self.diagnostics.set_state("WARN", f"no volume loaded yet (waiting for ModelInfo on {p['model_info_topic']})")

    # ---- callbacks: hand work on (image, CameraInfo and ModelInfo: ImageNode's) --------------
    def _on_initial_pose(self, msg: PoseWithCovarianceStamped) -> None:
        self.pair("initial_pose", msg)

    # ---- worker: volume loading --------------------------------------------------------------
    def _load_volume(self, info: ModelInfo) -> None:
        p = self.params
        for field_name, param in (("volume_frame", "volume_frame"), ("source_frame", "source_frame")):
            announced = getattr(info, field_name)
            if announced and announced != p[param]:
                self.diagnostics.warn(
                    f"ModelInfo names {field_name} {announced!r} but this node uses {p[param]!r} (parameter {param})"
                )
        path = info.volume_path
        if not path:
            self._set_volume(None)
            self.diagnostics.set_state("WARN", "ModelInfo names no volume (empty volume_path): no volume loaded")
            return
        key = (file_key(path), info.volume_sha256, p["labelmap"])
        with self._lock:
            current = self._volume
        if current is not None and key[0] is not None and current.key == key:
            return  # the same volume re-announced
        t0 = time.perf_counter()
        try:
            volume = load_volume(path, p["labelmap"] or None, hu_to_mu=p["hu_to_mu"])
            renderer = Renderer(volume, labels=self._labels or None, device=p["device"])
        except Exception as exc:  # noqa: BLE001 - any unreadable volume is reported, never fatal
            self._set_volume(None)
            self.diagnostics.set_state("ERROR", f"cannot load volume {path}: {exc}; no volume loaded", volume_path=path)
            return
        self._set_volume(_Volume(renderer, path, key))
        mismatch = bool(info.volume_sha256 and volume.sha256 and info.volume_sha256 != volume.sha256)
        self.diagnostics.set_state(
            "WARN" if mismatch else "OK",
            f"volume loaded: {path}" + (" (its sha256 differs from the ModelInfo's)" if mismatch else ""),
            volume_path=path,
            shape="x".join(map(str, volume.shape)),
            load_time_s=time.perf_counter() - t0,
        )

    def _set_volume(self, volume: _Volume | None) -> None:
        with self._lock:
            self._volume = volume

    # ---- worker: refinement -------------------------------------------------------------------
    def _refine(self, entry: Pending) -> None:
        p = self.params
        image, info, initial = entry.parts["image"], entry.parts["camera_info"], entry.parts["initial_pose"]
        stamp = convert.stamp_to_str(entry.key)
        with self._lock:
            volume = self._volume
        if volume is None:
            self.diagnostics.error(
                f"image {stamp} dropped: no volume loaded "
                f"(waiting for a loadable ModelInfo on {p['model_info_topic']})",
                stamp=stamp,
            )
            return
        if (
            info.header.frame_id
            and info.header.frame_id != p["source_frame"]
            and info.header.frame_id not in self._warned_frames
        ):
            self._warned_frames.add(info.header.frame_id)
            self.diagnostics.warn(
                f"CameraInfo frame_id {info.header.frame_id!r} differs from the TF child frame {p['source_frame']!r} "
                "(parameter source_frame): RViz and TF users looking up the camera frame will not find this transform",
            )
        if initial.header.frame_id != p["volume_frame"]:
            self.diagnostics.error(
                f"image {stamp} dropped: its initial pose is in frame {initial.header.frame_id!r}, "
                f"not {p['volume_frame']!r}",
                stamp=stamp,
            )
            return
        try:
            xray = convert.xray_from_messages(
                image,
                info,
                sdd_mm=p["sdd_mm"],
                intensity=p["intensity"],
                i0=p["i0"] or None,
                mask_clipped=p["mask_clipped"],
            )
            init = convert.carm_from_optical(convert.pose_from_msg(initial.pose.pose), xray.detector)
            options = {"scales": self._scales} if self._scales else {}  # else the core's automatic choice
            offsets = MULTISTART_OFFSETS if p["multistart"] else ()
            renderer = volume.renderer
            # max_iterations=0: no step, just the similarity at the initial pose on the finest scale.
            start = register(renderer, xray, init_pose=init[None], max_iterations=0, **options)
            reg = register(
                renderer,
                xray,
                init_pose=init[None],
                max_iterations=p["max_iterations"],
                time_budget=p["time_budget"] or None,
                callback=lambda _: self._stopping.is_set(),
                multistart_offsets=offsets,
                **options,
            )
            pose = reg.pose[0].to(torch.float64)
            optical = convert.optical_from_carm(pose, xray.detector)
        except ValueError as exc:
            self.diagnostics.error(
                f"image {stamp} dropped: {exc}",
                stamp=stamp,
                encoding=image.encoding,
                image_size=f"{image.height}x{image.width}",
                camera_info_size=f"{info.height}x{info.width}",
            )
            return
        if self._stopping.is_set():
            return
        elapsed = time.monotonic() - entry.arrived["image"]
        dropped = len(entry.superseded)
        total = self.dropped_total
        refinement = reg.refinement
        status = (
            f"{refinement.message}; dropped {dropped} older input(s) while busy"
            + (f" ({', '.join(map(convert.stamp_to_str, entry.superseded))})" if dropped else "")
            + f" (total {total})"
        )
        header = Header(stamp=image.header.stamp, frame_id=p["volume_frame"])
        self._tf_pub.publish(
            TFMessage(
                transforms=[
                    convert.transform_stamped(optical, p["volume_frame"], p["source_frame"], image.header.stamp)
                ]
            )
        )
        self._result_pub.publish(
            RegistrationResult(
                header=header,
                initial_pose=initial.pose,
                refined_pose=convert.pose_with_covariance_to_msg(optical),
                initial_similarity=float(start.refinement.similarity[0]),
                similarity=float(refinement.similarity[0]),
                iterations=int(refinement.iterations),
                registration_time=float(elapsed),
                converged=bool(refinement.converged[0]) if refinement.converged is not None else False,
                status=status,
            )
        )
        if self._overlay_pub is not None:
            rgb = overlay_image(renderer, xray, pose, p["overlay_max_size"])
            self._overlay_pub.publish(convert.numpy_to_image(rgb, "rgb8", header=image.header))
        self.diagnostics.set_state(
            "OK",
            f"registered image {stamp}",
            log=False,
            stamp=stamp,
            registration_time_s=elapsed,
            iterations=refinement.iterations,
            similarity=float(refinement.similarity[0]),
            dropped=dropped,
            dropped_total=total,
        )
        self.get_logger().info(f"image {stamp}: {status}")

    # ---- shutdown -----------------------------------------------------------------------------
    def destroy_node(self) -> None:
        self._stopping.set()  # a running refinement stops at its next iteration
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run xvr_ros refiner [--ros-args ...]``."""
    from xvr_ros.ros.bringup import run_node

    return run_node(Refiner, args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
