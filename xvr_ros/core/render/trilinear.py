"""Line integrals of a trilinearly interpolated voxel volume along straight rays.

This is the inner loop of DRR rendering (training and registration). Two implementations with
identical semantics:

* a C++ CPU kernel (``csrc/trilinear.cpp``, forward and its own exact backward), used for CPU
  tensors whenever the extension can be built;
* :func:`line_integrals_reference`, pure torch (``grid_sample``), used for CUDA tensors and when
  no compiler is available. It is differentiable by autograd and memory bounded.

Semantics
---------
``volume`` is ``(D0, D1, D2, C)`` (channels last). A ray ``b, n`` is ``p(a) = s + a (t - s)``,
``a in [0, 1]``, ``s = source[b]``, ``t = target[b, n]``, in continuous voxel-index coordinates
(integer index = voxel centre). ``[0, 1]`` is clipped to the box ``[-0.5, D_i - 0.5]`` (the
physical extent of the voxels) on every axis, giving ``[a0, a1]``; rays missing the box give 0.
``f`` is trilinear interpolation with clamp-to-edge, i.e. ``grid_sample(mode="bilinear",
padding_mode="border", align_corners=False)``. With ``ell = |(t - s) * spacing|`` (mm),
``n = max(1, ceil((a1 - a0) * ell / step))`` and ``h = (a1 - a0) / n`` the result is the midpoint
rule ::

    J = h * sum_{k=0}^{n-1} f(p(a0 + (k + 1/2) h))

i.e. the *parametric* integral of ``f`` over ``a``; multiply by ``ell`` to get the line integral
in mm (a uniform box of value 1 gives ``J = a1 - a0``).

Gradients
---------
Both paths give the exact derivative of that discrete ``J`` with respect to ``source`` and
``target`` (``n`` is treated as locally constant; ``a0``/``a1`` move with the clip plane that sets
them). The C++ kernel gives **no gradient for the volume** (its backward returns ``None`` for
it); :func:`line_integrals` therefore routes calls that need a volume gradient to the reference.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xvr_ros.core.render import _ext

__all__ = ["line_integrals", "line_integrals_reference", "kernel_available"]

_MAX_SAMPLES_PER_RAY = 2**30  # same limit as the C++ kernel


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _as_spacing(spacing) -> tuple[float, float, float]:
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().flatten().tolist()
    try:
        sp = tuple(float(x) for x in spacing)
    except TypeError as exc:
        raise TypeError(f"spacing must be 3 floats, got {spacing!r}") from exc
    if len(sp) != 3 or not all(math.isfinite(x) and x > 0 for x in sp):
        raise ValueError(f"spacing must be 3 positive finite floats, got {spacing!r}")
    return sp


def _check(volume: torch.Tensor, source: torch.Tensor, target: torch.Tensor, spacing, step):
    for name, x in (("volume", volume), ("source", source), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if volume.dim() != 4 or min(volume.shape) < 1:
        raise ValueError(f"volume must be a non-empty (D0, D1, D2, C) tensor, got {tuple(volume.shape)}")
    if volume.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"volume must be float32 or float64, got {volume.dtype}")
    if source.dim() != 2 or source.shape[1] != 3:
        raise ValueError(f"source must be (B, 3), got {tuple(source.shape)}")
    if target.dim() != 3 or target.shape[2] != 3 or target.shape[0] != source.shape[0]:
        raise ValueError(
            f"target must be (B, N, 3) with B = source.shape[0] = {source.shape[0]}, got {tuple(target.shape)}"
        )
    if source.dtype != volume.dtype or target.dtype != volume.dtype:
        raise TypeError(
            f"source, target and volume must share a dtype, got {source.dtype}, {target.dtype}, {volume.dtype}"
        )
    if not (source.device == target.device == volume.device):
        raise ValueError(
            f"volume, source and target must be on one device, got {volume.device}, {source.device}, {target.device}"
        )
    sp = _as_spacing(spacing)
    step = float(step)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite float (mm), got {step!r}")
    return sp, step


# --------------------------------------------------------------------------------------------
# C++ kernel
# --------------------------------------------------------------------------------------------


def kernel_available() -> bool:
    """True if the compiled CPU kernel can be used (builds it on first call)."""
    return _ext.load("trilinear") is not None


class _LineIntegrals(torch.autograd.Function):
    """Autograd wrapper of the C++ kernel. Backward is the kernel's own exact derivative with
    respect to source and target; the volume gets no gradient (``None``)."""

    @staticmethod
    def forward(ctx, volume, source, target, spacing, step):
        ext = _ext.load("trilinear")
        ctx.spacing, ctx.step = spacing, step
        ctx.save_for_backward(volume, source, target)
        return ext.forward(volume, source, target, list(spacing), step)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        volume, source, target = ctx.saved_tensors
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return None, None, None, None, None
        ext = _ext.load("trilinear")
        grad_s, grad_t = ext.backward(grad.contiguous(), volume, source, target, list(ctx.spacing), ctx.step)
        return (
            None,
            grad_s if ctx.needs_input_grad[1] else None,
            grad_t if ctx.needs_input_grad[2] else None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def line_integrals(
    volume: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    spacing: Sequence[float] | torch.Tensor,
    step: float,
) -> torch.Tensor:
    """Parametric line integrals ``J`` (B, N, C) of ``volume`` along the rays source -> target.

    Args:
        volume: (D0, D1, D2, C) float32/float64, channels last.
        source: (B, 3) ray starts, continuous voxel-index coordinates, volume's dtype.
        target: (B, N, 3) ray ends, same coordinates and dtype.
        spacing: 3 floats, mm per index step along each axis (used only for the sample count).
        step: sample spacing in mm (used only for the sample count).

    Returns:
        J (B, N, C): ``h * sum_k f(p_k)`` over the part of each ray inside the volume's box (see
        the module docstring); multiply by the ray length in mm for the line integral.

    Uses the C++ kernel for CPU tensors when it is available, else
    :func:`line_integrals_reference`. Gradients flow to ``source`` and ``target``; a gradient for
    ``volume`` is only produced by the reference path, which is therefore used whenever
    ``volume.requires_grad`` under grad mode.

    """
    sp, step = _check(volume, source, target, spacing, step)
    needs_volume_grad = volume.requires_grad and torch.is_grad_enabled()
    if volume.device.type == "cpu" and not needs_volume_grad and _ext.load("trilinear") is not None:
        return _LineIntegrals.apply(volume.contiguous(), source.contiguous(), target.contiguous(), sp, step)
    return line_integrals_reference(volume, source, target, sp, step)


# --------------------------------------------------------------------------------------------
# pure torch reference
# --------------------------------------------------------------------------------------------


def _setup_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _clip_rays(source, target, shape, spacing, step):
    """Per-ray clipping in float64: a0, a1 (R,) differentiable, n (R,) int64 (0 for misses)."""
    wd = _setup_dtype(source.device)
    s = source.to(wd)
    t = target.to(wd)
    d = t - s
    dims = torch.tensor(shape, dtype=wd, device=s.device)
    lo = torch.full_like(dims, -0.5)
    hi = dims - 0.5
    par = d == 0
    dsafe = torch.where(par, torch.ones_like(d), d)
    ta = (lo - s) / dsafe
    tb = (hi - s) / dsafe
    inside = (s >= lo) & (s <= hi)
    inf = torch.full_like(d, math.inf)
    enter = torch.where(par, torch.where(inside, -inf, inf), torch.minimum(ta, tb))
    leave = torch.where(par, torch.where(inside, inf, -inf), torch.maximum(ta, tb))
    # Ties (a clip plane exactly at a segment end, or two planes at once) are not differentiable;
    # break them like the C++ kernel: the segment end wins over a plane (strict comparisons) and
    # the first axis wins among planes (torch.max/min return the first extremal index).
    emax = enter.max(dim=-1).values
    lmin = leave.min(dim=-1).values
    zero = torch.zeros_like(emax)
    one = torch.ones_like(lmin)
    a0 = torch.where(emax > 0, emax, zero)
    a1 = torch.where(lmin < 1, lmin, one)
    hit = (a1 > a0) & torch.isfinite(s).all(-1) & torch.isfinite(t).all(-1)
    a0 = torch.where(hit, a0, zero)
    a1 = torch.where(hit, a1, zero)
    with torch.no_grad():
        dd = d.detach()
        x0 = dd[:, 0] * spacing[0]
        x1 = dd[:, 1] * spacing[1]
        x2 = dd[:, 2] * spacing[2]
        ell = torch.sqrt(x0 * x0 + x1 * x1 + x2 * x2)
        x = torch.ceil((a1 - a0).detach() * ell / step)
        x = torch.where(hit, x, zero)
        if x.numel() and float(x.max()) > _MAX_SAMPLES_PER_RAY:
            raise ValueError(f"line_integrals: a ray needs {float(x.max()):.3g} samples; step is too small")
        n = torch.where(hit, x.clamp(min=1.0), zero).to(torch.int64)
    return a0, a1, n


def _chunk_integrals(inp, s, t, a0, a1, n, k0: int, k1: int):
    """H * sum_{k0 <= k < min(k1, n)} f(p_k) for a chunk of rays: (R, C)."""
    dtype = inp.dtype
    wd = a0.dtype
    D0, D1, D2 = inp.shape[2:]
    nf = n.to(wd)[:, None]
    k = torch.arange(k0, k1, device=s.device, dtype=wd)[None, :]
    mask = k < nf
    c = torch.where(mask, (k + 0.5) / nf.clamp(min=1.0), torch.full_like(k, 0.5))
    a = (a0[:, None] + c * (a1 - a0)[:, None]).to(dtype)  # (R, K)
    p = s[:, None, :] + a[..., None] * (t - s)[:, None, :]  # (R, K, 3) voxel indices
    # normalised grid_sample coordinates, align_corners=False; grid's last dim is (x=D2, y=D1, z=D0)
    grid = torch.stack(
        ((2 * p[..., 2] + 1) / D2 - 1, (2 * p[..., 1] + 1) / D1 - 1, (2 * p[..., 0] + 1) / D0 - 1), dim=-1
    )
    vals = F.grid_sample(inp, grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    vals = vals[0, :, 0] * mask.to(dtype)  # (C, R, K)
    h = ((a1 - a0) / n.to(wd).clamp(min=1.0)).to(dtype)
    return vals.sum(-1).transpose(0, 1) * h[:, None]


def _plan_chunks(n_sorted: list[int], start: int, max_samples: int):
    """Greedy chunks [i, j) of the rays sorted by n, with (j - i) * n[j-1] <= max_samples."""
    R = len(n_sorted)
    i = start
    while i < R:
        # largest j with (j - i) * n_sorted[j - 1] <= max_samples (the product grows with j)
        j = bisect.bisect_right(range(i + 1, R + 1), max_samples, key=lambda j: (j - i) * n_sorted[j - 1]) + i
        j = max(j, i + 1)
        yield i, j
        i = j


def line_integrals_reference(
    volume: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    spacing: Sequence[float] | torch.Tensor,
    step: float,
    max_samples: int = 2**22,
) -> torch.Tensor:
    """Pure torch implementation of :func:`line_integrals` (same semantics, any device).

    Every ray of a chunk is sampled with the chunk's largest ``n`` points and the samples
    ``k >= n_ray`` get zero weight. Rays are sorted by ``n`` (less padding) and processed in
    chunks of at most ``max_samples`` sample points (a single ray with more samples is split
    along its length); when there is more than one chunk and autograd is recording, each chunk is
    checkpointed so the saved activations also stay bounded. Differentiable with respect to
    source, target and volume.
    """
    sp, step = _check(volume, source, target, spacing, step)
    max_samples = int(max_samples)
    if max_samples < 1:
        raise ValueError("max_samples must be >= 1")
    B, N, C = target.shape[0], target.shape[1], volume.shape[3]
    R = B * N
    s_all = source[:, None, :].expand(B, N, 3).reshape(R, 3)
    t_all = target.reshape(R, 3)
    a0, a1, n = _clip_rays(s_all, t_all, tuple(volume.shape[:3]), sp, step)
    out = torch.zeros(R, C, dtype=volume.dtype, device=volume.device)
    if R == 0:
        return out.reshape(B, N, C) + 0 * (source.sum() + target.sum())
    bad = ~(torch.isfinite(s_all).all(-1) & torch.isfinite(t_all).all(-1))
    inp = volume.permute(3, 0, 1, 2)[None]  # (1, C, D0, D1, D2) view

    n_sorted, order = torch.sort(n)
    n_list = n_sorted.tolist()
    first = bisect.bisect_right(n_list, 0)  # misses (n == 0) come first and are skipped
    chunks = []
    for i, j in _plan_chunks(n_list, first, max_samples):
        nmax = n_list[j - 1]
        kblock = nmax if (j - i) * nmax <= max_samples else max(1, max_samples // (j - i))
        for k0 in range(0, nmax, kblock):
            chunks.append((i, j, k0, min(nmax, k0 + kblock)))

    tracking = torch.is_grad_enabled() and (source.requires_grad or target.requires_grad or volume.requires_grad)
    use_ckpt = tracking and len(chunks) > 1
    pieces, rows = [], []
    for i, j, k0, k1 in chunks:
        idx = order[i:j]
        args = (inp, s_all[idx], t_all[idx], a0[idx], a1[idx], n[idx], k0, k1)
        if use_ckpt:
            from torch.utils.checkpoint import checkpoint

            piece = checkpoint(_chunk_integrals, *args, use_reentrant=False)
        else:
            piece = _chunk_integrals(*args)
        pieces.append(piece)
        rows.append(idx)
    if pieces:
        out = out.index_put((torch.cat(rows),), torch.cat(pieces), accumulate=True)
    elif tracking:
        out = out + 0 * a0.sum().to(out.dtype)  # no ray hits: zeros, still attached to the graph
    if bool(bad.any()):
        out = torch.where(bad[:, None], torch.full_like(out, math.nan), out)
    return out.reshape(B, N, C)
