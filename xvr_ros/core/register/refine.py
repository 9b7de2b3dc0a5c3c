"""Intraoperative pose refinement (method.md §5): coarse-to-fine gradient ascent of image similarity.

Given a pose estimate (from the pose-regression network), maximise the similarity between the
X-ray and a DRR rendered at the pose, by autodiff through the renderer:

- **Parameterisation.** ``"euler_zxy"`` (default, as xvr): the C-arm parameters of Eq. 25,
  Euler ZXY angles (rad) + ``xyz`` (mm, y = depth). A change of the angles turns the C-arm about
  the world origin (the volume's isocenter) and ``xyz`` moves the isocenter in the C-arm frame
  (x, z in-plane, y along the central ray), so rotation and translation are nearly decoupled.
  ``"se3"``: a local twist ``T = T0 @ P @ se3_exp(xi) @ P^-1`` with ``P`` the translation to the
  volume's isocenter in the C-arm frame (pivoting about the source instead would couple a small
  rotation to a large in-plane shift of the anatomy).
- **Optimiser.** Adam (maximising), separate learning rates for rotation (rad) and translation
  (mm), the depth (along the central ray) ``depth_lr_factor`` times faster; reduce-on-plateau
  x0.1 (``patience`` iterations without a relative improvement of ``threshold``). Each batch item
  has its own learning rates and plateau counters, so items are independent; a finished item is
  frozen while the others go on.
- **Coarse-to-fine.** The X-ray is average-pooled by each factor of ``scales`` in turn (coarsest
  first) and rendered on ``detector.scaled(f)``: the same physical detector with fewer, larger
  pixels, so the X-ray's own intrinsics (size, spacing, principal point, SDD) are kept at every
  scale. The renderer picks a volume level matched to each scale's pixel footprint, so coarse
  iterations are cheap. A coarse scale ends at its first plateau (or after
  ``iterations_per_scale``); the next scale restarts from the best pose seen, with the learning
  rates divided by ``lr_decay`` and fresh Adam moments. At the finest scale each plateau divides
  the learning rates by 10 and the item stops after ``max_plateaus`` of them.
- **Stopping.** ``max_plateaus`` at the finest scale (``converged=True``), ``max_iterations`` in
  all, ``time_budget`` seconds, or ``callback`` returning True. The returned pose is the best one
  seen at the last scale reached, never worse (by the similarity) than where that scale started.

Why the defaults (chosen by measurement with ``bench/bench_register.py``; its output and the
README hold the figures):

- ``threshold=1e-5`` (xvr: 1e-4) is the choice that matters. Depth is the weak axis (the
  magnification changes by only 1/d per mm, d the source-to-isocenter distance), so with 1e-4 the
  finest scale often stops before the depth has converged; 1e-6 gains nothing and costs iterations.
- ``scales="auto"``: 16, 32, 64 then 96 px on the long side (~3 mm pixels on a 300 mm
  detector). Coarse iterations are cheap; a finer last scale costs more per iteration (more rays,
  and the renderer then needs a finer CT level: 128 px costs about twice 96 px) for no measurable
  gain, and starting at 32 px loses accuracy for the same time.
- ``similarity="auto"``, ``sigma=1``: ``"mncc+gncc"`` at the coarse scales, where its wide capture
  range matters, and gradient NCC alone at the finest scale, where the depth is decided. There
  mNCC is nearly flat in depth and biased by the non-affine intensity shifts of a real image
  (heel ramp, leakage, scatter): on collimated views its maximum lay mm from the truth. Where the
  finest scale pools 2 or more pixels per side (any X-ray of more than 192 px) the gradient NCC
  goes unsmoothed: the pooling has averaged the noise, and without the smoothing it is about
  twice as sharp in depth; on a barely pooled image (128 px) it would be bumpy and stop in a bump.
- ``lr_rot=0.08`` rad, ``lr_xyz=8`` mm at the coarsest scale, ``lr_decay=4``: an Adam step is
  about one learning rate whatever the gradient, so the coarse scales (pixels of 10-20 mm) take
  steps to match and cross a 50 mm depth error in a few iterations, while the finest of four
  scales keeps steps of 0.07° and 0.125 mm. ``depth_lr_factor=4``: the coarse scales see the
  magnification poorly and hand the finest scale depth errors of several mm, which steps of
  0.125 mm did not cover before the (flat) similarity stopped improving; the depth therefore
  moves 4 times faster than the in-plane translation at every scale.
  ``patience=5``, ``max_plateaus=2`` at the finest
  scale: smaller patience or a single plateau fails more often, larger costs time for little gain.
  ``parameterization="se3"`` and a float64 similarity give the same accuracy.

Invalid input (shapes, NaN, an empty mask) raises ``ValueError``; a poor result never raises: it
comes back with ``converged=False`` and a ``message``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xvr_ros.core.geometry import (
    Detector,
    carm_parameters,
    carm_pose,
    invert,
    make_pose,
)
from xvr_ros.core.register import similarity as sim_mod
from xvr_ros.core.render.renderer import render_scored
from xvr_ros.core.rotations import se3_exp

__all__ = [
    "COARSE_SIMILARITY", "FINEST_SIMILARITY", "LEVEL_SIZES", "PARAMETERIZATIONS", "RefineResult", "auto_scales",
    "UNSMOOTHED_FROM_FACTOR", "depth_gain", "finest_similarity", "intra_op_threads", "pyramid", "refine",
]

PARAMETERIZATIONS = ("euler_zxy", "se3")

#: ``scales="auto"``: the image's long side at each level, coarsest first (see the module docstring).
LEVEL_SIZES: tuple[int, ...] = (16, 32, 64, 96)


def auto_scales(detector: Detector, sizes: Sequence[int] = LEVEL_SIZES) -> tuple[float, ...]:
    """Downsampling factors (coarsest first) that bring the detector's long side to ``sizes``
    pixels; never finer than full resolution. A 256 px image gives (16, 8, 4, 8/3)."""
    side = max(detector.height, detector.width)
    factors: list[float] = []
    for size in sizes:
        f = max(1.0, side / float(size))
        if not factors or f < factors[-1]:
            factors.append(f)
    return tuple(factors)


#: ``similarity="auto"``: at every scale but the finest, and at the finest (see the module docstring).
COARSE_SIMILARITY = "mncc+gncc"
FINEST_SIMILARITY = "gncc"
#: ``similarity="auto"`` leaves out the smoothing at a finest scale that pools at least this many
#: pixels per side: the pooling has averaged the noise already.
UNSMOOTHED_FROM_FACTOR = 2.0


def depth_gain(detector: Detector, factor: float) -> torch.Tensor:
    """(3,) multiplier of the translation rate per C-arm axis: ``factor`` along the central ray
    (y of the C-arm frame for the ``"AP"`` orientation), 1 across it."""
    ray = detector.reorient(torch.float64)[:3, 2].abs()  # the detector frame's z (the central ray) in the C-arm frame
    return 1.0 + (factor - 1.0) * ray


@dataclass
class RefineResult:
    """What :func:`refine` found.

    pose: (B, 4, 4) refined camera-to-world poses (mm), same dtype as ``init_pose``.
    init_pose: (B, 4, 4) the starting poses.
    similarity: (B,) similarity of ``pose`` at the finest scale (higher is better, max 1); NaN
        if the time budget ran out before that could be evaluated.
    trajectory: one (B,) tensor of similarities per iteration (at that iteration's scale).
    trajectory_scale: the scale factor of each trajectory entry.
    iterations: number of iterations run (renders with a backward pass).
    time_per_scale: seconds spent at each scale factor.
    scales: the scale factors used, coarsest first.
    converged: (B,) bool, True if the item stopped on its plateau criterion at the finest scale.
    message: a one-line summary (why it stopped).
    """

    pose: torch.Tensor
    init_pose: torch.Tensor
    similarity: torch.Tensor
    trajectory: list[torch.Tensor] = field(default_factory=list)
    trajectory_scale: list[float] = field(default_factory=list)
    iterations: int = 0
    time_per_scale: dict[float, float] = field(default_factory=dict)
    scales: tuple[float, ...] = ()
    converged: torch.Tensor | None = None
    message: str = ""

    @property
    def seconds(self) -> float:
        return float(sum(self.time_per_scale.values()))


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _check_inputs(xray, detector, init_pose, mask, scales, parameterization):
    if not isinstance(detector, Detector):
        raise ValueError(f"detector must be a geometry.Detector, got {type(detector).__name__}")
    if not isinstance(xray, torch.Tensor) or xray.dim() != 4 or xray.shape[1] != 1:
        raise ValueError(f"xray must be a (1 or B, 1, H, W) tensor, got {getattr(xray, 'shape', type(xray))}")
    if tuple(xray.shape[-2:]) != detector.shape:
        raise ValueError(f"xray is {tuple(xray.shape[-2:])} pixels but the detector is {detector.shape}")
    if not isinstance(init_pose, torch.Tensor) or init_pose.shape[-2:] != (4, 4) or init_pose.dim() not in (2, 3):
        raise ValueError(f"init_pose must be a (B, 4, 4) tensor, got {getattr(init_pose, 'shape', type(init_pose))}")
    if init_pose.dim() == 2:
        init_pose = init_pose[None]
    B = len(init_pose)
    if B == 0:
        raise ValueError("init_pose is empty")
    if xray.shape[0] not in (1, B):
        raise ValueError(f"xray batch {xray.shape[0]} must be 1 or the number of poses {B}")
    if not bool(torch.isfinite(xray).all()):
        raise ValueError("xray contains NaN or infinite values")
    if not bool(torch.isfinite(init_pose).all()):
        raise ValueError("init_pose contains NaN or infinite values")
    R = init_pose[..., :3, :3].to(torch.float64)
    ortho = (R.transpose(-1, -2) @ R - torch.eye(3, dtype=torch.float64)).abs().amax()
    if ortho > 1e-3 or bool((torch.linalg.det(R) < 0).any()):
        raise ValueError("init_pose must hold rigid transforms (orthonormal rotation, det +1)")
    if mask is not None:
        shape_ok = isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1
        if not shape_ok or tuple(mask.shape[-2:]) != detector.shape:
            got = getattr(mask, "shape", type(mask))
            raise ValueError(f"mask must be (1 or B, 1, {detector.height}, {detector.width}), got {got}")
        if mask.shape[0] not in (1, B):
            raise ValueError(f"mask batch {mask.shape[0]} must be 1 or the number of poses {B}")
        if mask.dtype != torch.bool and not bool(torch.isfinite(mask).all()):
            raise ValueError("mask contains NaN or infinite values")
        if not bool((mask.flatten(1) > 0).any(dim=1).all()):
            raise ValueError("mask is empty (no valid pixel) for at least one image")
    if isinstance(scales, str):
        if scales != "auto":
            raise ValueError(f"scales must be 'auto' or a sequence of downsampling factors, got {scales!r}")
        scales = auto_scales(detector)
    try:
        scales = tuple(float(s) for s in scales)
    except TypeError:
        raise ValueError(f"scales must be a sequence of downsampling factors, got {scales!r}") from None
    if not scales or not all(math.isfinite(s) and s >= 1 for s in scales):
        raise ValueError(f"scales must be downsampling factors >= 1, got {scales!r}")
    if any(b >= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales must be strictly decreasing (coarsest first), got {scales!r}")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    return init_pose, scales


def pyramid(xray: torch.Tensor, mask: torch.Tensor | None, detector: Detector, factor: float):
    """The X-ray (and mask) at one scale: (image (B, 1, h, w), mask (B|1, 1, h, w) or None, detector).

    Pixels are averaged over the valid pixels they cover; a coarse pixel is valid only if all
    the pixels it covers are (a collimator edge inside it would corrupt its value).
    """
    if factor == 1:
        return xray, mask, detector
    det = detector.scaled(factor)
    size = (det.height, det.width)
    if mask is None:
        return F.adaptive_avg_pool2d(xray, size), None, det
    w = (mask > 0).to(xray.dtype)
    num = F.adaptive_avg_pool2d(torch.where(w > 0, xray, torch.zeros_like(xray)) * w, size)
    den = F.adaptive_avg_pool2d(w, size)
    img = num / den.clamp_min(1e-12)
    return img, den > 1 - 1e-6, det


def _per_scale(value, n: int, name: str) -> list:
    """One value for every scale, or a sequence with one per scale."""
    if value is None or isinstance(value, (int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} scales")
    return values


def _similarities(similarity, sigma: float, scales: tuple[float, ...]) -> list[Callable]:
    """One similarity function per scale; ``"auto"`` = ``COARSE_SIMILARITY``, then ``FINEST_SIMILARITY``,
    unsmoothed where the finest scale pools by at least ``UNSMOOTHED_FROM_FACTOR``."""
    n_scales = len(scales)
    if isinstance(similarity, str) and similarity == "auto":
        finest_sigma = 0.0 if scales[-1] >= UNSMOOTHED_FROM_FACTOR else sigma
        coarse = [sim_mod.get(COARSE_SIMILARITY, sigma=sigma)] * (n_scales - 1)
        return coarse + [sim_mod.get(FINEST_SIMILARITY, sigma=finest_sigma)]
    sims = list(similarity) if isinstance(similarity, (list, tuple)) else [similarity] * n_scales
    if len(sims) != n_scales:
        raise ValueError(f"{len(sims)} similarities for {n_scales} scales")
    return [sim_mod.get(s, sigma=sigma) if s in ("gncc", "gradncc", "mncc+gncc") else sim_mod.get(s) for s in sims]


def finest_similarity(factor: float, sigma: float = 1.0) -> Callable:
    """The similarity ``similarity="auto"`` scores a finest scale of downsampling ``factor`` with."""
    return _similarities("auto", sigma, (float(factor),))[-1]


def _check_options(scales, similarity, sigma, iterations_per_scale, threshold, lr_rot, lr_xyz, lr_decay, time_budget,
                   depth_lr_factor):
    """Validate the optimiser's options; return the similarity functions, iteration caps and thresholds per scale."""
    sims = _similarities(similarity, sigma, scales)
    n_scales = len(scales)
    caps = _per_scale(iterations_per_scale, n_scales, "iterations_per_scale")
    thresholds = _per_scale(threshold, n_scales, "threshold")
    if not all(math.isfinite(t) and t >= 0 for t in thresholds):
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    rates = (("lr_rot", lr_rot), ("lr_xyz", lr_xyz), ("lr_decay", lr_decay), ("depth_lr_factor", depth_lr_factor))
    for name, v in rates:
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive, got {v}")
    if time_budget is not None and not time_budget >= 0:
        raise ValueError(f"time_budget must be >= 0 seconds, got {time_budget}")
    return sims, caps, thresholds


# --------------------------------------------------------------------------------------------
# parameterisations
# --------------------------------------------------------------------------------------------
class _Params:
    """Rotation (rad) and translation (mm) tensors (B, 3) <-> poses (B, 4, 4), float64."""

    def __init__(self, init: torch.Tensor, parameterization: str, isocenter: torch.Tensor):
        self.kind = parameterization
        T0 = init.to(torch.float64)
        if parameterization == "euler_zxy":
            rot, xyz = carm_parameters(T0)
            self.rot, self.xyz = rot.clone(), xyz.clone()
        else:
            self.T0 = T0
            # The isocenter in each C-arm frame: pivot of the twist.
            c = (invert(T0)[:, :3, :3] @ isocenter.to(torch.float64)[:, None])[..., 0] + invert(T0)[:, :3, 3]
            eye = torch.eye(3, dtype=torch.float64).expand(len(T0), 3, 3)
            self.P, self.Pinv = make_pose(eye, c), make_pose(eye, -c)
            self.rot = torch.zeros(len(T0), 3, dtype=torch.float64)
            self.xyz = torch.zeros(len(T0), 3, dtype=torch.float64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.rot, self.xyz]

    def pose(self, rot: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        if self.kind == "euler_zxy":
            return carm_pose(rot, xyz)
        return self.T0 @ self.P @ se3_exp(torch.cat([xyz, rot], dim=-1)) @ self.Pinv


# --------------------------------------------------------------------------------------------
# the optimiser's pieces
# --------------------------------------------------------------------------------------------
class _Adam:
    """Adam ascent (maximising) with a learning rate and a step count per batch item.

    ``lr`` is (B, 2): rotation (rad) and translation (mm) rates. ``xyz_gain`` (3,) multiplies the
    translation rate per C-arm axis (the depth axis moves faster). Inactive items neither move nor
    update their moments.
    """

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, params: _Params, lr_rot: float, lr_xyz: float, xyz_gain: torch.Tensor):
        B = len(params.rot)
        self.lr = torch.tensor([lr_rot, lr_xyz], dtype=torch.float64).expand(B, 2).clone()
        self.gain = [torch.ones(3, dtype=torch.float64), xyz_gain.to(torch.float64)]
        self.restart(params)

    def restart(self, params: _Params) -> None:
        """Fresh moments and step counts (a new scale is a new objective)."""
        self.m = [torch.zeros_like(p) for p in params.tensors()]
        self.v = [torch.zeros_like(p) for p in params.tensors()]
        self.steps = torch.zeros(len(params.rot), dtype=torch.long)

    def ascend(self, params: _Params, grads: list[torch.Tensor], active: torch.Tensor) -> None:
        """One step up ``grads`` (float64 (B, 3) each, like ``params.tensors()``) for the active items."""
        b1, b2 = self.betas
        self.steps = self.steps + active.long()
        t = self.steps.clamp_min(1).to(torch.float64)[:, None]
        a = active[:, None]
        for k, (p, g) in enumerate(zip(params.tensors(), grads)):
            g = torch.nan_to_num(g.to(torch.float64))
            self.m[k] = torch.where(a, b1 * self.m[k] + (1 - b1) * g, self.m[k])
            self.v[k] = torch.where(a, b2 * self.v[k] + (1 - b2) * g * g, self.v[k])
            mhat = self.m[k] / (1 - b1**t)
            vhat = self.v[k] / (1 - b2**t)
            update = self.lr[:, k : k + 1] * self.gain[k] * mhat / (vhat.sqrt() + self.eps)
            p += torch.where(a, update, torch.zeros_like(update))


class _Items:
    """Per-item progress at the current scale: best similarity and parameters, plateau counters.

    An item is *done* once it stopped on the plateau criterion at the finest scale, *failed* once
    its similarity or gradient was not finite, and *ready* once it plateaued at a coarse scale
    (it then waits for the others before the next scale).
    """

    def __init__(self, params: _Params):
        B = len(params.rot)
        self.done = torch.zeros(B, dtype=torch.bool)
        self.failed = torch.zeros(B, dtype=torch.bool)
        self.ready = torch.zeros(B, dtype=torch.bool)
        self.best = torch.full((B,), -math.inf, dtype=torch.float64)
        self.best_params = [p.clone() for p in params.tensors()]
        self.bad = torch.zeros(B, dtype=torch.long)  # iterations without a relative improvement
        self.plateaus = torch.zeros(B, dtype=torch.long)  # at the finest scale

    def active(self) -> torch.Tensor:
        return ~(self.done | self.failed | self.ready)

    def all_finished(self) -> bool:
        return bool((self.done | self.failed).all())

    def scale_finished(self) -> bool:
        return bool((self.ready | self.done | self.failed).all())

    def fail(self, active: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """Stop the items of ``active`` whose similarity or gradient is not finite (``~ok``) at their
        best pose; return the items still active."""
        newly_failed = active & ~ok
        self.failed |= newly_failed
        return active & ~newly_failed

    def record(self, s: torch.Tensor, params: _Params, active: torch.Tensor, threshold: float) -> None:
        """Keep the best pose (the one ``s`` was evaluated at) and count iterations without improvement."""
        improved = active & (s > self.best + threshold * self.best.abs())
        better = active & (s > self.best)
        for bp, p in zip(self.best_params, params.tensors()):
            bp[better] = p[better]
        self.best = torch.where(better, s, self.best)
        self.bad = torch.where(improved, torch.zeros_like(self.bad), torch.where(active, self.bad + 1, self.bad))

    def restart(self) -> None:
        """Forget the best similarity and the counters: a new scale is a new objective."""
        self.ready[:] = False
        self.best[:] = -math.inf
        self.bad[:] = 0


@dataclass
class _Scale:
    """One level of the coarse-to-fine schedule."""

    factor: float
    level: tuple  # pyramid(): (image, mask, detector)
    similarity: Callable
    threshold: float
    cap: int | None  # iterations at a coarse scale; None = plateau only
    finest: bool


@dataclass
class _Run:
    """What stays fixed during one call, and what it records."""

    renderer: object
    dtype: torch.dtype
    similarity_dtype: torch.dtype
    patience: int
    max_plateaus: int
    max_iterations: int
    time_budget: float | None
    callback: Callable | None
    t_start: float
    trajectory: list[torch.Tensor] = field(default_factory=list)
    trajectory_scale: list[float] = field(default_factory=list)
    time_per_scale: dict[float, float] = field(default_factory=dict)
    iterations: int = 0

    def out_of_time(self) -> bool:
        return self.time_budget is not None and time.perf_counter() - self.t_start >= self.time_budget

    def render(self, pose: torch.Tensor, level: tuple) -> torch.Tensor:
        """DRR (B, 1, h, w) at ``pose`` of a :func:`pyramid` level (its scored pixels only); label
        channels are summed."""
        _, mask, detector = level
        drr = render_scored(self.renderer, pose.to(self.dtype), detector, mask)
        return drr if drr.shape[1] == 1 else drr.sum(dim=1, keepdim=True)

    def similarity(self, scale: _Scale, drr: torch.Tensor) -> torch.Tensor:
        img, msk, _ = scale.level
        return scale.similarity(drr.to(self.similarity_dtype), img.to(self.similarity_dtype), msk)


def _evaluate(run: _Run, scale: _Scale, params: _Params):
    """Similarity and its gradient at the current parameters.

    Returns the pose (B, 4, 4), the similarity (B,) float64 on the CPU and the gradients with
    respect to rotation and translation (B, 3) each, on the CPU. Non-finite similarities
    contribute no gradient to the other items.
    """
    rot = params.rot.clone().requires_grad_(True)
    xyz = params.xyz.clone().requires_grad_(True)
    pose = params.pose(rot, xyz)
    s = run.similarity(scale, run.render(pose, scale.level))
    s_val = s.detach().to(torch.float64).cpu()
    finite = torch.isfinite(s_val)
    grad_rot, grad_xyz = torch.autograd.grad(torch.where(finite.to(s.device), s, torch.zeros_like(s)).sum(), [rot, xyz])
    return pose, s_val, [grad_rot.detach().cpu(), grad_xyz.detach().cpu()]


def _count_plateaus(run: _Run, scale: _Scale, items: _Items, adam: _Adam, active: torch.Tensor, iters: int) -> None:
    """Reduce-on-plateau: a coarse scale ends for an item at its first plateau (or its iteration
    cap); at the finest scale each plateau divides the item's learning rates by 10 and the item
    is done after ``max_plateaus`` of them."""
    plateau = active & (items.bad > run.patience)
    if not scale.finest:
        items.ready |= plateau
        if scale.cap is not None and iters >= scale.cap:
            items.ready |= active
        return
    adam.lr = torch.where(plateau[:, None], adam.lr * 0.1, adam.lr)
    items.plateaus += plateau.long()
    items.bad = torch.where(plateau, torch.zeros_like(items.bad), items.bad)
    items.done |= plateau & (items.plateaus >= run.max_plateaus)


_NEXT_SCALE = object()


def _run_scale(run: _Run, scale: _Scale, params: _Params, adam: _Adam, items: _Items):
    """Iterate at one scale until every item has finished it.

    Returns ``_NEXT_SCALE`` when the schedule should go on to the next scale, otherwise why the
    whole refinement stops: a message, or None when every item is done or failed.
    """
    iters = 0
    while True:
        if items.all_finished():
            return None
        if run.iterations >= run.max_iterations:
            return f"reached max_iterations={run.max_iterations}"
        if run.out_of_time():
            return f"time budget of {run.time_budget:g} s spent"
        t_iter = time.perf_counter()
        active = items.active()
        pose, s, grads = _evaluate(run, scale, params)
        run.trajectory.append(s.clone())
        run.trajectory_scale.append(scale.factor)
        run.iterations += 1
        iters += 1
        grads_ok = torch.isfinite(grads[0]).all(-1) & torch.isfinite(grads[1]).all(-1)
        active = items.fail(active, torch.isfinite(s) & grads_ok)
        items.record(s, params, active, scale.threshold)
        adam.ascend(params, grads, active)
        _count_plateaus(run, scale, items, adam, active, iters)
        run.time_per_scale[scale.factor] = run.time_per_scale.get(scale.factor, 0.0) + time.perf_counter() - t_iter
        if run.callback is not None:
            info = {"iteration": run.iterations, "scale": scale.factor, "pose": pose.detach(), "similarity": s}
            if run.callback(info):
                return "stopped by the callback"
        if not scale.finest and items.scale_finished():
            return _NEXT_SCALE


def _next_scale(params: _Params, adam: _Adam, items: _Items, lr_decay: float) -> None:
    """Start the next scale from the best pose seen, with smaller learning rates and fresh moments."""
    for p, bp in zip(params.tensors(), items.best_params):
        p.copy_(bp)
    adam.lr = adam.lr / lr_decay
    items.restart()
    adam.restart(params)


def _final(run: _Run, scale: _Scale, finest: Callable[[], _Scale], params: _Params, items: _Items, init_pose):
    """The answer: the best pose seen at the last scale reached (the start pose where nothing ran).

    Returns the pose (B, 4, 4) float64 and its similarity (B,) at the finest scale (``finest()``):
    the best value when the finest scale was reached, else one more render, or NaN when no time
    is left for it.
    """
    never = torch.isinf(items.best)
    for p, bp in zip(params.tensors(), items.best_params):
        p[~never] = bp[~never]
    with torch.no_grad():
        pose = params.pose(params.rot, params.xyz)
        if scale.finest and not bool(never.any()):
            sim = items.best.clone()
        elif run.out_of_time():  # no time for another render: NaN where the finest scale was not evaluated
            sim = torch.where(never | (not scale.finest), torch.full_like(items.best, math.nan), items.best)
        else:  # not at the finest scale yet: one more render to report a comparable value
            last = finest()
            sim = run.similarity(last, run.render(pose, last.level)).to(torch.float64).cpu()
    pose = torch.where(never[:, None, None], init_pose.to(torch.float64).cpu(), pose)
    return pose, sim


def _message(stop_reason: str | None, run: _Run, scale: _Scale, converged: torch.Tensor, failed: torch.Tensor) -> str:
    n_conv, B = int(converged.sum()), len(converged)
    if stop_reason is None:
        stop_reason = "converged" if n_conv == B else f"{n_conv}/{B} converged"
    elapsed = time.perf_counter() - run.t_start
    parts = [f"{stop_reason} after {run.iterations} iterations in {elapsed:.2f} s at scale {scale.factor:g}"]
    if bool(failed.any()):
        parts.append(f"{int(failed.sum())} item(s) stopped on a non-finite similarity or gradient")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# the optimiser
# --------------------------------------------------------------------------------------------
def refine(
    renderer,
    xray: torch.Tensor,
    detector: Detector,
    init_pose: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    similarity: str | Callable | Sequence[str | Callable] = "auto",
    sigma: float = 1.0,
    parameterization: str = "euler_zxy",
    scales: Sequence[float] | str = "auto",
    lr_rot: float = 0.08,
    lr_xyz: float = 8.0,
    lr_decay: float = 4.0,
    depth_lr_factor: float = 4.0,
    max_iterations: int = 500,
    iterations_per_scale: int | Sequence[int] | None = None,
    time_budget: float | None = None,
    patience: int = 5,
    threshold: float | Sequence[float] = 1e-5,
    max_plateaus: int = 2,
    callback: Callable[[dict], bool | None] | None = None,
    similarity_dtype: torch.dtype = torch.float32,
    num_threads: int | None = 1,
) -> RefineResult:
    """Refine ``init_pose`` so the DRR matches ``xray``.

    Args:
        renderer: a differentiable ``render.Renderer`` (``renderer(pose, detector) -> (B, C, H, W)``;
            channels are summed when C > 1).
        xray: (1 or B, 1, H, W) line-integral-like X-ray (any affine intensity scale) on ``detector``.
        detector: the X-ray's own intrinsics, full resolution.
        init_pose: (B, 4, 4) or (4, 4) starting poses, mm; each is refined independently.
        mask: optional (1 or B, 1, H, W) validity mask (bool or weights); invalid pixels are ignored.
        similarity: ``"auto"`` (default: ``"mncc+gncc"`` at every scale but the finest, ``"gncc"``
            there, without ``sigma`` when that scale pools by ``UNSMOOTHED_FROM_FACTOR`` or more; see
            the module docstring), ``"mncc+gncc"``, ``"mncc"``, ``"gncc"``, ``"ncc"``, a
            callable ``f(drr, xray, mask) -> (B,)``, or one of those per scale.
        sigma: Gaussian smoothing (px) before the gradient NCC's Sobel filter.
        parameterization: ``"euler_zxy"`` or ``"se3"`` (see the module docstring).
        scales: downsampling factors, coarsest first (1 = full resolution), or ``"auto"``
            (:func:`auto_scales`: long side 16, 32, 64 then 96 px).
        lr_rot, lr_xyz: Adam learning rates at the first scale, rad and mm.
        lr_decay: learning rates are divided by this at each new scale.
        depth_lr_factor: the translation along the central ray (depth) moves at this multiple of
            ``lr_xyz``.
        max_iterations: total iteration cap.
        iterations_per_scale: cap per coarse scale (one int, or one per scale); None = plateau only.
        time_budget: seconds; stops (``converged=False``) when spent.
        patience, threshold: reduce-on-plateau: a plateau is ``patience`` iterations without a
            relative improvement of ``threshold`` over the best (one value, or one per scale).
        max_plateaus: plateaus (x0.1 learning-rate reductions) at the finest scale before stopping.
        callback: called after each iteration with a dict (``iteration``, ``scale``, ``pose``,
            ``similarity``); returning True stops the refinement (e.g. a cancelled ROS goal).
        similarity_dtype: dtype the similarity is computed in.
        num_threads: torch intra-op threads while refining (None = torch's setting). The images
            are small (at most 96 px a side at the default scales), so an operation lasts
            about as long as waking a second thread, which on a shared CPU also waits for a time
            slice: one thread is faster, and leaves the other core to the rest of the system.

    Returns:
        :class:`RefineResult`.

    Raises:
        ValueError: invalid input only (shapes, NaN/inf, an empty mask, bad options).

    """
    with intra_op_threads(num_threads):
        return _refine(renderer, xray, detector, init_pose, mask, similarity, sigma, parameterization, scales, lr_rot,
                       lr_xyz, lr_decay, depth_lr_factor, max_iterations, iterations_per_scale, time_budget, patience,
                       threshold, max_plateaus, callback, similarity_dtype)


@contextmanager
def intra_op_threads(n: int | None):
    """Torch intra-op threads set to ``n`` (None: unchanged) inside the block (see ``refine``'s ``num_threads``)."""
    if n is not None and not (isinstance(n, int) and n >= 1):
        raise ValueError(f"num_threads must be a positive int or None, got {n!r}")
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _refine(renderer, xray, detector, init_pose, mask, similarity, sigma, parameterization, scales, lr_rot, lr_xyz,
            lr_decay, depth_lr_factor, max_iterations, iterations_per_scale, time_budget, patience, threshold,
            max_plateaus, callback, similarity_dtype) -> RefineResult:
    t_start = time.perf_counter()
    init_pose, scales = _check_inputs(xray, detector, init_pose, mask, scales, parameterization)
    sims, caps, thresholds = _check_options(
        scales, similarity, sigma, iterations_per_scale, threshold, lr_rot, lr_xyz, lr_decay, time_budget,
        depth_lr_factor,
    )
    run = _Run(
        renderer,
        dtype=getattr(renderer, "dtype", torch.float32),
        similarity_dtype=similarity_dtype,
        patience=patience,
        max_plateaus=max_plateaus,
        max_iterations=max_iterations,
        time_budget=time_budget,
        callback=callback,
        t_start=t_start,
    )
    xray = xray.to(getattr(renderer, "device", torch.device("cpu")), run.dtype)
    mask = None if mask is None else mask.to(xray.device)

    def scale_at(i: int) -> _Scale:
        level = pyramid(xray, mask, detector, scales[i])
        return _Scale(scales[i], level, sims[i], thresholds[i], caps[i], finest=i == len(scales) - 1)

    isocenter = getattr(renderer, "isocenter", torch.zeros(3, dtype=torch.float64)).cpu()
    params = _Params(init_pose, parameterization, isocenter)
    adam = _Adam(params, lr_rot, lr_xyz, depth_gain(detector, depth_lr_factor))
    items = _Items(params)

    i, scale = 0, scale_at(0)
    while (stop_reason := _run_scale(run, scale, params, adam, items)) is _NEXT_SCALE:
        t_switch = time.perf_counter()
        i, scale = i + 1, scale_at(i + 1)
        _next_scale(params, adam, items, lr_decay)
        run.time_per_scale[scale.factor] = time.perf_counter() - t_switch

    pose, sim = _final(run, scale, lambda: scale_at(len(scales) - 1), params, items, init_pose)
    converged = items.done & ~items.failed
    return RefineResult(
        pose=pose.to(init_pose.dtype),
        init_pose=init_pose.clone(),
        similarity=sim,
        trajectory=run.trajectory,
        trajectory_scale=run.trajectory_scale,
        iterations=run.iterations,
        time_per_scale=run.time_per_scale,
        scales=scales,
        converged=converged,
        message=_message(stop_reason, run, scale, converged, items.failed),
    )
