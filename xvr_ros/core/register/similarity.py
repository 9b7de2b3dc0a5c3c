"""Image similarity for intensity-based 2D/3D registration (method.md §5), masked and batched.

All functions take two batches of images ``(B, C, H, W)`` (the fixed X-ray may have ``B = 1`` and
is then broadcast) and an optional validity ``mask`` ``(B or 1, 1, H, W)``, bool or float in
``[0, 1]``, and return a ``(B,)`` similarity: higher is better, 1 for images identical up to a
positive affine change of intensity (``a x + b``, ``a > 0``), -1 for a negated image. Channels (label channels)
are averaged.

- :func:`ncc`: global normalised cross-correlation.
- :func:`patch_ncc`: NCC in every ``k x k`` window (stride 1), averaged over the windows.
- :func:`mncc`: multiscale NCC, ``0.5 * ncc + 0.5 * patch_ncc(k=9)``. Smooth, wide capture range.
- :func:`gradncc`: NCC of the Sobel gradients (x and y channels, optionally after a Gaussian of
  ``sigma`` pixels) in ``11 x 11`` windows. Sharp around the optimum: it locks onto edges, which
  is what pins down the depth (magnification) of the pose.
- :func:`mncc_gradncc`: ``0.5 * mncc + 0.5 * gradncc``, the xvr default and ours.

Windows are true local statistics (mean and variance over the window's pixels), computed with box
filters, so the cost does not grow with the window size. (diffdrr 0.6.1's patch NCC normalises
each window *offset* over all positions, which makes it close to a global NCC; the method asks
for local windows, which also makes the score robust to the smooth, non-affine intensity changes
of real X-rays.)

Masks: a masked-out pixel contributes nothing, to means, variances or window statistics, and its
value (even NaN or inf) is never read. A window whose valid pixels are fewer than
``min_valid`` of its area is ignored; gradients are only taken where the whole filter support is
valid (the mask is eroded by the filter radius; image borders count as invalid, so the zero
padding of a convolution never creates false edges).

Stability: variances get ``eps`` (1e-4) times the image's global variance (plus a 1e-12
absolute floor) added. That keeps every score invariant to affine intensity changes (eps is
relative), keeps flat windows (variance ~ 0, e.g. air, or a constant image) from dividing by
zero and lets them weigh less; gradients stay finite for constant images. Identical images
score ``1 - O(eps)`` (0.9996-0.9999).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["SIMILARITIES", "get", "gradncc", "mncc", "mncc_gradncc", "ncc", "patch_ncc", "sobel"]

EPS = 1e-4  # relative to the image's global variance
_TINY = 1e-12  # absolute floor (constant images)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _prepare(x: torch.Tensor, y: torch.Tensor, mask):
    """Broadcast x, y to (B, C, H, W); return them with masked pixels zeroed and the weight."""
    if x.dim() != 4 or y.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    B = max(x.shape[0], y.shape[0])
    if x.shape[0] not in (1, B) or y.shape[0] not in (1, B):
        raise ValueError(f"batch sizes {x.shape[0]} and {y.shape[0]} do not broadcast")
    x, y = x.expand(B, *x.shape[1:]), y.expand(B, *y.shape[1:])
    if mask is None:
        w = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    else:
        w = torch.as_tensor(mask, device=x.device)
        if w.dim() != 4 or w.shape[1] != 1 or w.shape[2:] != x.shape[2:] or w.shape[0] not in (1, B):
            raise ValueError(f"mask must be (B or 1, 1, {x.shape[2]}, {x.shape[3]}), got {tuple(w.shape)}")
        w = w.to(x.dtype)
        # Never read a masked pixel: where() also stops NaN/inf there from leaking into sums.
        x = torch.where(w > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
        y = torch.where(w > 0, y, torch.zeros((), dtype=y.dtype, device=y.device))
    return x, y, w


def _wmean(v: torch.Tensor, w: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return (v * w).sum(dim=(-1, -2), keepdim=True) / total


def _global_stats(x, y, w):
    """Masked global mean-centred images and variances: (B, C, H, W) x2, (B, C, 1, 1) x3."""
    total = w.sum(dim=(-1, -2), keepdim=True).clamp_min(_TINY)
    xc = x - _wmean(x, w, total)
    yc = y - _wmean(y, w, total)
    vx = _wmean(xc * xc, w, total)
    vy = _wmean(yc * yc, w, total)
    cxy = _wmean(xc * yc, w, total)
    return xc, yc, vx, vy, cxy, total


def _ncc_from(cov, vx, vy, ex, ey):
    return cov / ((vx + ex) * (vy + ey)).sqrt()


# --------------------------------------------------------------------------------------------
# similarities
# --------------------------------------------------------------------------------------------
def _global_ncc(cxy, vx, vy, total, eps):
    score = _ncc_from(cxy, vx, vy, eps * vx.detach() + _TINY, eps * vy.detach() + _TINY)
    valid = (total > 0.5).to(score.dtype)  # an item with no valid pixel scores 0
    return (score * valid).mean(dim=(1, 2, 3))


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Means of (B, C, H, W) over every k x k window (valid windows only) -> (B, C, H-k+1, W-k+1).

    Equal to ``F.avg_pool2d(x, k, stride=1)``, from a summed-area table: O(1) per pixel instead of
    O(k^2), the refinement's most frequent operation. Summed in float64 so large images do not
    lose the window sums to rounding.
    """
    c = F.pad(x.double(), (1, 0, 1, 0)).cumsum(-1).cumsum(-2)
    sums = c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]
    return (sums / (k * k)).to(x.dtype)


def _patch_ncc(xc, yc, vx, vy, w, patch_size, eps, min_valid):
    """Window NCC on globally centred images (see :func:`patch_ncc`)."""
    B, C, H, W = xc.shape
    k = min(int(patch_size), H, W)
    # Scale to unit global variance: eps becomes relative, and the window moments below, which
    # use E[x^2] - E[x]^2, do not cancel catastrophically in float32.
    xn = xc / (vx.detach() + _TINY).sqrt()
    yn = yc / (vy.detach() + _TINY).sqrt()
    xw, yw = xn * w, yn * w
    stack = torch.cat([w.expand(B, C, H, W), xw, yw, xn * xw, yn * yw, xn * yw], dim=1)  # (B, 6C, H, W)
    cnt, mx, my, mxx, myy, mxy = box_mean(stack, k).unflatten(1, (6, C)).unbind(1)
    okf = (cnt >= min_valid - 1e-6).to(xc.dtype)
    inv = 1.0 / cnt.clamp_min(1.0 / (k * k))
    mux, muy = mx * inv, my * inv
    varx = (mxx * inv - mux * mux).clamp_min(0.0)
    vary = (myy * inv - muy * muy).clamp_min(0.0)
    cov = mxy * inv - mux * muy
    score = _ncc_from(cov, varx, vary, eps, eps)
    return (score * okf).sum(dim=(1, 2, 3)) / okf.sum(dim=(1, 2, 3)).clamp_min(1.0)


def ncc(x: torch.Tensor, y: torch.Tensor, mask=None, eps: float = EPS) -> torch.Tensor:
    """Global NCC over the valid pixels: (B, C, H, W) x2 -> (B,)."""
    x, y, w = _prepare(x, y, mask)
    _, _, vx, vy, cxy, total = _global_stats(x, y, w)
    return _global_ncc(cxy, vx, vy, total, eps)


def patch_ncc(
    x: torch.Tensor, y: torch.Tensor, mask=None, patch_size: int = 9, eps: float = EPS, min_valid: float = 0.5
) -> torch.Tensor:
    """Mean NCC over all ``patch_size`` x ``patch_size`` windows (stride 1, inside the image).

    Windows with fewer than ``min_valid`` x area valid pixels are left out; an item with no
    usable window scores 0. (B, C, H, W) x2 -> (B,)
    """
    x, y, w = _prepare(x, y, mask)
    xc, yc, vx, vy, _, _ = _global_stats(x, y, w)
    return _patch_ncc(xc, yc, vx, vy, w, patch_size, eps, min_valid)


def mncc(x: torch.Tensor, y: torch.Tensor, mask=None, patch_size: int = 9, eps: float = EPS) -> torch.Tensor:
    """Multiscale NCC: ``0.5 * ncc + 0.5 * patch_ncc(patch_size)``. (B, C, H, W) x2 -> (B,)"""
    x, y, w = _prepare(x, y, mask)
    xc, yc, vx, vy, cxy, total = _global_stats(x, y, w)
    return 0.5 * _global_ncc(cxy, vx, vy, total, eps) + 0.5 * _patch_ncc(xc, yc, vx, vy, w, patch_size, eps, 0.5)


@functools.lru_cache(maxsize=16)
def _sobel_kernel(sigma: float, dtype, device) -> tuple[torch.Tensor, int]:
    """(2, k) [smooth, diff] 1D factors of the Sobel kernels convolved with a Gaussian of ``sigma`` px,
    and their radius."""
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    diff = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    if sigma > 0:
        r = max(1, int(math.ceil(3 * sigma)))
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        g = (g / g.sum()).view(1, 1, -1)
        # Gaussian then Sobel = one kernel, their full convolution (conv1d correlates: flip).
        smooth = F.conv1d(F.pad(g, (2, 2)), smooth.flip(0).view(1, 1, 3)).flatten()
        diff = F.conv1d(F.pad(g, (2, 2)), diff.flip(0).view(1, 1, 3)).flatten()
    # The 2D kernel d/dx is outer(smooth, diff) (rows smooth, columns differentiate); d/dy its
    # transpose. Returned as the two 1D factors: two 1D passes cost 2k, not k^2, per pixel.
    factors = torch.stack([smooth, diff]).to(dtype=dtype, device=device)
    return factors, (len(smooth) - 1) // 2


def sobel(x: torch.Tensor, mask=None, sigma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel gradients of (B, C, H, W) images -> ((B, 2C, H, W) [d/dx..., d/dy...], weight (B|1, 1, H, W)).

    Optionally smoothed by a Gaussian of ``sigma`` pixels (folded into the Sobel kernel: one
    convolution). The returned weight is the mask eroded by the kernel's radius (image borders
    count as invalid), so a gradient is only used where every pixel it reads is valid.
    """
    B, C, H, W = x.shape
    dtype, device = x.dtype, x.device
    w = torch.ones(1, 1, H, W, dtype=dtype, device=device) if mask is None else mask.to(dtype)
    (smooth, diff), radius = _sobel_kernel(float(sigma), dtype, device)
    k = len(smooth)
    flat = x.reshape(B * C, 1, H, W)
    rows_smoothed = F.conv2d(flat, smooth.view(1, 1, k, 1), padding=(radius, 0))
    cols_smoothed = F.conv2d(flat, smooth.view(1, 1, 1, k), padding=(0, radius))
    gx = F.conv2d(rows_smoothed, diff.view(1, 1, 1, k), padding=(0, radius))
    gy = F.conv2d(cols_smoothed, diff.view(1, 1, k, 1), padding=(radius, 0))
    grad = torch.stack([gx, gy], dim=1).reshape(B, C, 2, H, W).transpose(1, 2).reshape(B, 2 * C, H, W)
    # Erode: valid only if the whole (2 radius + 1)^2 support is valid and inside the image.
    invalid = F.pad(1.0 - (w > 0).to(dtype), (radius,) * 4, value=1.0)
    eroded = 1.0 - F.max_pool2d(invalid, 2 * radius + 1, stride=1)
    return grad, eroded * w


def _gradncc(x, y, w, patch_size, sigma, eps):
    B = x.shape[0]
    g, wg = sobel(torch.cat([x, y]), w.repeat(2, 1, 1, 1) if w.shape[0] > 1 else w, sigma)
    gx, gy = g[:B], g[B:]
    wg = wg[:B] if wg.shape[0] > 1 else wg
    xc, yc, vx, vy, _, _ = _global_stats(gx, gy, wg)
    return _patch_ncc(xc, yc, vx, vy, wg, patch_size, eps, 0.5)


def gradncc(
    x: torch.Tensor, y: torch.Tensor, mask=None, patch_size: int = 11, sigma: float = 1.0, eps: float = EPS
) -> torch.Tensor:
    """Gradient NCC: :func:`patch_ncc` of the Sobel x/y gradients (after a Gaussian of ``sigma``
    px; 0 = none, xvr's setting). (B, C, H, W) x2 -> (B,)"""
    x, y, w = _prepare(x, y, mask)
    return _gradncc(x, y, w, patch_size, sigma, eps)


def mncc_gradncc(x: torch.Tensor, y: torch.Tensor, mask=None, sigma: float = 1.0, eps: float = EPS) -> torch.Tensor:
    """``0.5 * mncc(9x9) + 0.5 * gradncc(11x11)``, the default. (B, C, H, W) x2 -> (B,)"""
    x, y, w = _prepare(x, y, mask)
    xc, yc, vx, vy, cxy, total = _global_stats(x, y, w)
    m = 0.5 * _global_ncc(cxy, vx, vy, total, eps) + 0.5 * _patch_ncc(xc, yc, vx, vy, w, 9, eps, 0.5)
    return 0.5 * m + 0.5 * _gradncc(x, y, w, 11, sigma, eps)


SIMILARITIES: dict[str, Callable[..., torch.Tensor]] = {
    "ncc": ncc,
    "mncc": mncc,
    "gncc": gradncc,
    "gradncc": gradncc,
    "mncc+gncc": mncc_gradncc,
}


def get(name: str | Callable, **kwargs) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A similarity ``f(x, y, mask) -> (B,)`` by name (``ncc``, ``mncc``, ``gncc``, ``mncc+gncc``)
    with keyword arguments bound (e.g. ``sigma=0``), or a callable passed through."""
    if callable(name):
        return name
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; expected one of {sorted(SIMILARITIES)} or a callable")
    fn = SIMILARITIES[name]
    return (lambda x, y, mask=None: fn(x, y, mask, **kwargs)) if kwargs else fn
