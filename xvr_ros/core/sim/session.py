"""A simulated intraoperative fluoroscopy session: C-arm trajectory, detector changes, detector images.

Used by ``make demo`` (streamed to the nodes) and ``xvr-ros simulate-bag`` (written to a bag), so
both show the nodes the same kind of session:

1. a **sweep**: the C-arm rotates from RAO to LAO with a little cranial tilt, imaging at ``fps``;
2. **discrete shots**: the C-arm is moved to a few views (2-5 s apart) and fires a burst of 1-3
   frames at each. From here on the detector is **zoomed** (a magnification mode: finer pixels,
   smaller field) and **panned** (the principal point moves, as a collimator change does).

The C-arm is hand-held: every frame carries a slow random-walk drift plus tremor.

:func:`plan_fluoro` plans **continuous fluoroscopy** instead: one run of frames exactly ``1 / fps``
apart on one detector, everything moving smoothly (:class:`FluoroMotion`): the C-arm rotating
between views (LAO/RAO and some CRA/CAU) at up to 5 deg/s with still phases between, the table
moving the patient a few mm/s in phases, breathing, tremor, and a wire advancing along its axis.
The run keeps one collimation, exposure setting and wire; only the quantum noise is new per frame.

Each frame is rendered with Siddon at the detector's full resolution through the registration
benchmark's image chain (:func:`~xvr_ros.core.sim.simulate.simulate_xray`: an object that is not
in the CT, blur, collimator blades or an image-intensifier circle, noise, gamma, saturation,
burned-in text), as the detector counts a driver delivers. Everything is a function of ``seed``.

Poses are the core's C-arm poses, (4, 4) float64 camera-to-world in mm; times are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.sim.appearance import FULL_SCALE
from xvr_ros.core.sim.simulate import Instrument, simulate_xray
from xvr_ros.core.train.presets import PRESETS

__all__ = [
    "I0",
    "FluoroMotion",
    "SessionFrame",
    "detectors",
    "encode_counts",
    "fluoro_motion",
    "plan_fluoro",
    "plan_session",
    "render_session",
]

I0 = FULL_SCALE  # unattenuated detector counts
_RUN_SEEDS = 10**9  # runs draw from seeds no frame of a session uses (frames: seed * 1000 + index)
# Views of the shots (degrees, mm): inside the chest ranges a network is trained on, with margin.
_SHOT_RANGES = {"alpha": (-25.0, 25.0), "beta": (-12.0, 12.0), "gamma": (-8.0, 8.0),
                "x": (-20.0, 20.0), "y": (780.0, 920.0), "z": (-20.0, 20.0)}


@dataclass
class SessionFrame:
    """One frame of a session (``intensity`` is None until :func:`render_session`)."""

    index: int
    time: float  # s since the first frame
    segment: str  # "sweep", "shot <k>" or "fluoro"
    tag: str  # "std" or "zoom": which of :func:`detectors` images it
    detector: Detector
    pose: torch.Tensor  # (4, 4) float64, mm
    run: int | None = None  # frames of one fluoroscopy run share collimation and exposure; None: independent shots
    instrument: Instrument | None = None  # the object not in the CT; None: a random one per frame
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


# --------------------------------------------------------------------------------------------
# continuous fluoroscopy
# --------------------------------------------------------------------------------------------
# Views the C-arm rotates between (degrees) and where the table takes the patient (mm, RAS x and z).
_FLUORO_VIEWS = {"alpha": (-20.0, 20.0), "beta": (-10.0, 10.0)}
_TABLE_RANGE = {"x": (-12.0, 12.0), "z": (-15.0, 15.0)}
# Peak rotation speed, |d alpha/dt| + |d beta/dt| in deg/s. With the tremor's at most 3 x 0.15 deg/s
# the C-arm turns at most 4.95 deg/s: an angular velocity is bounded by the sum of its Euler rates.
_ROTATION_SPEED = (2.5, 4.5)
_TREMOR_RATE_DEG_S = 0.15


@dataclass
class FluoroMotion:
    """What moves during a continuous fluoroscopy run, at ``times``.

    times: (n,) s. carm_deg: (n, 3) C-arm angles (alpha, beta, gamma), degrees, tremor included.
    carm_mm: (n, 3) the C-arm's translation parameters (Eq. 25; y = source to isocenter), mm.
    table_mm, breathing_mm: (n, 3) displacement of the patient in the room (volume axes, RAS), mm.
    wire_mm: (n, 2, 3) the ends of the wire (tail, tip), volume frame, mm.
    """

    times: np.ndarray
    carm_deg: np.ndarray
    carm_mm: np.ndarray
    table_mm: np.ndarray
    breathing_mm: np.ndarray
    wire_mm: np.ndarray

    def poses(self) -> torch.Tensor:
        """(n, 4, 4) float64 C-arm poses in the volume frame, mm, inside the chest preset's ranges.

        A patient moved by ``d`` in the room is the C-arm moved by ``-d`` in the volume frame: the
        source ``R @ xyz`` becomes ``R @ xyz - d``, i.e. ``xyz - R^T d``.
        """
        angles = torch.from_numpy(self.carm_deg)
        R = carm_pose(angles, torch.zeros_like(angles), degrees=True)[:, :3, :3].numpy()
        shift = self.table_mm + self.breathing_mm
        xyz = self.carm_mm - np.einsum("nji,nj->ni", R, shift)
        angles, xyz = _clip(self.carm_deg, xyz)
        return carm_pose(torch.from_numpy(angles), torch.from_numpy(xyz), degrees=True).to(torch.float64)


def _phases(rng: np.random.Generator, times: np.ndarray, start, target, speed, hold) -> np.ndarray:
    """(n, k) positions at ``times`` of something that holds still for ``hold`` s, then moves to
    ``target(position)`` with a raised-cosine velocity peaking at ``speed`` (units/s, summed over
    the k coordinates), and again. ``hold``, ``speed``: ``(lo, hi)`` ranges."""
    start = np.asarray(start, dtype=np.float64)
    out = np.tile(start, (len(times), 1))
    position, t = start, 0.0
    while t <= times[-1]:
        t += rng.uniform(*hold)
        goal = np.asarray(target(position), dtype=np.float64)
        # A raised cosine over D s moving a distance s peaks at pi s / (2 D).
        length = max(math.pi * float(np.abs(goal - position).sum()) / (2.0 * rng.uniform(*speed)), 1e-6)
        w = (1.0 - np.cos(math.pi * np.clip((times - t) / length, 0.0, 1.0))) / 2.0
        moving = times >= t
        out[moving] = position + w[moving, None] * (goal - position)
        position, t = goal, t + length
    return out


def _tremor(rng: np.random.Generator, times: np.ndarray, rate: float, amplitude, k: int = 3) -> np.ndarray:
    """(n, k) smooth tremor: two sinusoids per coordinate at 0.5-3 Hz, each ``amplitude`` (a range)
    but never faster than ``rate / 2`` units/s, so the sum stays under ``rate``."""
    out = np.zeros((len(times), k))
    for _ in range(2):
        f = rng.uniform(0.5, 3.0, k)
        a = np.minimum(rng.uniform(*amplitude, k), rate / 2 / (2 * math.pi * f))
        out += a * np.sin(2 * math.pi * f * times[:, None] + rng.uniform(0, 2 * math.pi, k))
    return out


def fluoro_motion(times: np.ndarray, seed: int = 0) -> FluoroMotion:
    """The motion of a continuous fluoroscopy run at ``times`` (n,) s, a smooth function of ``seed``.

    * C-arm: still for 1-4 s, then a turn to another view (alpha in +-20 deg, beta in +-10 deg) at a
      peak of 2.5-4.5 deg/s, and again; gamma 0; source 820-880 mm from the isocenter.
    * Table: still for 3-8 s, then a move of the patient to within +-12 mm (x) and +-15 mm (z, the
      long axis) at a peak of 2-5 mm/s, and again.
    * Breathing: 0.2-0.3 Hz, 3-6 mm towards the feet (-z) and 0.5-1.5 mm anterior (+y) at inspiration.
    * Tremor: sinusoids of at most 0.15 deg/s per angle and 0.05-0.15 mm.
    * Wire: a K-wire 60-90 mm long near the isocenter, its tip advancing 3-10 mm at a time along its
      axis at a peak of 1-3 mm/s, still for 1-4 s between.
    """
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or len(times) < 1 or not np.isfinite(times).all():
        raise ValueError("times must be a non-empty 1-D array of seconds")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence([int(seed), 0xF1E0]).spawn(6)]
    n = len(times)
    views = np.array([_FLUORO_VIEWS["alpha"], _FLUORO_VIEWS["beta"]])
    rng = streams[0]
    ab = _phases(rng, times, rng.uniform(views[:, 0], views[:, 1]), lambda _: rng.uniform(views[:, 0], views[:, 1]),
                 _ROTATION_SPEED, (1.0, 4.0))
    carm_deg = np.concatenate([ab, np.zeros((n, 1))], 1) + _tremor(streams[1], times, _TREMOR_RATE_DEG_S, (0.01, 0.03))
    carm_mm = np.array([0.0, streams[1].uniform(820.0, 880.0), 0.0]) + _tremor(streams[1], times, 2.0, (0.05, 0.15))

    rng = streams[2]
    box = np.array([_TABLE_RANGE["x"], _TABLE_RANGE["z"]])
    xz = _phases(rng, times, np.zeros(2), lambda _: rng.uniform(box[:, 0], box[:, 1]), (2.0, 5.0), (3.0, 8.0))
    table_mm = np.stack([xz[:, 0], np.zeros(n), xz[:, 1]], 1)

    rng = streams[3]
    f, cc, ap = rng.uniform(0.2, 0.3), rng.uniform(3.0, 6.0), rng.uniform(0.5, 1.5)
    inspiration = (1.0 - np.cos(2 * math.pi * f * times + rng.uniform(0, 2 * math.pi))) / 2.0  # 0..1
    breathing_mm = inspiration[:, None] * np.array([0.0, ap, -cc])

    rng = streams[4]
    phi = rng.uniform(0, 2 * math.pi)
    axis = np.array([math.cos(phi), rng.uniform(-0.3, 0.3), math.sin(phi)])
    axis /= np.linalg.norm(axis)
    tip0 = rng.uniform(-20.0, 20.0, 3) * np.array([1.0, 0.5, 1.0]) - 15.0 * axis
    advance = _phases(rng, times, [0.0], lambda s: s + rng.uniform(3.0, 10.0), (1.0, 3.0), (1.0, 4.0))
    tip = tip0 + advance * axis
    wire_mm = np.stack([tip - rng.uniform(60.0, 90.0) * axis, tip], 1)
    return FluoroMotion(times, carm_deg, carm_mm, table_mm, breathing_mm, wire_mm)


def plan_fluoro(
    duration_s: float, size: int = 256, fps: float = 7.5, seed: int = 0, zoom_at_s: float | None = None
) -> list[SessionFrame]:
    """A continuous fluoroscopy run: ``round(duration_s * fps)`` frames at ``i / fps`` s, segment
    ``"fluoro"``, moving as :func:`fluoro_motion` says, with its wire as each frame's ``instrument``.

    One detector (``"std"``) throughout; ``zoom_at_s``: switch to the zoomed, panned one from that
    time on, which starts a new run (the collimation changes with the zoom).
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps}")
    n = round(duration_s * fps)
    if n < 1:
        raise ValueError(f"{duration_s} s at {fps} frames/s is not one frame")
    times = np.arange(n) / fps
    motion = fluoro_motion(times, seed)
    poses = motion.poses()
    dets = detectors(size)
    frames = []
    for i in range(n):
        zoomed = zoom_at_s is not None and times[i] >= zoom_at_s
        tag = "zoom" if zoomed else "std"
        wire = Instrument(tuple(motion.wire_mm[i, 0]), tuple(motion.wire_mm[i, 1]))
        frames.append(SessionFrame(i, float(times[i]), "fluoro", tag, dets[tag], poses[i], int(zoomed), wire))
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
            foreign_object="random" if fr.instrument is None else fr.instrument,
            run_seed=None if fr.run is None else _RUN_SEEDS + seed * 1000 + fr.run,
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
