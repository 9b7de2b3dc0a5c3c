"""Which pixels of an X-ray show anatomy: field-of-view detection without learning.

A C-arm image holds more than the projected patient: collimator blades (straight, possibly
rotated, soft-edged, dark but not black: 1-5 % of the beam leaks through with its noise), the
circular field of an image intensifier, saturated or burnt-out regions, burned-in text and
markers. None of them is in the CT, and a registration that scores them matches the collimator
instead of the anatomy. :func:`detect_field_of_view` finds them from the image alone, in the
line integrals a reader delivers (``L = -log(I / I0)``, :class:`~xvr_ros.core.io.xray.Xray`):
edges are found in relative intensity ``exp(-L)``, where a blade or the circle's rim is a drop by
the leakage factor that is the same all along it, whatever the anatomy behind.

- **Clipped values**: pixels at the image's exact extreme value (saturation, text drawn at the
  detector's maximum, zero counts) when they are not a handful.
- **Circle**: on rays from the image centre, the sharpest outward drop in intensity; a circle
  fitted robustly (RANSAC on three points, then least squares on the inliers) is kept when it
  holds on at least half of the rays and its outside is dark.
- **Blades**, each of the four sides independently: for every angle within ``max_angle_deg`` of
  the side, the image is projected onto the side's normal (mean intensity per 1 px band) in
  ``segments`` pieces along the side. A blade is the line where the intensity falls by at least
  ``min_ratio`` in every piece at once (anatomy is not that straight nor that uniform), found
  on an image reduced to at most 256 px. At full resolution, in 16 pieces along it, the edge is
  where the intensity crosses the middle of the two levels (the middle of a symmetric penumbra),
  and a straight line fitted through those points (outliers dropped) is the blade.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

__all__ = ["detect_field_of_view", "detect_outliers", "erode"]

_COARSE = 256  # long side (px) of the image the blades are searched on
_SIDES = ("left", "right", "top", "bottom")


def detect_field_of_view(
    image: torch.Tensor | np.ndarray,
    valid_mask: torch.Tensor | np.ndarray | None = None,
    *,
    min_ratio: float = 4.0,
    max_angle_deg: float = 8.0,
    max_depth: float = 0.45,
    segments: int = 6,
) -> np.ndarray:
    """(H, W) line integrals (any leading singleton dims) -> (H, W) bool, True where anatomy shows.

    Args:
        image: line integrals ``-log(I / I0)`` (higher = more attenuation), nepers.
        valid_mask: a mask already known (e.g. DICOM shutters), merged in.
        min_ratio: the intensity drop across a blade or the circle's rim, inside / outside.
        max_angle_deg: largest rotation of a blade from its side.
        max_depth: deepest a blade reaches into the image, fraction of the image's size.
        segments: pieces along a side that must each show the drop.

    """
    L = np.asarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    L = L.reshape(L.shape[-2:])
    if not np.isfinite(L).all():
        raise ValueError("image contains NaN or infinite values")
    keep = np.ones(L.shape, dtype=bool)
    if valid_mask is not None:
        m = valid_mask.detach().cpu().numpy() if isinstance(valid_mask, torch.Tensor) else np.asarray(valid_mask)
        keep &= m.reshape(L.shape).astype(bool)
    keep &= ~clipped_pixels(L)
    # Relative intensity, brightest pixel ~1: ratios do not depend on I0.
    intensity = np.exp(-(L - np.percentile(L, 0.5)).clip(0.0, 50.0))
    circle = detect_circle(intensity, min_ratio)
    if circle is not None:
        keep &= circle_mask(L.shape, *circle)
    for side in _SIDES:
        line = detect_blade(intensity, keep, side, min_ratio, max_angle_deg, max_depth, segments)
        if line is not None:
            angle, offset, slope = line
            s, t = side_coordinates(L.shape, side, angle)
            keep &= s - slope * t >= offset
    return keep


#: Below this fraction of the image a detected field of view is taken for a failure of the detection.
MIN_FOV_FRACTION = 0.05


def field_of_view(
    image: torch.Tensor | np.ndarray, valid_mask: torch.Tensor | np.ndarray | None = None
) -> np.ndarray | None:
    """(H, W) line integrals -> (H, W) bool field of view merged with ``valid_mask`` (see
    :func:`detect_field_of_view`), or None when the detection keeps less than ``MIN_FOV_FRACTION``
    of the image (then only the validity mask can be trusted). The one guarded entry point used by
    registration and inference."""
    detected = detect_field_of_view(image, valid_mask)
    return detected if detected.mean() >= MIN_FOV_FRACTION else None


def erode(mask: np.ndarray | torch.Tensor, pixels: int) -> np.ndarray:
    """(H, W) bool mask shrunk by ``pixels`` (a field edge's penumbra stays out of the similarity)."""
    m = np.asarray(mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    m = m.reshape(m.shape[-2:])
    if pixels <= 0:
        return m
    return ndimage.binary_erosion(m, iterations=int(pixels), border_value=1)


def detect_outliers(
    image: torch.Tensor | np.ndarray, keep: np.ndarray | None = None, *, width_px: float = 10.0, k: float = 12.0,
    contrast: float = 0.15, grow_px: int = 2,
) -> np.ndarray:
    """(H, W) bool, True at strong narrow attenuation peaks: wires, screws, other metal.

    A white top-hat (the image minus its grey opening with a ``width_px`` square) keeps what is
    narrower than the square and denser than its surroundings; a pixel is an outlier when that
    exceeds ``k`` robust standard deviations (MAD) of the top-hat inside ``keep`` and ``contrast``
    of the image's range (1st to 99th percentile inside ``keep``): metal is far denser than the
    small bright details of anatomy. Grown by
    ``grow_px`` so the object's blurred rim goes too. Anatomy that thin and that dense is rare,
    and what a CT does not contain cannot be matched anyway.
    """
    L = np.asarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
    L = L.reshape(L.shape[-2:])
    keep = np.ones(L.shape, dtype=bool) if keep is None else np.asarray(keep, dtype=bool).reshape(L.shape)
    if not keep.any():
        return np.zeros(L.shape, dtype=bool)
    size = max(3, int(round(width_px)) | 1)
    # Outside the field the leakage is dark: fill it with the field's median so it makes no peaks.
    filled = np.where(keep, L, np.median(L[keep]))
    hat = filled - ndimage.grey_opening(filled, size=(size, size))
    ref = hat[keep]
    mad = 1.4826 * float(np.median(np.abs(ref - np.median(ref))))
    lo, hi = np.percentile(L[keep], [1, 99])
    out = (hat > np.median(ref) + max(k * mad, contrast * (hi - lo), 1e-9)) & keep
    return ndimage.binary_dilation(out, iterations=grow_px) if out.any() and grow_px > 0 else out


def clipped_pixels(L: np.ndarray, min_pixels: int = 16, max_fraction: float = 0.05) -> np.ndarray:
    """(H, W) bool: pixels at the exact minimum or maximum value, when at least ``min_pixels`` and at
    most ``max_fraction`` of the image share it."""
    out = np.zeros(L.shape, dtype=bool)
    for extreme in (L.min(), L.max()):
        at = L == extreme
        # A large region at one value is no detail (e.g. the air of a synthetic image): the readers'
        # mask_clipped option is for those; text, markers and saturated spots are small.
        if min_pixels <= at.sum() <= max_fraction * L.size:
            out |= at
    return out


# --------------------------------------------------------------------------------------------
# circle
# --------------------------------------------------------------------------------------------
def circle_mask(shape, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.meshgrid(np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5, indexing="ij")
    return np.hypot(xx - cx, yy - cy) <= radius


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Algebraic least-squares circle through points -> (cx, cy, r)."""
    A = np.stack([2 * x, 2 * y, np.ones_like(x)], 1)
    sol, *_ = np.linalg.lstsq(A, x * x + y * y, rcond=None)
    r2 = sol[2] + sol[0] ** 2 + sol[1] ** 2
    return (float(sol[0]), float(sol[1]), math.sqrt(r2)) if r2 > 0 else None


def _ray_edges(intensity: np.ndarray, min_ratio: float, rays: int = 360):
    """The sharpest outward intensity drop on each ray from the centre -> (x, y) points (px)."""
    H, W = intensity.shape
    smooth = ndimage.uniform_filter(intensity, 3)
    g = max(2, round(0.01 * max(H, W)))
    w = max(3, round(0.015 * max(H, W)))
    radii = np.arange(0.0, math.hypot(H, W) / 2, 1.0)
    theta = np.linspace(0, 2 * math.pi, rays, endpoint=False)
    cx, cy = W / 2, H / 2
    xs = cx + np.cos(theta)[:, None] * radii
    ys = cy + np.sin(theta)[:, None] * radii
    inside = (xs >= 0) & (xs <= W) & (ys >= 0) & (ys <= H)
    prof = ndimage.map_coordinates(smooth, [ys - 0.5, xs - 0.5], order=1, mode="nearest")
    prof = np.where(inside, prof, np.nan)
    # Window means before (inner) and after (outer) each radius, NaN where a window leaves the image.
    c = np.nancumsum(np.nan_to_num(prof, nan=0.0), axis=1)
    c = np.concatenate([np.zeros((rays, 1)), c], 1)
    n = len(radii)
    idx = np.arange(n)
    lo_in, hi_in = idx - g - w, idx - g
    lo_out, hi_out = idx + g, idx + g + w
    ok = (lo_in >= 0) & (hi_out <= n)
    lo_in, hi_in, lo_out, hi_out = (np.clip(v, 0, n) for v in (lo_in, hi_in, lo_out, hi_out))
    m_in = (c[:, hi_in] - c[:, lo_in]) / w
    m_out = (c[:, hi_out] - c[:, lo_out]) / w
    valid = ok & np.isfinite(prof) & inside[:, np.minimum(idx + g + w - 1, n - 1)]
    ratio = np.where(valid & (m_out > 0), m_in / np.maximum(m_out, 1e-12), np.where(valid, np.inf, 0.0))
    best = ratio.argmax(1)
    found = ratio[np.arange(rays), best] >= min_ratio
    pts = []
    for k in np.nonzero(found)[0]:
        b = best[k]
        mid = 0.5 * (m_in[k, b] + m_out[k, b])
        r = _crossing(prof[k], b - g, b + g, mid)
        pts.append((cx + math.cos(theta[k]) * r, cy + math.sin(theta[k]) * r))
    return np.array(pts).reshape(-1, 2), rays


def _crossing(profile: np.ndarray, lo: int, hi: int, level: float) -> float:
    """Sub-pixel position (bin units) of the last downward crossing of ``level`` in profile[lo:hi]."""
    lo, hi = max(lo, 0), min(hi, len(profile) - 1)
    seg = profile[lo : hi + 1]
    above = seg >= level
    for i in range(len(seg) - 1, 0, -1):
        if above[i - 1] and not above[i]:
            a, b = seg[i - 1], seg[i]
            return lo + i - 1 + (a - level) / max(a - b, 1e-12)
    return float(lo + hi) / 2


def detect_circle(intensity: np.ndarray, min_ratio: float, seed: int = 0) -> tuple[float, float, float] | None:
    """An image intensifier's circular field -> (cx, cy, radius) px, or None.

    A circle is kept when its rim holds on at least 10 % of the rays and on at least twice as many
    rays as contradict it (rays whose rim lies in the image but whose drop is outside the circle or
    missing; a drop inside it is a blade hiding the rim).
    """
    H, W = intensity.shape
    pts, rays = _ray_edges(intensity, min_ratio)
    if len(pts) < max(8, rays // 10):
        return None
    rng = np.random.default_rng(seed)
    tol = max(1.5, 0.004 * max(H, W))
    best, best_in = None, None
    for _ in range(300):
        pick = pts[rng.choice(len(pts), 3, replace=False)]
        fit = _fit_circle(pick[:, 0], pick[:, 1])
        if fit is None:
            continue
        d = np.abs(np.hypot(pts[:, 0] - fit[0], pts[:, 1] - fit[1]) - fit[2])
        inl = d < tol
        if best_in is None or inl.sum() > best_in.sum():
            best, best_in = fit, inl
    if best is None or best_in.sum() < rays // 10:
        return None
    fit = _fit_circle(pts[best_in, 0], pts[best_in, 1])
    if fit is None or not 0.2 * min(H, W) <= fit[2] <= math.hypot(H, W) / 2:
        return None
    cx, cy, r = fit
    d = np.hypot(pts[:, 0] - cx, pts[:, 1] - cy) - r
    inliers = int((np.abs(d) < tol).sum())
    # Rim points in the image (with room for the drop's windows) that no inlier explains.
    theta = np.linspace(0, 2 * math.pi, rays, endpoint=False)
    rim_x, rim_y = cx + r * np.cos(theta), cy + r * np.sin(theta)
    margin = 0.03 * max(H, W)
    visible = int(((rim_x > margin) & (rim_x < W - margin) & (rim_y > margin) & (rim_y < H - margin)).sum())
    contradicting = visible - inliers - int((d < -tol).sum())
    if inliers < 2 * max(contradicting, 0) or not (~circle_mask((H, W), cx, cy, r)).any():
        return None
    return fit


# --------------------------------------------------------------------------------------------
# blades
# --------------------------------------------------------------------------------------------
def side_coordinates(shape, side: str, angle: float, scale: float = 1.0):
    """(s, t): distance into the image from ``side`` along its normal turned by ``angle`` (rad), and
    position along it, px, for pixel centres of an image of ``shape`` (``scale``: px per pixel)."""
    return _turned(*_side_offsets(shape, side, scale), side, angle)


def _side_offsets(shape, side: str, scale: float = 1.0):
    """(dx, dy) px of the pixel centres from the middle of ``side`` (what every angle shares)."""
    H, W = shape
    yy, xx = np.meshgrid((np.arange(H) + 0.5) * scale, (np.arange(W) + 0.5) * scale, indexing="ij")
    Hs, Ws = H * scale, W * scale
    origin = {"left": (0.0, Hs / 2), "right": (Ws, Hs / 2), "top": (Ws / 2, 0.0), "bottom": (Ws / 2, Hs)}[side]
    return xx - origin[0], yy - origin[1]


def _turned(dx, dy, side: str, angle: float):
    """:func:`side_coordinates` from :func:`_side_offsets`."""
    c, s = math.cos(angle), math.sin(angle)
    normal = {"left": (c, s), "right": (-c, -s), "top": (-s, c), "bottom": (s, -c)}[side]
    return dx * normal[0] + dy * normal[1], -dx * normal[1] + dy * normal[0]


def _profiles(weighted, weight, s, t, nbins: int, segments: int, t_half: float):
    """Sums of ``weighted`` (intensity x weight) and weight per (segment along t, 1 px band of s)
    -> (K, nbins) x2."""
    sb = np.floor(s).astype(np.int64)
    kb = np.clip(((t + t_half) / (2 * t_half) * segments).astype(np.int64), 0, segments - 1)
    use = (sb >= 0) & (sb < nbins) & (weight > 0)
    idx = kb[use] * nbins + sb[use]
    num = np.bincount(idx, weights=weighted[use], minlength=segments * nbins)
    den = np.bincount(idx, weights=weight[use], minlength=segments * nbins)
    return num.reshape(segments, nbins), den.reshape(segments, nbins)


def _step_scores(num, den, g: int, w: int, min_ratio: float):
    """Per band: min over segments of log(inside / outside) and the two levels -> (score, m_in, m_out)."""
    K, n = num.shape
    cn = np.concatenate([np.zeros((K, 1)), np.cumsum(num, 1)], 1)
    cd = np.concatenate([np.zeros((K, 1)), np.cumsum(den, 1)], 1)
    idx = np.arange(n)
    lo_out, hi_out = np.clip(idx - g - w, 0, n), np.clip(idx - g, 0, n)
    lo_in, hi_in = np.clip(idx + g, 0, n), np.clip(idx + g + w, 0, n)
    d_in, d_out = cd[:, hi_in] - cd[:, lo_in], cd[:, hi_out] - cd[:, lo_out]
    m_in = (cn[:, hi_in] - cn[:, lo_in]) / np.maximum(d_in, 1e-12)
    m_out = (cn[:, hi_out] - cn[:, lo_out]) / np.maximum(d_out, 1e-12)
    # Everything from the border up to the edge must be dark, not only the band next to it.
    d_all = cd[:, hi_out]
    m_all = cn[:, hi_out] / np.maximum(d_all, 1e-12)
    enough = (d_in >= 0.5 * w * d_in.max(1, keepdims=True) / (g + w)) & (d_out >= 1)
    log_r = np.log(np.maximum(m_in, 1e-12) / np.maximum(np.maximum(m_out, m_all), 1e-12))
    log_r = np.where(enough, log_r, np.nan)
    counted = np.isfinite(log_r).sum(0)
    with np.errstate(all="ignore"):
        score = np.where(counted >= max(3, K // 2), np.nanmin(np.where(np.isfinite(log_r), log_r, np.inf), 0), -np.inf)
    score[: g + 1] = -np.inf  # an edge needs some dark band before it
    tot_in = (cn[:, hi_in] - cn[:, lo_in]).sum(0) / np.maximum(d_in.sum(0), 1e-12)
    tot_out = (cn[:, hi_out] - cn[:, lo_out]).sum(0) / np.maximum(d_out.sum(0), 1e-12)
    return score, tot_in, tot_out


def _search(intensity, weight, side, angles, lo, hi, g, w, min_ratio, segments):
    """Best (score, angle, band index) over ``angles`` and bands [lo, hi)."""
    H, W = intensity.shape
    extent = W if side in ("left", "right") else H
    t_half = (H if side in ("left", "right") else W) / 2
    # Only weighted pixels add to a profile: drop the others once, not at every angle (their order,
    # and so every sum, stays the same).
    on = weight > 0
    dx, dy = (d[on] for d in _side_offsets((H, W), side))
    weighted, weight = (intensity * weight)[on], weight[on]
    best = (-np.inf, 0.0, 0)
    for a in angles:
        s, t = _turned(dx, dy, side, a)
        num, den = _profiles(weighted, weight, s, t, extent + 1, segments, t_half)
        score = _step_scores(num, den, g, w, min_ratio)[0]
        score[:lo] = -np.inf
        score[hi:] = -np.inf
        k = int(np.argmax(score))
        if score[k] > best[0]:
            best = (float(score[k]), float(a), k)
    return best


def detect_blade(intensity, keep, side, min_ratio, max_angle_deg, max_depth, segments):
    """One collimator blade on ``side`` -> (angle rad, offset px, slope), or None (see :func:`_fit_edge`)."""
    H, W = intensity.shape
    f = max(1, math.ceil(max(H, W) / _COARSE))
    weight = keep.astype(np.float64)
    if f > 1:
        hc, wc = H // f, W // f
        num = (intensity * weight)[: hc * f, : wc * f].reshape(hc, f, wc, f).sum((1, 3))
        den = weight[: hc * f, : wc * f].reshape(hc, f, wc, f).sum((1, 3))
        coarse, cw = num / np.maximum(den, 1e-12), (den >= 0.5 * f * f).astype(np.float64)
    else:
        coarse, cw = intensity, weight
    extent_c = coarse.shape[1] if side in ("left", "right") else coarse.shape[0]
    g, w = max(2, round(0.01 * extent_c)), max(3, round(0.015 * extent_c))
    angles = np.radians(np.arange(-max_angle_deg, max_angle_deg + 1e-9, 0.5))
    score, a, k = _search(coarse, cw, side, angles, g + 1, int(max_depth * extent_c), g, w, min_ratio, segments)
    if score < math.log(min_ratio):
        return None
    return _fit_edge(intensity, weight, side, a, (k + 0.5) * f, 2 * f + 2)


def _fit_edge(intensity, weight, side, angle, centre, reach, pieces: int = 16):
    """The blade's edge at full resolution near the coarse line ``s = centre`` at ``angle``:
    the mid-level crossing in each of ``pieces`` along it, and a straight line fitted through
    them -> (angle, offset, slope): the field is ``s - slope * t >= offset``."""
    H, W = intensity.shape
    extent = W if side in ("left", "right") else H
    t_half = (H if side in ("left", "right") else W) / 2
    g, w = max(2, round(0.01 * extent)), max(3, round(0.015 * extent))
    s, t = side_coordinates((H, W), side, angle)
    band = np.abs(s - centre) <= reach + g + w + 2
    num, den = _profiles((intensity * weight)[band], weight[band], s[band], t[band], extent + 1, pieces, t_half)
    c = int(round(centre))
    t_mid, s_mid = [], []
    for k in range(pieces):
        m = num[k] / np.maximum(den[k], 1e-12)
        lo_o, hi_i = max(c - reach - g - w, 0), min(c + reach + g + w, extent)
        if den[k, lo_o:c - reach - g].sum() < 1 or den[k, c + reach + g:hi_i].sum() < 1:
            continue
        outside = float(np.average(m[lo_o:c - reach - g], weights=den[k, lo_o:c - reach - g] + 1e-12))
        inside = float(np.average(m[c + reach + g:hi_i], weights=den[k, c + reach + g:hi_i] + 1e-12))
        if not inside > 2 * outside:
            continue
        t_mid.append(-t_half + (k + 0.5) * 2 * t_half / pieces)
        s_mid.append(_rising(m, c - reach - g, c + reach + g, 0.5 * (inside + outside)))
    t_mid, s_mid = np.array(t_mid), np.array(s_mid)
    if len(t_mid) < 4:
        return angle, float(centre), 0.0
    use = np.ones(len(t_mid), dtype=bool)
    for _ in range(3):
        slope, offset = np.polyfit(t_mid[use], s_mid[use], 1)
        residual = np.abs(s_mid - (offset + slope * t_mid))
        use = residual <= max(1.5, float(np.median(residual[use])) * 3)
        if use.sum() < 4:
            break
    return angle, float(offset), float(slope)


def _rising(profile: np.ndarray, lo: int, hi: int, level: float) -> float:
    """Sub-pixel band position (px) where ``profile`` first rises through ``level`` in [lo, hi]."""
    lo, hi = max(lo, 0), min(hi, len(profile) - 1)
    seg = profile[lo : hi + 1]
    for i in range(1, len(seg)):
        if seg[i - 1] < level <= seg[i]:
            # Band i holds s in [i, i + 1): its mean sits at the band's centre.
            return lo + i - 0.5 + (level - seg[i - 1]) / max(seg[i] - seg[i - 1], 1e-12)
    return float(lo + hi) / 2 + 0.5
