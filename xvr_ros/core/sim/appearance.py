"""What a C-arm's image chain does to the X-rays a CT predicts: the one appearance model.

Used by the simulator (:mod:`.simulate`, :mod:`.session`), so the benches, the demo and the
bags see the same kind of image, and meant for the network's training augmentations too.
It works in **detector-count space**: it takes the transmitted fraction ``T = exp(-L)`` of
every pixel and returns integer detector counts as a driver delivers them, so what reaches the
registration has gone through the same reading path (``-log(I / I0)``) as a real image.

In the order the physics applies:

1. **Field of view.** ``"blades"``: a rectangular collimator, a random subset (at least one) of
   four blades, the pair rotated together by a few degrees plus a small jitter each; ``"circle"``:
   an image-intensifier's circular field with vignetting (brightness falling towards the rim);
   ``"iris"``: both. Every edge is soft (a Gaussian penumbra of ``penumbra_mm`` at the detector),
   and what lies outside is not black but attenuated to ``leakage`` (1-5 %) of the beam, with its
   own quantum noise: dark, noisy, and still showing some anatomy.
2. **Heel effect / scatter**: a smooth multiplicative ramp of amplitude ``background``.
3. **Automatic exposure**: the dose is set so the brightest 1 % of the field reaches ``exposure``
   of the full scale. **Quantum noise**: Poisson counts at ``photons`` per full-scale pixel.
4. **Detector gain and gamma**: counts scaled to ``full_scale`` (12-bit) and raised to ``gamma``.
5. **Saturation**: the brightest ``saturation`` fraction of the field clips at one value.
6. **Burned-in text and markers** at one to three corners, at the saturating value.

Returns the counts and the TRUE field-of-view mask (pixels that show anatomy: inside every edge,
not text, not saturated). The mask is for scoring only: a registration never sees it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from xvr_ros.core.geometry import Detector

__all__ = ["FIELDS", "FULL_SCALE", "AppearanceModel", "Degraded", "draw"]

#: Detector counts of an unattenuated, unsaturated pixel: a 12-bit detector.
FULL_SCALE = 4095.0
FIELDS = ("blades", "circle", "iris")


def draw(rng: np.random.Generator, value) -> float:
    """A number, or uniform in a ``(lo, hi)`` range."""
    if isinstance(value, (tuple, list)):
        lo, hi = float(value[0]), float(value[1])
        return lo + (hi - lo) * float(rng.random())
    return float(value)


@dataclass
class Degraded:
    """An image as a detector delivers it.

    counts: (H, W) float64 integer-valued detector counts in ``[0, full_scale]``.
    fov: (H, W) bool, True where the pixel shows anatomy (scoring only).
    params: what was drawn.
    """

    counts: np.ndarray
    fov: np.ndarray
    params: dict


@dataclass
class AppearanceModel:
    """The ranges an image's appearance is drawn from; a number fixes a value, None turns an effect off.

    field: None, ``"blades"``, ``"circle"``, ``"iris"`` or ``"random"`` (one of the three).
    leakage: transmitted fraction behind a blade or outside the circle.
    penumbra_mm: Gaussian sigma of every field edge at the detector, mm.
    exposure: fraction of the full scale the field's 99th percentile is exposed to.
    photons: quanta per full-scale pixel (None: no noise).
    gamma: exponent of the detector's transfer curve on the counts.
    background: amplitude of the multiplicative heel/scatter ramp.
    saturation: fraction of the field clipped at the saturating value.
    text: draw burned-in text/markers at the corners.
    full_scale: counts of an unattenuated pixel.
    """

    field: str | None = "random"
    leakage: float | tuple[float, float] = (0.01, 0.05)
    penumbra_mm: float | tuple[float, float] | None = (0.3, 1.5)
    exposure: float | tuple[float, float] = (0.6, 0.9)
    photons: float | tuple[float, float] | None = (3e3, 3e4)
    gamma: float | tuple[float, float] | None = (0.8, 1.25)
    background: float | tuple[float, float] | None = (0.0, 0.1)
    saturation: float | tuple[float, float] | None = (0.0, 0.02)
    text: bool = True
    full_scale: float = FULL_SCALE

    def __post_init__(self):
        if self.field not in (None, "random", *FIELDS):
            raise ValueError(f"field must be None, 'random' or one of {FIELDS}, got {self.field!r}")

    def apply(
        self,
        transmission: np.ndarray,
        detector: Detector,
        rng: np.random.Generator,
        setting: np.random.Generator | None = None,
    ) -> Degraded:
        """(H, W) transmitted fraction ``exp(-L)`` in [0, 1] on ``detector`` -> :class:`Degraded`.

        Every effect draws in a fixed order from ``rng``, whether or not it is on, so switching one
        effect off leaves the others' draws unchanged.

        ``setting``: a fluoroscopy run's fixed draws. If given, everything a C-arm holds during a run
        (field of view, heel ramp, exposure and dose setting, gamma, saturation, burned-in text) draws
        from it and only the quantum noise from ``rng``, so generators in the same state give images
        that differ in their noise alone. Pass a fresh generator per image.
        """
        T = np.asarray(transmission, dtype=np.float64)
        if T.shape != detector.shape or not np.isfinite(T).all():
            raise ValueError(f"transmission must be finite with the detector's shape {detector.shape}")
        H, W = T.shape
        streams = rng.spawn(6)
        noise = streams[2]  # without a setting, the exposure's own stream, as always: images stay bit-identical
        if setting is not None:
            streams = setting.spawn(6)
        aperture, fov, field_params = field_of_view(self, streams[0], detector)
        ramp, bg = _ramp(self.background, streams[1], H, W)
        expected = np.clip(T, 0.0, 1.0) * aperture * ramp
        bright = float(np.quantile(expected[fov] if fov.any() else expected, 0.99))
        expected = expected * draw(streams[2], self.exposure) / max(bright, 1e-9)
        n0 = draw(streams[2], self.photons) if self.photons else 0.0
        quanta = noise.poisson(n0 * expected) / n0 if n0 > 0 else expected
        g = draw(streams[3], self.gamma) if self.gamma else 1.0
        counts = self.full_scale * np.clip(quanta, 0.0, None) ** g
        sat = draw(streams[4], self.saturation) if self.saturation else 0.0
        clip = self.full_scale
        if sat > 0 and fov.any():
            clip = min(clip, float(np.quantile(counts[fov], 1.0 - sat)))
        counts = np.round(np.minimum(counts, clip))
        saturated = counts >= round(clip)
        text_params = None
        if self.text:
            glyphs, text_params = burned_in_text(streams[5], H, W)
            counts[glyphs] = round(clip)
            saturated |= glyphs
        return Degraded(
            counts=counts,
            fov=fov & ~saturated,
            params={"field": field_params, "background": bg, "photons": n0, "gamma": g, "saturation": sat,
                    "clip": float(clip), "text": text_params},
        )


def _ramp(background, rng: np.random.Generator, H: int, W: int) -> tuple[np.ndarray, float]:
    """A smooth multiplicative ramp in ``[1 - bg, 1]`` in a random direction (heel effect, scatter)."""
    bg = draw(rng, background) if background else 0.0
    theta = rng.random() * 2 * math.pi
    yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    s = (math.cos(theta) * xx + math.sin(theta) * yy) / (2 * math.sqrt(2)) + 0.5  # in [0, 1]
    return 1.0 - bg * s, bg


def _edge(distance: np.ndarray, sigma: float, leakage: float) -> np.ndarray:
    """Transmission across a soft edge at signed ``distance`` (px, > 0 inside)."""
    inside = ndtr(distance / sigma) if sigma > 0 else (distance >= 0).astype(np.float64)
    return leakage + (1.0 - leakage) * inside


def field_of_view(model: AppearanceModel, rng: np.random.Generator, detector: Detector):
    """-> (aperture (H, W) transmission in [leakage, 1], fov (H, W) bool, params)."""
    H, W = detector.shape
    u = rng.random(16)  # fixed number of draws: the kind, the blades and the circle draw from their own slots
    kind = model.field
    if kind == "random":
        kind = FIELDS[min(int(u[0] * len(FIELDS)), len(FIELDS) - 1)]
    leak = draw(rng, model.leakage)
    sigma = (draw(rng, model.penumbra_mm) if model.penumbra_mm else 0.0) / min(detector.delx, detector.dely)
    aperture = np.ones((H, W))
    fov = np.ones((H, W), dtype=bool)
    params: dict = {"kind": kind, "leakage": leak, "penumbra_px": sigma}
    if kind is None:
        return aperture, fov, params
    yy, xx = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    if kind in ("circle", "iris"):
        cx, cy = W / 2 + (u[1] - 0.5) * 0.1 * W, H / 2 + (u[2] - 0.5) * 0.1 * H
        radius = (0.42 + 0.12 * u[3]) * min(H, W)
        vignetting = 0.1 + 0.2 * u[4]
        r = np.hypot(xx - cx, yy - cy)
        aperture = aperture * _edge(radius - r, sigma, leak) * (1.0 - vignetting * np.minimum(r / radius, 1.0) ** 2)
        fov &= r <= radius
        params.update(centre=(cx, cy), radius=radius, vignetting=vignetting)
    if kind in ("blades", "iris"):
        present = u[5:9] < 0.6
        if not present.any():
            present[int(u[9] * 4) % 4] = True
        phi = math.radians((u[10] - 0.5) * 10.0)  # the collimator turned by up to ±5°
        margins = 0.04 + 0.16 * rng.random(4)  # left, right, top, bottom: fraction of the size
        jitter = np.radians((rng.random(4) - 0.5) * 2.0)
        blades = []
        for i, (side, m) in enumerate(zip(("left", "right", "top", "bottom"), margins)):
            if not present[i]:
                continue
            a = phi + jitter[i]
            # Unit normal pointing into the field; the blade's line passes m of the size in from its side.
            if side in ("left", "right"):
                n = np.array([math.cos(a), math.sin(a)]) * (1 if side == "left" else -1)
                p = np.array([m * W if side == "left" else (1 - m) * W, H / 2])
            else:
                n = np.array([-math.sin(a), math.cos(a)]) * (1 if side == "top" else -1)
                p = np.array([W / 2, m * H if side == "top" else (1 - m) * H])
            d = (xx - p[0]) * n[0] + (yy - p[1]) * n[1]
            aperture = aperture * _edge(d, sigma, leak)
            fov &= d >= 0
            blades.append({"side": side, "margin": float(m), "angle_deg": math.degrees(a)})
        params["blades"] = blades
    return aperture, fov, params


def burned_in_text(rng: np.random.Generator, H: int, W: int) -> tuple[np.ndarray, dict]:
    """(H, W) bool glyph pixels of 1-3 short lines of blocky text in the image's corners."""
    mask = np.zeros((H, W), dtype=bool)
    k = max(1, min(H, W) // 200)  # glyph cell scale: 5x7 cells of k px
    corners = rng.permutation(4)[: int(rng.integers(1, 4))]
    lines = []
    for c in corners:
        n = int(rng.integers(3, 10))
        glyphs = rng.random((n, 7, 5)) < 0.45
        text = np.concatenate([np.pad(g, ((0, 0), (0, 1))) for g in glyphs], axis=1)
        text = np.kron(text, np.ones((k, k), dtype=bool))
        h, w = text.shape
        if h + 4 * k > H or w + 4 * k > W:
            continue
        y = 2 * k if c < 2 else H - h - 2 * k
        x = 2 * k if c % 2 == 0 else W - w - 2 * k
        mask[y : y + h, x : x + w] |= text
        lines.append({"corner": int(c), "characters": n, "box": (y, x, h, w)})
    return mask, {"lines": lines, "pixels": int(mask.sum())}
