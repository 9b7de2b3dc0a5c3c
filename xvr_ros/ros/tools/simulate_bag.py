"""``xvr-ros simulate-bag``: a simulated fluoroscopy session written as a rosbag2 bag.

The session is :mod:`xvr_ros.core.sim.session` (Siddon at full resolution with the registration
benchmark's domain shift), in one of two modes:

* ``"session"``: a sweep, then zoomed and panned discrete shots, a hand-held C-arm's jitter
  (:func:`~xvr_ros.core.sim.session.plan_session`);
* ``"continuous"``: continuous fluoroscopy, frames exactly ``1 / fps`` apart on one detector, the
  C-arm turning at up to 5 deg/s, table moves, breathing, one collimation and one wire advancing
  through the run (:func:`~xvr_ros.core.sim.session.plan_fluoro`).

Per frame, on the topics the nodes subscribe to by default:

* ``/xray/camera_info`` ``sensor_msgs/CameraInfo`` then ``/xray/image`` ``sensor_msgs/Image``
  with the same stamp, ``frame_id`` = the C-arm source's optical frame. Images are ``mono16``
  detector counts as flat panels deliver them; in a ``"session"`` every tenth frame (from the
  fifth) uses another encoding in turn: ``16UC1``, ``mono8`` (an 8-bit video grabber), ``32FC1``
  (transmitted fraction). A continuous run is one video stream: ``mono16`` throughout.
* ``/xray/ground_truth`` ``geometry_msgs/PoseStamped``: the true pose of that optical frame in the
  volume frame, metres (the quantity the refiner publishes on TF). The nodes never read it.

Bag time = header stamp = capture time (a fixed epoch plus the session's times), so the same
arguments make the same messages. The volume (path, sha256) and the session's settings (JSON
with the ``mode``) are stored in the bag's ``custom_data``. With ``faults`` the bag also holds
what a bag from elsewhere can: a corrupt image message, an image without its CameraInfo, an image
in an unsupported encoding (``yuv422``) and an extra topic the nodes do not know (``/carm/status``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from xvr_ros.ros.tools.bag import BagWriter

__all__ = ["DEFAULT_TOPICS", "EPOCH_NS", "MODES", "SimulatedBag", "simulate_bag"]

DEFAULT_TOPICS = {"image": "/xray/image", "camera_info": "/xray/camera_info", "ground_truth": "/xray/ground_truth"}
EPOCH_NS = 1_767_225_600 * 10**9  # 2026-01-01T00:00:00Z: a fixed capture start, for identical bags
OTHER_ENCODINGS = ("16UC1", "mono8", "32FC1")
FAULTS = ("corrupt", "no_camera_info", "bad_encoding")
MODES = ("session", "continuous")


@dataclass
class SimulatedBag:
    path: Path
    frames: int
    duration_s: float
    encodings: dict[str, int]
    faults: dict[int, str]  # frame index -> fault
    seconds: float  # wall time to make it
    mode: str = "session"
    fps: float = 2.0


def encoding_of(index: int) -> str:
    """The encoding of frame ``index``: mono16, except every tenth from the fifth."""
    return OTHER_ENCODINGS[(index // 10) % len(OTHER_ENCODINGS)] if index % 10 == 4 else "mono16"


def fault_frames(n: int) -> dict[int, str]:
    """Which frames carry which fault in a bag made with ``faults`` (spread over the session)."""
    out = {}
    for k, fault in enumerate(FAULTS):
        i = max(0, min(n - 1, round(n * (k + 1) / (len(FAULTS) + 1))))
        if encoding_of(i) != "mono16" and i + 1 < n:
            i += 1  # keep the frames in other encodings intact
        out[i] = fault
    return out


def simulate_bag(
    volume_path: str | Path,
    out: str | Path,
    *,
    labelmap: str | Path | None = None,
    labels: list[int] | None = None,
    mode: str = "session",
    frames: int | None = None,
    duration_s: float | None = None,
    fps: float | None = None,
    zoom_at_s: float | None = None,
    size: int = 256,
    storage: str = "mcap",
    seed: int = 0,
    faults: bool = False,
    source_frame: str = "carm_source_optical",
    volume_frame: str = "volume",
    overwrite: bool = False,
    device: str = "cpu",
    progress=None,
) -> SimulatedBag:
    """Render the session and write the bag (see the module docstring); ``progress(i, n)`` per frame.

    ``mode="session"``: ``frames`` (default 40) at ``fps`` (default 2) in the sweep and the bursts.
    ``mode="continuous"``: ``duration_s`` (default 20 s) or ``frames`` at ``fps`` (default 7.5);
    ``zoom_at_s``: switch to the zoomed detector at that time (default: one detector).
    """
    import time

    from geometry_msgs.msg import PoseStamped
    from std_msgs.msg import Header, String

    from xvr_ros.core.io.volume import load_volume
    from xvr_ros.core.render.renderer import Renderer
    from xvr_ros.core.sim.session import encode_counts, render_session
    from xvr_ros.ros import convert

    t0 = time.perf_counter()
    plan = _plan(mode, frames, duration_s, fps, zoom_at_s, size, seed)
    frames, fps = len(plan), _fps(mode, fps)
    volume_path = Path(volume_path).resolve()
    volume = load_volume(volume_path, labelmap)
    bad = fault_frames(frames) if faults else {}
    encodings: dict[str, int] = {}
    with BagWriter(out, storage, overwrite=overwrite) as bag:
        bag.set_custom_data("xvr_ros.volume", str(volume_path))
        bag.set_custom_data("xvr_ros.volume_sha256", volume.sha256)
        bag.set_custom_data("xvr_ros.volume_frame", volume_frame)
        bag.set_custom_data(
            "xvr_ros.session",
            json.dumps(
                dict(
                    mode=mode,
                    frames=frames,
                    duration_s=plan[-1].time,
                    fps=fps,
                    zoom_at_s=zoom_at_s,
                    size=size,
                    seed=seed,
                    labels=labels,
                    faults=faults,
                    labelmap=str(labelmap or ""),
                )
            ),
        )
        renderer = Renderer(volume, method="siddon", labels=labels, device=device)
        for fr in plan:
            render_session(renderer, [fr], seed=seed)
            t_ns = EPOCH_NS + int(round(fr.time * 1e9))
            stamp = convert.time_from_ns(t_ns)
            header = Header(stamp=stamp, frame_id=source_frame)
            fault = bad.get(fr.index)
            encoding = encoding_of(fr.index) if mode == "session" else "mono16"
            if fault != "no_camera_info":
                bag.write(DEFAULT_TOPICS["camera_info"], convert.camera_info_from_detector(fr.detector, header), t_ns)
            if fault == "corrupt":
                image_bytes = b"\x00\x01\x00\x00" + b"\xde\xad\xbe\xef" * 8  # a truncated message
                bag.write_raw(DEFAULT_TOPICS["image"], "sensor_msgs/msg/Image", image_bytes, t_ns)
            else:
                image = convert.numpy_to_image(encode_counts(fr.intensity, encoding), encoding, header=header)
                if fault == "bad_encoding":
                    image.encoding = encoding = "yuv422"  # 2 bytes per pixel, like mono16: only the name is unsupported
                bag.write(DEFAULT_TOPICS["image"], image, t_ns)
                encodings[encoding] = encodings.get(encoding, 0) + 1
            optical = convert.optical_from_carm(fr.pose, fr.detector)
            bag.write(
                DEFAULT_TOPICS["ground_truth"],
                PoseStamped(header=Header(stamp=stamp, frame_id=volume_frame), pose=convert.pose_to_msg(optical)),
                t_ns,
            )
            if faults and fr.index % 5 == 0:
                bag.write("/carm/status", String(data=f"frame {fr.index}: {fr.segment}"), t_ns + 1)
            if progress is not None:
                progress(fr.index + 1, frames)
    return SimulatedBag(Path(out), frames, plan[-1].time, encodings, bad, time.perf_counter() - t0, mode, fps)


def _fps(mode: str, fps: float | None) -> float:
    return float(fps) if fps is not None else (2.0 if mode == "session" else 7.5)


def _plan(mode, frames, duration_s, fps, zoom_at_s, size, seed) -> list:
    """The session's frames, or a ValueError naming the argument that does not fit ``mode``."""
    from xvr_ros.core.sim.session import plan_fluoro, plan_session

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fps = _fps(mode, fps)
    if mode == "session":
        if duration_s is not None or zoom_at_s is not None:
            raise ValueError("duration_s and zoom_at_s are for mode='continuous'; a session takes frames")
        return plan_session(40 if frames is None else frames, size, fps=fps, seed=seed)
    if frames is not None and duration_s is not None:
        raise ValueError("give frames or duration_s, not both")
    if frames is not None:
        if frames < 1:
            raise ValueError(f"a session needs at least one frame, got {frames}")
        duration_s = frames / fps
    return plan_fluoro(20.0 if duration_s is None else duration_s, size, fps=fps, seed=seed, zoom_at_s=zoom_at_s)
