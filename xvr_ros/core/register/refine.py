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
  (mm); reduce-on-plateau x0.1 (``patience`` iterations without a relative improvement of
  ``threshold``). Each batch item has its own learning rates and plateau counters, so items are
  independent; a finished item is frozen while the others go on.
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

Defaults, chosen by measurement with ``bench/bench_register.py`` (50 simulated chest targets
with domain shift, 256x256 px of 1 mm, starts ±5°, ±15 mm in-plane, ±40 mm in depth, median
initial mTRE 26 mm; figures: median mTRE / SMSR / median time per registration, the time as
iterations x the per-iteration cost on an otherwise idle 2-core CPU):

- ``threshold=1e-5`` (xvr: 1e-4) is the choice that matters. Depth is the weak axis: 1 mm of
  depth changes the similarity by only ~1e-4 at 128 px (the magnification changes by 1/850 per
  mm), so with 1e-4 the finest scale often stops before the depth has converged: 0.27 mm median
  but SMSR 74 %, upper quartile 1.2 mm. 1e-5: 0.15 mm, 100 %, 0.9 s; 1e-6: 0.18 mm, 100 %,
  1.1 s (no gain, more iterations); 1e-4 on the coarse scales only: 0.18 mm, 98 %.
- ``scales="auto"``: 16, 32, 64 then 128 px on the long side (factors 16, 8, 4, 2 here).
  Coarse iterations cost 2.5-6.5 ms, a 128 px one ~26 ms, a full-resolution (256 px) one ~200 ms
  (the renderer then needs the full-resolution CT). Adding the full-resolution scale: 0.16 mm
  for 6x the time (16 targets); its objective's optimum is better (0.09 vs 0.17 mm median starting from the
  truth) but the optimiser does not get there within a plateau budget. Starting at 32 px
  (8, 4, 2): 0.21 mm for the same time.
- Similarity ``"mncc+gncc"`` everywhere, ``sigma=1``: global NCC is biased in depth by the
  non-affine intensity shift (gamma, background) and gradNCC is what pins depth down; sigma 0:
  0.16 mm, same time.
- ``parameterization="euler_zxy"``: se3 (about the isocenter) 0.17 mm, same time.
- ``lr_decay=2`` (learning rates halve per scale; 1: 0.25 mm, 4: 0.25 mm with failures on 16
  targets), patience 5, 2 plateaus at the finest scale (patience 3: 94 %; 8: 0.15 mm, +60 %
  time on 16 targets). Similarity in float64 instead of float32: no change.

Invalid input (shapes, NaN, an empty mask) raises ``ValueError``; a poor result never raises: it
comes back with ``converged=False`` and a ``message``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
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
from xvr_ros.core.rotations import se3_exp

__all__ = ["LEVEL_SIZES", "PARAMETERIZATIONS", "RefineResult", "auto_scales", "pyramid", "refine"]

PARAMETERIZATIONS = ("euler_zxy", "se3")

#: ``scales="auto"``: the image's long side at each level, coarsest first (see the module docstring).
LEVEL_SIZES: tuple[int, ...] = (16, 32, 64, 128)


def auto_scales(detector: Detector, sizes: Sequence[int] = LEVEL_SIZES) -> tuple[float, ...]:
    """Downsampling factors (coarsest first) that bring the detector's long side to ``sizes``
    pixels; never finer than full resolution. A 256 px image gives (16, 8, 4, 2)."""
    side = max(detector.height, detector.width)
    factors: list[float] = []
    for size in sizes:
        f = max(1.0, side / float(size))
        if not factors or f < factors[-1]:
            factors.append(f)
    return tuple(factors)

_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


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
# the optimiser
# --------------------------------------------------------------------------------------------
def refine(
    renderer,
    xray: torch.Tensor,
    detector: Detector,
    init_pose: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    similarity: str | Callable | Sequence[str | Callable] = "mncc+gncc",
    sigma: float = 1.0,
    parameterization: str = "euler_zxy",
    scales: Sequence[float] | str = "auto",
    lr_rot: float = 1e-2,
    lr_xyz: float = 1.0,
    lr_decay: float = 2.0,
    max_iterations: int = 500,
    iterations_per_scale: int | Sequence[int] | None = None,
    time_budget: float | None = None,
    patience: int = 5,
    threshold: float | Sequence[float] = 1e-5,
    max_plateaus: int = 2,
    callback: Callable[[dict], bool | None] | None = None,
    similarity_dtype: torch.dtype = torch.float32,
) -> RefineResult:
    """Refine ``init_pose`` so the DRR matches ``xray``.

    Args:
        renderer: a differentiable ``render.Renderer`` (``renderer(pose, detector) -> (B, C, H, W)``;
            channels are summed when C > 1).
        xray: (1 or B, 1, H, W) line-integral-like X-ray (any affine intensity scale) on ``detector``.
        detector: the X-ray's own intrinsics, full resolution.
        init_pose: (B, 4, 4) or (4, 4) starting poses, mm; each is refined independently.
        mask: optional (1 or B, 1, H, W) validity mask (bool or weights); invalid pixels are ignored.
        similarity: ``"mncc+gncc"`` (default), ``"mncc"``, ``"gncc"``, ``"ncc"``, a callable
            ``f(drr, xray, mask) -> (B,)``, or one of those per scale.
        sigma: Gaussian smoothing (px) before the gradient NCC's Sobel filter.
        parameterization: ``"euler_zxy"`` or ``"se3"`` (see the module docstring).
        scales: downsampling factors, coarsest first (1 = full resolution), or ``"auto"``
            (:func:`auto_scales`: long side 16, 32, 64 then 128 px).
        lr_rot, lr_xyz: Adam learning rates at the first scale, rad and mm.
        lr_decay: learning rates are divided by this at each new scale.
        max_iterations: total iteration cap.
        iterations_per_scale: cap per coarse scale (one int, or one per scale); None = plateau only.
        time_budget: seconds; stops (``converged=False``) when spent.
        patience, threshold: reduce-on-plateau: a plateau is ``patience`` iterations without a
            relative improvement of ``threshold`` over the best (one value, or one per scale).
        max_plateaus: plateaus (x0.1 learning-rate reductions) at the finest scale before stopping.
        callback: called after each iteration with a dict (``iteration``, ``scale``, ``pose``,
            ``similarity``); returning True stops the refinement (e.g. a cancelled ROS goal).

    Returns:
        :class:`RefineResult`.

    Raises:
        ValueError: invalid input only (shapes, NaN/inf, an empty mask, bad options).

    """
    t_start = time.perf_counter()
    init_pose, scales = _check_inputs(xray, detector, init_pose, mask, scales, parameterization)
    B = len(init_pose)
    n_scales = len(scales)
    sims = list(similarity) if isinstance(similarity, (list, tuple)) else [similarity] * n_scales
    if len(sims) != n_scales:
        raise ValueError(f"{len(sims)} similarities for {n_scales} scales")
    sims = [sim_mod.get(s, sigma=sigma) if s in ("gncc", "gradncc", "mncc+gncc") else sim_mod.get(s) for s in sims]
    caps = _per_scale(iterations_per_scale, n_scales, "iterations_per_scale")
    thresholds = _per_scale(threshold, n_scales, "threshold")
    if not all(math.isfinite(t) and t >= 0 for t in thresholds):
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    for name, v in (("lr_rot", lr_rot), ("lr_xyz", lr_xyz), ("lr_decay", lr_decay)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be positive, got {v}")
    if time_budget is not None and not time_budget >= 0:
        raise ValueError(f"time_budget must be >= 0 seconds, got {time_budget}")

    device, dtype = getattr(renderer, "device", torch.device("cpu")), getattr(renderer, "dtype", torch.float32)
    xray = xray.to(device, dtype)
    mask = None if mask is None else mask.to(device)
    isocenter = getattr(renderer, "isocenter", torch.zeros(3, dtype=torch.float64)).cpu()
    params = _Params(init_pose, parameterization, isocenter)
    base_lr = torch.tensor([lr_rot, lr_xyz], dtype=torch.float64)

    # Per-item state.
    lr = base_lr.expand(B, 2).clone()  # (B, [rot, xyz])
    done = torch.zeros(B, dtype=torch.bool)  # stopped on the plateau criterion at the finest scale
    failed = torch.zeros(B, dtype=torch.bool)  # similarity became non-finite
    ready = torch.zeros(B, dtype=torch.bool)  # plateaued at the current (coarse) scale
    best = torch.full((B,), -math.inf, dtype=torch.float64)
    best_params = [p.clone() for p in params.tensors()]
    bad = torch.zeros(B, dtype=torch.long)
    plateaus = torch.zeros(B, dtype=torch.long)
    m = [torch.zeros_like(p) for p in params.tensors()]
    v = [torch.zeros_like(p) for p in params.tensors()]
    step = torch.zeros(B, dtype=torch.long)

    trajectory: list[torch.Tensor] = []
    trajectory_scale: list[float] = []
    time_per_scale: dict[float, float] = {}
    iterations, scale_i, scale_iters = 0, 0, 0
    stop_reason = None
    level = pyramid(xray, mask, detector, scales[0])

    def out_of_time() -> bool:
        return time_budget is not None and time.perf_counter() - t_start >= time_budget

    while True:
        if bool((done | failed).all()):
            break
        if iterations >= max_iterations:
            stop_reason = f"reached max_iterations={max_iterations}"
            break
        if out_of_time():
            stop_reason = f"time budget of {time_budget:g} s spent"
            break
        t_iter = time.perf_counter()
        img, msk, det = level
        active = ~(done | failed | ready)

        rot = params.rot.clone().requires_grad_(True)
        xyz = params.xyz.clone().requires_grad_(True)
        pose = params.pose(rot, xyz)
        drr = renderer(pose.to(dtype), det)
        if drr.shape[1] != 1:
            drr = drr.sum(dim=1, keepdim=True)
        s = sims[scale_i](drr.to(similarity_dtype), img.to(similarity_dtype), msk)
        s_val = s.detach().to(torch.float64).cpu()
        finite = torch.isfinite(s_val)
        grad_rot, grad_xyz = torch.autograd.grad(
            torch.where(finite.to(s.device), s, torch.zeros_like(s)).sum(), [rot, xyz]
        )
        trajectory.append(s_val.clone())
        trajectory_scale.append(scales[scale_i])
        iterations += 1
        scale_iters += 1

        # Items whose similarity or gradient is not finite stop at their best pose.
        grads = [grad_rot.detach().cpu(), grad_xyz.detach().cpu()]
        bad_grad = ~(torch.isfinite(grads[0]).all(-1) & torch.isfinite(grads[1]).all(-1))
        newly_failed = active & (~finite | bad_grad)
        failed |= newly_failed
        active &= ~newly_failed

        # Best pose so far (the one the similarity was evaluated at, before this step).
        improved = active & (s_val > best + thresholds[scale_i] * best.abs())
        record = active & (s_val > best)
        for bp, p in zip(best_params, params.tensors()):
            bp[record] = p[record]
        best = torch.where(record, s_val, best)
        bad = torch.where(improved, torch.zeros_like(bad), torch.where(active, bad + 1, bad))

        # Adam (maximising), per-item learning rates; frozen items do not move.
        step = step + active.long()
        t = step.clamp_min(1).to(torch.float64)[:, None]
        for k, (p, g) in enumerate(zip(params.tensors(), grads)):
            g = torch.nan_to_num(g.to(torch.float64))
            a = active[:, None]
            m[k] = torch.where(a, _BETAS[0] * m[k] + (1 - _BETAS[0]) * g, m[k])
            v[k] = torch.where(a, _BETAS[1] * v[k] + (1 - _BETAS[1]) * g * g, v[k])
            mhat = m[k] / (1 - _BETAS[0] ** t)
            vhat = v[k] / (1 - _BETAS[1] ** t)
            update = lr[:, k : k + 1] * mhat / (vhat.sqrt() + _ADAM_EPS)
            p += torch.where(a, update, torch.zeros_like(update))

        # Plateaus.
        finest = scale_i == n_scales - 1
        plateau = active & (bad > patience)
        cap = caps[scale_i]
        if not finest:
            ready |= plateau
            if cap is not None and scale_iters >= cap:
                ready |= active
        else:
            lr = torch.where(plateau[:, None], lr * 0.1, lr)
            plateaus += plateau.long()
            bad = torch.where(plateau, torch.zeros_like(bad), bad)
            done |= plateau & (plateaus >= max_plateaus)
        time_per_scale[scales[scale_i]] = time_per_scale.get(scales[scale_i], 0.0) + time.perf_counter() - t_iter

        if callback is not None:
            info = {"iteration": iterations, "scale": scales[scale_i], "pose": pose.detach(), "similarity": s_val}
            if callback(info):
                stop_reason = "stopped by the callback"
                break

        # Next scale once every running item has plateaued at this one.
        if not finest and bool((ready | done | failed).all()):
            t_switch = time.perf_counter()
            scale_i += 1
            scale_iters = 0
            level = pyramid(xray, mask, detector, scales[scale_i])
            for p, bp in zip(params.tensors(), best_params):
                p.copy_(bp)
            lr = lr / lr_decay
            ready[:] = False
            best[:] = -math.inf
            bad[:] = 0
            step[:] = 0
            m = [torch.zeros_like(p) for p in params.tensors()]
            v = [torch.zeros_like(p) for p in params.tensors()]
            time_per_scale[scales[scale_i]] = time.perf_counter() - t_switch

    # The answer: the best pose seen at the current scale (the start pose if nothing ran).
    never = torch.isinf(best)
    for p, bp in zip(params.tensors(), best_params):
        p[~never] = bp[~never]
    with torch.no_grad():
        final_pose = params.pose(params.rot, params.xyz)
        finest = scale_i == n_scales - 1
        if finest and not bool(never.any()):
            final_sim = best.clone()
        elif out_of_time():  # no time for another render: NaN where the finest scale was not evaluated
            final_sim = torch.where(never | (not finest), torch.full_like(best, math.nan), best)
        else:  # not at the finest scale yet: one more render to report a comparable value
            img, msk, det = pyramid(xray, mask, detector, scales[-1])
            drr = renderer(final_pose.to(dtype), det)
            if drr.shape[1] != 1:
                drr = drr.sum(dim=1, keepdim=True)
            final_sim = sims[-1](drr.to(similarity_dtype), img.to(similarity_dtype), msk).to(torch.float64).cpu()
    final_pose = torch.where(never[:, None, None], init_pose.to(torch.float64).cpu(), final_pose)

    converged = done & ~failed
    elapsed = time.perf_counter() - t_start
    n_conv = int(converged.sum())
    if stop_reason is None:
        stop_reason = "converged" if n_conv == B else f"{n_conv}/{B} converged"
    parts = [f"{stop_reason} after {iterations} iterations in {elapsed:.2f} s at scale {scales[scale_i]:g}"]
    if bool(failed.any()):
        parts.append(f"{int(failed.sum())} item(s) stopped on a non-finite similarity or gradient")
    return RefineResult(
        pose=final_pose.to(init_pose.dtype),
        init_pose=init_pose.clone(),
        similarity=final_sim,
        trajectory=trajectory,
        trajectory_scale=trajectory_scale,
        iterations=iterations,
        time_per_scale=time_per_scale,
        scales=scales,
        converged=converged,
        message="; ".join(parts),
    )
