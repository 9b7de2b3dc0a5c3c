"""A simulated intraoperative fluoroscopy session: C-arm trajectory, detector changes, detector images.

Used by ``make demo`` (streamed to the nodes) and ``xvr-ros simulate-bag`` (written to a bag), so
both show the nodes the same kind of session:

1. a **sweep**: the C-arm rotates from RAO to LAO with a little cranial tilt, imaging at ``fps``;
2. **discrete shots**: the C-arm is moved to a few views (2-5 s apart) and fires a burst of 1-3
   frames at each. From here on the detector is **zoomed** (a magnification mode: finer pixels,
   smaller field) and **panned** (the principal point moves, as a collimator change does).

The C-arm is hand-held: every frame carries a slow random-walk drift plus tremor. Each frame is
rendered with Siddon at the detector's full resolution through the registration benchmark's image
chain (:func:`~xvr_ros.core.sim.simulate.simulate_xray`: an object that is not in the CT, blur,
collimator blades or an image-intensifier circle, noise, gamma, saturation, burned-in text), as the
detector counts a driver delivers. Everything is a function of ``seed``.

Poses are the core's C-arm poses, (4, 4) float64 camera-to-world in mm; times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.sim.appearance import FULL_SCALE
from xvr_ros.core.sim.simulate import simulate_xray
from xvr_ros.core.train.presets import PRESETS

__all__ = ["I0", "SessionFrame", "detectors", "encode_counts", "plan_session", "render_session"]

I0 = FULL_SCALE  # unattenuated detector counts
# Views of the shots (degrees, mm): inside the chest ranges a network is trained on, with margin.
_SHOT_RANGES = {"alpha": (-25.0, 25.0), "beta": (-12.0, 12.0), "gamma": (-8.0, 8.0),
                "x": (-20.0, 20.0), "y": (780.0, 920.0), "z": (-20.0, 20.0)}


@dataclass
class SessionFrame:
    """One frame of a session (``intensity`` is None until :func:`render_session`)."""

    index: int
    time: float  # s since the first frame
    segment: str  # "sweep" or "shot <k>"
    tag: str  # "std" or "zoom": which of :func:`detectors` images it
    detector: Detector
    pose: torch.Tensor  # (4, 4) float64, mm
    intensity: np.ndarray | None = field(default=None, repr=False)  # (H, W) float64 counts in [0, I0]


def detectors(size: int) -> dict[str, Detector]:
    """``{"std": ..., "zoom": ...}``: a ``size`` px panel covering 256 mm, and the same panel in
    a magnification mode (78 % of the pixels at 80 % of the spacing) with a panned principal point."""
    if size < 16:
        raise ValueError(f"detector size must be at least 16 px, got {size}")
    delx = 256.0 / size
    zs = max(16, int(round(size * 0.78)))
    return {
        "std": Detector(sdd=1020.0, height=size, width=size, delx=delx, dely=delx),
        "zoom": Detector(sdd=1020.0, height=zs, width=zs, delx=0.8 * delx, dely=0.8 * delx, x0=10.0, y0=-6.0),
    }


def _clip(angles: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = PRESETS["chest"]
    lo_a, hi_a = [r[k][0] for k in ("alpha", "beta", "gamma")], [r[k][1] for k in ("alpha", "beta", "gamma")]
    lo_t, hi_t = [r[k][0] for k in ("x", "y", "z")], [r[k][1] for k in ("x", "y", "z")]
    return np.clip(angles, lo_a, hi_a), np.clip(xyz, lo_t, hi_t)


def plan_session(n: int, size: int = 256, fps: float = 2.0, seed: int = 0, zoom: bool = True) -> list[SessionFrame]:
    """The trajectory of an ``n``-frame session (half sweep, half shots; see the module docstring).

    ``fps``: frame rate of the sweep and of each burst. ``zoom``: switch to the zoomed, panned
    detector for the shots (else one detector throughout).
    """
    if n < 1:
        raise ValueError(f"a session needs at least one frame, got {n}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E55]))
    dets = detectors(size)
    n_sweep = (n + 1) // 2
    angles, xyz, times, segments = [], [], [], []

    # Sweep: RAO -> LAO with a little cranial tilt, at the default source distance.
    s = np.linspace(0.0, 1.0, n_sweep)
    angles.append(np.stack([-20.0 + 40.0 * s, -5.0 + 10.0 * s, np.zeros(n_sweep)], 1))
    xyz.append(np.tile([0.0, 850.0, 0.0], (n_sweep, 1)))
    times.append(np.arange(n_sweep) / fps)
    segments += ["sweep"] * n_sweep

    # Shots: bursts of 1-3 frames at random views, the C-arm repositioned 2-5 s between them.
    t = (n_sweep - 1) / fps
    k = 0
    left = n - n_sweep
    while left > 0:
        burst = min(left, int(rng.integers(1, 4)))
        view = [rng.uniform(*_SHOT_RANGES[key]) for key in ("alpha", "beta", "gamma", "x", "y", "z")]
        angles.append(np.tile(view[:3], (burst, 1)))
        xyz.append(np.tile(view[3:], (burst, 1)))
        t += rng.uniform(2.0, 5.0)
        times.append(t + np.arange(burst) / fps)
        t = times[-1][-1]
        segments += [f"shot {k}"] * burst
        left -= burst
        k += 1

    angles, xyz, times = np.concatenate(angles), np.concatenate(xyz), np.concatenate(times)
    # Hand-held C-arm: slow drift (a random walk) plus tremor, degrees and mm.
    drift_a = np.cumsum(rng.normal(0.0, 0.15, (n, 3)), axis=0)
    drift_t = np.cumsum(rng.normal(0.0, 0.5, (n, 3)), axis=0)
    angles = angles + drift_a + rng.normal(0.0, 0.2, (n, 3))
    xyz = xyz + drift_t + rng.normal(0.0, [0.5, 1.5, 0.5], (n, 3))
    angles, xyz = _clip(angles, xyz)
    poses = carm_pose(torch.from_numpy(angles), torch.from_numpy(xyz), degrees=True).to(torch.float64)

    frames = []
    for i in range(n):
        tag = "zoom" if zoom and segments[i] != "sweep" else "std"
        frames.append(SessionFrame(i, float(times[i] - times[0]), segments[i], tag, dets[tag], poses[i]))
    return frames


def render_session(
    volume: Volume | Renderer, frames: list[SessionFrame], seed: int = 0, labels: list[int] | None = None,
    device: str = "cpu",
) -> list[SessionFrame]:
    """Render every frame's ``intensity`` (Siddon at full resolution + the image chain) in place.

    ``volume``: the CT or a Siddon renderer of it; ``labels``: render only these structures
    (needs the volume's label map).
    """
    if isinstance(volume, Renderer):
        renderer = volume
    else:
        renderer = Renderer(volume, method="siddon", labels=labels, device=device)
    for fr in frames:
        sim = simulate_xray(
            renderer,
            fr.pose[None].to(renderer.dtype),
            fr.detector,
            seed=seed * 1000 + fr.index,
        )
        fr.intensity = sim.counts[0, 0].numpy()
    return frames


def encode_counts(counts: np.ndarray, encoding: str = "mono16") -> np.ndarray:
    """Detector counts (float, 0..I0) -> the pixel array of a ``sensor_msgs/Image`` encoding, as
    detectors deliver it: ``mono16``/``16UC1`` counts; ``mono8``/``8UC1`` counts scaled to
    0..255 (an 8-bit video grabber); ``32FC1``/``64FC1`` the transmitted fraction ``I / I0``."""
    c = np.asarray(counts, dtype=np.float64)
    if encoding in ("mono16", "16UC1"):
        return np.clip(np.round(c), 0, 65535).astype(np.uint16)
    if encoding in ("mono8", "8UC1"):
        return np.clip(np.round(c * (255.0 / I0)), 0, 255).astype(np.uint8)
    if encoding in ("32FC1", "64FC1"):
        return (c / I0).astype(np.float32 if encoding == "32FC1" else np.float64)
    raise ValueError(f"no detector-count encoding {encoding!r}; use mono16, 16UC1, mono8, 8UC1, 32FC1 or 64FC1")
