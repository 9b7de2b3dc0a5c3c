"""Realistic simulated target X-rays, with the domain shift a real radiograph has (method.md §3, §5).

Shared by the tests, the registration benchmark, the demo and the bag simulator, so that every
one of them registers against the same kind of image. A target is rendered with **Siddon** (the
exact line integrals of the nearest-voxel CT) at the detector's **full** resolution, which is not
what the refinement renders (trilinear, a coarser volume level, a coarser detector), and is then
degraded in the order the physics applies:

1. ``foreign_object``: a small dense object that is not in the CT (a K-wire: a cylinder 1 mm
   across and 40-80 mm long, or a screw: 3-5 mm across, 20-40 mm long; randomly oriented,
   centred in the middle 60 % of the field of view at the isocenter's depth, attenuation 3x the
   CT's densest voxel, i.e. metal) adds its exact line integral.
2. ``blur``: a Gaussian point-spread function (focal spot + detector), sigma in pixels.
3. ``photons``: quantum noise. The line integrals are scaled so that the CT's densest ray
   transmits ``exp(-attenuation_range)`` of the beam; counts ``~ Poisson(photons * exp(-I))`` per
   pixel are then log-transformed back and rescaled (so the image stays in line-integral-like
   units).
4. ``gamma`` / ``contrast`` / ``offset`` / ``background``: the detector and display chain. The
   image, normalised by the CT's densest ray, is raised to ``gamma``, a smooth linear ramp of
   amplitude ``background`` in a random direction is added (heel effect, scatter), then it is
   multiplied by ``contrast`` and offset. Only the ``gamma`` and the ramp are not affine
   intensity changes, and every step is increasing, so a denser ray stays brighter.
5. ``collimation``: a random straight edge (``"edge"``) or a slightly rotated rectangle
   (``"rectangle"``): pixels outside are set to 0 and returned as invalid in ``valid_mask``.

Every range ``(lo, hi)`` is sampled uniformly per image. Each effect of each image draws from its
own random stream derived from ``seed`` (``numpy.random.SeedSequence([seed, item, effect])``), so
the same call gives the same images, and switching one effect on or off leaves the others as
they were.

Poses: :func:`random_carm_poses` samples C-arm parameters uniformly (Eq. 25);
:func:`perturb_poses` moves poses as a pose-regression network's error would, in the C-arm frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render.renderer import Renderer

__all__ = ["CHEST_RANGES", "SimulatedXray", "perturb_poses", "random_carm_poses", "simulate_xray"]

#: C-arm parameter ranges (degrees, mm) of chest views around AP on the demo CT.
CHEST_RANGES = {
    "alpha": (-30.0, 30.0),
    "beta": (-15.0, 15.0),
    "gamma": (-10.0, 10.0),
    "x": (-30.0, 30.0),
    "y": (750.0, 950.0),
    "z": (-30.0, 30.0),
}

_EFFECTS = ("object", "blur", "noise", "intensity", "collimation")


@dataclass
class SimulatedXray:
    """Simulated targets.

    image: (B, 1, H, W) float32 line-integral-like intensities (0 where collimated).
    valid_mask: (B, 1, H, W) bool, False where the collimator blocks the beam.
    pose: (B, 4, 4) the true camera-to-world poses (mm).
    detector: the detector the images were rendered for.
    params: what was drawn, one entry per image for each key (``gamma``, ``contrast``,
        ``offset``, ``photons``, ``blur``, ``background``, ``collimation``, ``foreign_object``).
    """

    image: torch.Tensor
    valid_mask: torch.Tensor
    pose: torch.Tensor
    detector: Detector
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# poses
# --------------------------------------------------------------------------------------------
def random_carm_poses(
    n: int, ranges: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``n`` poses with C-arm parameters uniform in ``ranges`` -> (n, 4, 4).

    ``ranges`` maps ``alpha, beta, gamma`` (degrees) and ``x, y, z`` (mm; y = source-to-isocenter
    distance) to ``(lo, hi)``; missing keys take :data:`CHEST_RANGES`.
    """
    r = {**CHEST_RANGES, **(ranges or {})}
    unknown = set(r) - set(CHEST_RANGES)
    if unknown:
        raise ValueError(f"unknown C-arm parameter(s) {sorted(unknown)}; expected {list(CHEST_RANGES)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9053]))
    keys = list(CHEST_RANGES)
    lo = np.array([r[k][0] for k in keys], dtype=np.float64)
    hi = np.array([r[k][1] for k in keys], dtype=np.float64)
    p = torch.from_numpy(lo + (hi - lo) * rng.random((int(n), 6)))
    return carm_pose(p[:, :3], p[:, 3:], degrees=True).to(dtype)


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


def _draw(rng: np.random.Generator, value, u: float | None = None) -> float:
    """A number, or uniform in a (lo, hi) range (using ``u`` in [0, 1) if given)."""
    if isinstance(value, (tuple, list)):
        lo, hi = float(value[0]), float(value[1])
        return lo + (hi - lo) * (float(rng.random()) if u is None else u)
    return float(value)


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
        radius, length = 0.5, _draw(rng, (40.0, 80.0))
    else:
        radius, length = _draw(rng, (1.5, 2.5)), _draw(rng, (20.0, 40.0))
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
        "mu": 3.0 * mu_scale,
    }


def _collimation_mask(kind, rng, H, W) -> tuple[np.ndarray, dict]:
    """(H, W) bool, True where the beam passes."""
    if kind == "random":
        kind = "edge" if rng.random() < 0.5 else "rectangle"
    yy, xx = np.meshgrid(np.arange(H) + 0.5 - H / 2, np.arange(W) + 0.5 - W / 2, indexing="ij")
    if kind == "edge":
        theta = rng.random() * 2 * math.pi
        fraction = _draw(rng, (0.05, 0.3))
        s = np.cos(theta) * xx + np.sin(theta) * yy
        cut = np.quantile(s, 1 - fraction)
        return s <= cut, {"kind": "edge", "angle_deg": math.degrees(theta), "fraction": fraction}
    if kind == "rectangle":
        phi = math.radians(_draw(rng, (-10.0, 10.0)))
        m = rng.random(4) * 0.12 + 0.03  # margins: left, right, top, bottom (fraction of size)
        a = np.cos(phi) * xx + np.sin(phi) * yy
        b = -np.sin(phi) * xx + np.cos(phi) * yy
        keep = (a >= -W / 2 + m[0] * W) & (a <= W / 2 - m[1] * W) & (b >= -H / 2 + m[2] * H) & (b <= H / 2 - m[3] * H)
        return keep, {"kind": "rectangle", "angle_deg": math.degrees(phi), "margins": m.tolist()}
    raise ValueError(f"collimation must be None, 'edge', 'rectangle' or 'random', got {kind!r}")


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=img.dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    x = F.pad(img[None, None], (r, r, r, r), mode="replicate")
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return x[0, 0]


def simulate_xray(
    volume: Volume | Renderer,
    pose: torch.Tensor,
    detector: Detector,
    *,
    seed: int = 0,
    gamma=(0.8, 1.25),
    contrast=(0.5, 2.0),
    offset=(-0.5, 0.5),
    photons=(3e3, 3e4),
    attenuation_range: float = 5.0,
    blur=(0.3, 1.0),
    background=(0.0, 0.1),
    collimation: str | None = "random",
    foreign_object: str | None = "random",
) -> SimulatedXray:
    """Render target X-rays at ``pose`` (B, 4, 4) with domain shift (see the module docstring).

    Args:
        volume: the CT, or a Siddon :class:`~xvr_ros.core.render.renderer.Renderer` of it (reuse one
            across calls to skip the set-up).
        pose: (B, 4, 4) or (4, 4) true poses, mm.
        detector: rendered at its full resolution.
        seed: the images are a deterministic function of ``seed`` and the arguments.
        gamma, contrast, offset, photons, blur, background: a number or a ``(lo, hi)`` range;
            ``offset`` is in units of the image maximum; ``photons=None`` or 0 means no noise;
            ``blur`` is the PSF sigma in pixels; ``background`` the ramp amplitude (fraction of
            the image range).
        attenuation_range: the densest ray's line integral in nepers, for the noise model.
        collimation: None, ``"edge"``, ``"rectangle"`` or ``"random"`` (one of the two).
        foreign_object: None, ``"wire"``, ``"screw"`` or ``"random"`` (one of the two).

    Returns:
        :class:`SimulatedXray` with float32 ``image`` and bool ``valid_mask``, both (B, 1, H, W).

    """
    if isinstance(volume, Renderer):
        renderer = volume
        if renderer.method != "siddon":
            raise ValueError("simulate_xray renders with Siddon: pass a Renderer(method='siddon') or a Volume")
    elif isinstance(volume, Volume):
        renderer = Renderer(volume, method="siddon")
    else:
        raise TypeError(f"volume must be a Volume or a Siddon Renderer, got {type(volume).__name__}")
    if pose.dim() == 2:
        pose = pose[None]
    if pose.shape[-2:] != (4, 4) or not bool(torch.isfinite(pose).all()):
        raise ValueError(f"pose must be finite (B, 4, 4), got shape {tuple(pose.shape)}")
    B, H, W = len(pose), detector.height, detector.width
    with torch.no_grad():
        lines = renderer(pose.to(renderer.dtype), detector).sum(dim=1).to(torch.float64)  # (B, H, W)
    mu_scale = float(renderer.volume.data.max())

    images, masks = [], []
    keys = ("foreign_object", "blur", "photons", "gamma", "contrast", "offset", "background", "collimation")
    params: dict[str, list] = {k: [] for k in keys}
    for b in range(B):
        img = lines[b].clone()
        # The CT's own densest ray sets the scale of the noise model and the intensity chain, so
        # that adding an object changes the image only where the object is.
        top = float(img.max())
        scale = top if top > 0 else 1.0
        # 1. foreign object (exact line integral of a cylinder)
        obj = None
        if foreign_object:
            obj = _foreign_object(foreign_object, _rng(seed, b, "object"), pose[b], detector, mu_scale)
            src, tgt = detector.rays(pose[b : b + 1].to(torch.float64))
            ends = torch.tensor([obj["p0"], obj["p1"]], dtype=torch.float64)
            radius = torch.tensor([obj["radius"]], dtype=torch.float64)
            chord = _cylinder_chords(src, tgt, ends[:1], ends[1:], radius)
            img = img + obj["mu"] * chord.reshape(H, W)
        params["foreign_object"].append(obj)
        # 2. point-spread function
        sigma = _draw(_rng(seed, b, "blur"), blur) if blur else 0.0
        img = _gaussian_blur(img, sigma)
        params["blur"].append(sigma)
        # 3. quantum noise
        rng = _rng(seed, b, "noise")
        n0 = _draw(rng, photons) if photons else 0.0
        if n0 > 0:
            k = attenuation_range / scale
            counts = rng.poisson(n0 * np.exp(-k * img.numpy()))
            img = -torch.from_numpy(np.log(np.maximum(counts, 1.0) / n0)) / k
        params["photons"].append(n0)
        # 4. detector / display chain
        rng = _rng(seed, b, "intensity")
        u = rng.random(5)  # always drawn, so that fixing one parameter leaves the others as they were
        g, c, o, bg = (
            _draw(rng, v, u[i]) if v is not None else d
            for i, (v, d) in enumerate(((gamma, 1.0), (contrast, 1.0), (offset, 0.0), (background, 0.0)))
        )
        x = (img.clamp_min(0) / scale) ** g
        if bg:
            theta = u[4] * 2 * math.pi
            yy, xx = torch.meshgrid(
                torch.linspace(-1, 1, H, dtype=x.dtype), torch.linspace(-1, 1, W, dtype=x.dtype), indexing="ij"
            )
            x = x + bg * (math.cos(theta) * xx + math.sin(theta) * yy) / 2
        img = (c * x + o) * scale
        params["gamma"].append(g)
        params["contrast"].append(c)
        params["offset"].append(o)
        params["background"].append(bg)
        # 5. collimation
        keep = np.ones((H, W), dtype=bool)
        coll = None
        if collimation:
            keep, coll = _collimation_mask(collimation, _rng(seed, b, "collimation"), H, W)
        params["collimation"].append(coll)
        keep_t = torch.from_numpy(keep)
        img = torch.where(keep_t, img, torch.zeros_like(img))
        images.append(img.to(torch.float32))
        masks.append(keep_t)
    return SimulatedXray(
        image=torch.stack(images)[:, None],
        valid_mask=torch.stack(masks)[:, None],
        pose=pose.clone(),
        detector=detector,
        params=params,
    )
