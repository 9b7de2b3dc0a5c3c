"""Realistic simulated target X-rays, with the domain shift a real radiograph has (method.md §3, §5).

Shared by the tests, the registration benchmark, the demo and the bag simulator, so that every
one of them registers against the same kind of image. A target is rendered with **Siddon** (the
exact line integrals of the nearest-voxel CT) at the detector's **full** resolution, which is not
what the refinement renders (trilinear, a coarser volume level, a coarser detector), and then:

1. ``foreign_object``: a small dense object that is not in the CT (a K-wire: a cylinder 1 mm
   across and 40-80 mm long, or a screw: 3-5 mm across, 20-40 mm long; randomly oriented,
   centred in the middle 60 % of the field of view at the isocenter's depth, attenuation 10x the
   CT's densest voxel (cortical bone), as steel's) adds its exact line integral.
2. ``blur``: a Gaussian point-spread function (focal spot + detector), sigma in pixels.
3. The line integrals are scaled so that the CT's densest ray is attenuated by
   ``attenuation_range`` nepers, and the transmitted fraction goes through the C-arm's image
   chain, :class:`~xvr_ros.core.sim.appearance.AppearanceModel` (collimator blades or an
   image-intensifier circle with soft edges and leakage, heel ramp, quantum noise, gamma,
   saturation, burned-in text): detector counts as a driver delivers them.

Each effect of each image draws from its own random stream derived from ``seed``
(``numpy.random.SeedSequence([seed, item, effect])``), so the same call gives the same images,
and switching one effect on or off leaves the others as they were.

Continuous fluoroscopy is a **run** of frames through one C-arm setting: ``run_seed`` pins what the
C-arm holds during a run (collimation, exposure setting, gamma, heel ramp, text, focal-spot blur)
so that ``seed`` varies the quantum noise alone, and an :class:`Instrument` fixed in the volume
frame replaces the random object, so one wire can move slowly through the frames.

Poses: :func:`~xvr_ros.core.train.presets.sample_poses` samples them (the one sampler);
:func:`perturb_poses` moves poses as a pose-regression network's error would, in the C-arm frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.imaging import gaussian_blur
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.sim.appearance import AppearanceModel, draw

__all__ = ["REALISTIC", "Instrument", "SimulatedXray", "perturb_poses", "simulate_xray"]

_EFFECTS = ("object", "blur", "appearance")
#: The default image chain: any field of view, noise, gamma, saturation, text.
REALISTIC = AppearanceModel()


@dataclass(frozen=True)
class Instrument:
    """A straight cylinder that is not in the CT (a K-wire, a screw), fixed in the volume frame.

    p0, p1: (3,) the ends of its axis, volume frame, mm. radius: mm.
    density: attenuation relative to the CT's densest voxel (10: steel against cortical bone).
    """

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    radius: float = 0.5
    kind: str = "wire"
    density: float = 10.0

    def __post_init__(self):
        p0, p1 = np.asarray(self.p0, dtype=np.float64), np.asarray(self.p1, dtype=np.float64)
        if p0.shape != (3,) or p1.shape != (3,) or not (np.isfinite(p0).all() and np.isfinite(p1).all()):
            raise ValueError(f"instrument ends must be finite 3-vectors in mm, got {self.p0}, {self.p1}")
        if not np.linalg.norm(p1 - p0) > 0:
            raise ValueError("instrument ends must differ")
        if not (math.isfinite(self.radius) and self.radius > 0 and math.isfinite(self.density) and self.density > 0):
            raise ValueError(f"instrument radius and density must be positive, got {self.radius}, {self.density}")

    def description(self, mu_scale: float) -> dict:
        """What :class:`SimulatedXray` reports of it (``mu``: attenuation per mm)."""
        return {"kind": self.kind, "p0": [float(v) for v in self.p0], "p1": [float(v) for v in self.p1],
                "radius": float(self.radius), "mu": self.density * mu_scale}


@dataclass
class SimulatedXray:
    """Simulated targets.

    counts: (B, 1, H, W) float64 detector counts as a driver delivers them (what a method gets).
    image: (B, 1, H, W) float32 line integrals ``-log(counts / full_scale)`` (counts floored at 0.5).
    fov: (B, 1, H, W) bool, the TRUE field of view (anatomy visible): for scoring only.
    pose: (B, 4, 4) the true camera-to-world poses (mm): for scoring only.
    detector: the detector the images were rendered for.
    params: what was drawn, one entry per image for each key (``blur``, ``foreign_object``,
        ``appearance``).
    """

    counts: torch.Tensor
    image: torch.Tensor
    fov: torch.Tensor
    pose: torch.Tensor
    detector: Detector
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# poses
# --------------------------------------------------------------------------------------------
def perturb_poses(
    T: torch.Tensor, rot_deg: float = 5.0, inplane_mm: float = 15.0, depth_mm: float = 40.0, seed: int = 0
) -> torch.Tensor:
    """Perturb (B, 4, 4) poses uniformly in the C-arm frame, as a pose-regression network errs.

    Rotation: ``R' = R @ Rz(a) Rx(b) Ry(c)`` with each of ``a, b, c`` uniform in ``±rot_deg``:
    a rotation about the C-arm's own axes, pivoting about the isocenter (the rotation is composed
    in the C-arm frame and the C-arm parameters' ``xyz`` are kept, so the isocenter stays put in
    the C-arm frame). Translation: the isocenter moves in the C-arm frame by ``(dx, dy, dz)``:
    ``dx, dz`` (in-plane, perpendicular to the central ray) uniform in ``±inplane_mm`` and ``dy``
    (depth, along the central ray) uniform in ``±depth_mm``; i.e. ``xyz' = xyz + (dx, dy, dz)``.
    """
    if T.dim() == 2:
        T = T[None]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E47]))
    u = torch.from_numpy(rng.random((len(T), 6)) * 2 - 1)
    scale = torch.tensor([rot_deg] * 3 + [inplane_mm, depth_mm, inplane_mm], dtype=torch.float64)
    d = u * scale
    T64 = T.to(torch.float64)
    angles, xyz = carm_parameters(T64)
    dR = carm_pose(d[:, :3], torch.zeros(len(T), 3, dtype=torch.float64), degrees=True)[:, :3, :3]
    R = T64[:, :3, :3] @ dR
    xyz = xyz + d[:, 3:]
    out = torch.eye(4, dtype=torch.float64).repeat(len(T), 1, 1)
    out[:, :3, :3] = R
    out[:, :3, 3] = (R @ xyz[..., None])[..., 0]
    return out.to(T.dtype)


# --------------------------------------------------------------------------------------------
# target images
# --------------------------------------------------------------------------------------------
def _rng(seed: int, item: int, effect: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(item), _EFFECTS.index(effect)]))


def _cylinder_chords(source, target, c0, c1, radius) -> torch.Tensor:
    """Length (mm) of each segment source->target (B, 3), (B, N, 3) inside the finite cylinder
    with axis c0->c1 (B, 3) and ``radius`` (B,). -> (B, N)"""
    axis = c1 - c0
    h = axis.norm(dim=-1, keepdim=True)
    a = axis / h
    d = target - source[:, None]
    L = d.norm(dim=-1)
    u = d / L[..., None]
    w = source - c0  # (B, 3)
    # distance to the axis^2 along p(t) = s + t u: |w_perp + t u_perp|^2 = r^2
    ua = (u * a[:, None]).sum(-1)
    wa = (w * a).sum(-1, keepdim=True)
    u_perp = u - ua[..., None] * a[:, None]
    w_perp = (w - wa * a)[:, None]
    A = (u_perp * u_perp).sum(-1)
    Bq = 2 * (u_perp * w_perp).sum(-1)
    C = (w_perp * w_perp).sum(-1) - radius[:, None] ** 2
    disc = Bq * Bq - 4 * A * C
    hit = (disc > 0) & (A > 1e-12)
    sq = disc.clamp_min(0).sqrt()
    A_safe = torch.where(hit, A, torch.ones_like(A))
    t0 = torch.where(hit, (-Bq - sq) / (2 * A_safe), torch.zeros_like(A))
    t1 = torch.where(hit, (-Bq + sq) / (2 * A_safe), torch.zeros_like(A))
    # slab 0 <= (p - c0) . a <= h  ->  wa + t ua in [0, h]
    ua_safe = torch.where(ua.abs() > 1e-12, ua, torch.full_like(ua, 1e-12))
    s0 = (0 - wa) / ua_safe
    s1 = (h - wa) / ua_safe
    lo = torch.maximum(torch.maximum(t0, torch.minimum(s0, s1)), torch.zeros_like(t0))
    hi = torch.minimum(torch.minimum(t1, torch.maximum(s0, s1)), L)
    return torch.where(hit, (hi - lo).clamp_min(0.0), torch.zeros_like(A))


def _foreign_object(kind, rng, pose, detector, mu_scale):
    """Place a wire or screw visibly in the field of view; returns its description."""
    if kind == "random":
        kind = "wire" if rng.random() < 0.5 else "screw"
    if kind not in ("wire", "screw"):
        raise ValueError(f"foreign_object must be None, 'wire', 'screw' or 'random', got {kind!r}")
    if kind == "wire":
        radius, length = 0.5, draw(rng, (40.0, 80.0))
    else:
        radius, length = draw(rng, (1.5, 2.5)), draw(rng, (20.0, 40.0))
    # Centre: on the ray through a random point of the central 60 % of the detector, at the
    # isocenter's distance from the source.
    u, v = (rng.random(2) * 0.6 + 0.2) * np.array([detector.width, detector.height])
    pts = detector.pixel_points(torch.float64)
    H, W = detector.height, detector.width
    pix = pts.reshape(H, W, 3)[min(int(v), H - 1), min(int(u), W - 1)]
    T = pose.to(torch.float64)
    src = T[:3, 3]
    ray = (T[:3, :3] @ pix) / pix.norm()
    centre = src + ray * src.norm()
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    half = torch.from_numpy(direction) * length / 2
    return {
        "kind": kind,
        "p0": (centre - half).tolist(),
        "p1": (centre + half).tolist(),
        "radius": radius,
        "mu": 10.0 * mu_scale,
    }


def _renderer(volume: Volume | Renderer) -> Renderer:
    if isinstance(volume, Renderer):
        if volume.method != "siddon":
            raise ValueError("simulate_xray renders with Siddon: pass a Renderer(method='siddon') or a Volume")
        return volume
    if isinstance(volume, Volume):
        return Renderer(volume, method="siddon")
    raise TypeError(f"volume must be a Volume or a Siddon Renderer, got {type(volume).__name__}")


def add_foreign_object(lines, kind, rng, pose, detector, mu_scale):
    """(H, W) line integrals with a wire or screw's exact chord added -> (lines, description)."""
    obj = _foreign_object(kind, rng, pose, detector, mu_scale)
    return _add_cylinder(lines, obj, pose, detector), obj


def _add_cylinder(lines, obj: dict, pose, detector):
    """(H, W) line integrals + ``obj["mu"]`` x the chord of the cylinder ``obj`` describes."""
    src, tgt = detector.rays(pose[None].to(torch.float64))
    ends = torch.tensor([obj["p0"], obj["p1"]], dtype=torch.float64)
    chord = _cylinder_chords(src, tgt, ends[:1], ends[1:], torch.tensor([obj["radius"]], dtype=torch.float64))
    return lines + obj["mu"] * chord.reshape(lines.shape)


def simulate_xray(
    volume: Volume | Renderer,
    pose: torch.Tensor,
    detector: Detector,
    *,
    seed: int = 0,
    appearance: AppearanceModel | None = REALISTIC,
    attenuation_range: float = 4.0,
    blur=(0.3, 1.0),
    foreign_object: str | Instrument | None = "random",
    run_seed: int | None = None,
) -> SimulatedXray:
    """Render target X-rays at ``pose`` (B, 4, 4) as a C-arm delivers them (see the module docstring).

    Args:
        volume: the CT, or a Siddon :class:`~xvr_ros.core.render.renderer.Renderer` of it (reuse one
            across calls to skip the set-up).
        pose: (B, 4, 4) or (4, 4) true poses, mm.
        detector: rendered at its full resolution.
        seed: the images are a deterministic function of ``seed`` and the arguments.
        appearance: the image chain; None = an ideal detector (noise-free counts, full field).
        attenuation_range: nepers of the CT's densest ray.
        blur: PSF sigma in pixels, a number or a ``(lo, hi)`` range; None = no blur.
        foreign_object: None, ``"wire"``, ``"screw"``, ``"random"`` (one of the two, placed in the
            field of each image) or an :class:`Instrument` (the same object in every image).
        run_seed: None, or a fluoroscopy run: every image made with the same ``run_seed`` has the
            same collimation, exposure setting, gamma, heel ramp, text and blur, and ``seed`` draws
            only the quantum noise (and a random ``foreign_object``).

    Returns:
        :class:`SimulatedXray`, every tensor (B, 1, H, W).

    """
    renderer = _renderer(volume)
    if pose.dim() == 2:
        pose = pose[None]
    if pose.shape[-2:] != (4, 4) or not bool(torch.isfinite(pose).all()):
        raise ValueError(f"pose must be finite (B, 4, 4), got shape {tuple(pose.shape)}")
    if not isinstance(foreign_object, Instrument) and foreign_object not in (None, "wire", "screw", "random"):
        raise ValueError(f"foreign_object must be None, 'wire', 'screw' or 'random', got {foreign_object!r}")
    with torch.no_grad():
        lines = renderer(pose.to(renderer.dtype), detector).sum(dim=1).to(torch.float64)  # (B, H, W)
    mu_scale = float(renderer.volume.data.max())
    counts, fovs = [], []
    params: dict[str, list] = {"foreign_object": [], "blur": [], "appearance": []}
    for b in range(len(pose)):
        img = lines[b]
        # The CT's own densest ray sets the exposure, so an object changes the image only where it is.
        top = float(img.max())
        scale = attenuation_range / (top if top > 0 else 1.0)
        obj = None
        if isinstance(foreign_object, Instrument):
            obj = foreign_object.description(mu_scale)
            img = _add_cylinder(img, obj, pose[b], detector)
        elif foreign_object:
            img, obj = add_foreign_object(img, foreign_object, _rng(seed, b, "object"), pose[b], detector, mu_scale)
        setting = (seed, b) if run_seed is None else (run_seed, 0)
        sigma = draw(_rng(*setting, "blur"), blur) if blur else 0.0
        if sigma > 0:
            img = gaussian_blur(img[None, None], sigma)[0, 0]
        transmission = np.exp(-scale * img.clamp_min(0).numpy())
        if appearance is None:
            out = transmission * REALISTIC.full_scale
            fov, drawn = np.ones(out.shape, dtype=bool), None
        else:
            fixed = None if run_seed is None else _rng(run_seed, 0, "appearance")
            degraded = appearance.apply(transmission, detector, _rng(seed, b, "appearance"), fixed)
            out, fov, drawn = degraded.counts, degraded.fov, degraded.params
        counts.append(torch.from_numpy(out))
        fovs.append(torch.from_numpy(fov))
        params["foreign_object"].append(obj)
        params["blur"].append(sigma)
        params["appearance"].append(drawn)
    counts = torch.stack(counts)[:, None]
    full_scale = REALISTIC.full_scale if appearance is None else appearance.full_scale
    return SimulatedXray(
        counts=counts,
        image=(-torch.log(counts.clamp_min(0.5) / full_scale)).to(torch.float32),
        fov=torch.stack(fovs)[:, None],
        pose=pose.clone(),
        detector=detector,
        params=params,
    )
