"""Training augmentations: what a C-arm shows, and intensity post-processing.

Two kinds, both leaving the pose label valid:

- :class:`CarmAugment`, what a C-arm's image of the same pose looks like: an instrument in the
  beam (a K-wire or screw, the simulator's), focal-spot blur, a detector that sees the rendered
  field (rendered larger than the canonical one, as real detectors are) or a random sub-field of
  it, at its own pixel size and principal point (zoom and pan: these change the intrinsics, never
  the pose), and the C-arm's image chain in detector counts (the
  simulator's :class:`~xvr_ros.core.sim.appearance.AppearanceModel`: collimator blades, the
  image intensifier's circle, heel ramp, quantum noise, gamma, saturation, burned-in text). The
  image is then brought back to the canonical detector as inference does it
  (:func:`~xvr_ros.core.model.inference.network_input`: Eq. 26 resampling, outside the field of
  view filled), so a zoomed or panned view keeps its label.
- :func:`augment`: random intensity post-processing (gamma, local contrast, blur, sharpen, noise,
  erasing, border collimation) of min-max scaled images, never geometric.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from xvr_ros.core.geometry import Detector
from xvr_ros.core.imaging import gaussian_blur
from xvr_ros.core.intrinsics import crop_detector, resample_to_intrinsics
from xvr_ros.core.model.inference import detected_field_of_view, network_input
from xvr_ros.core.sim.appearance import AppearanceModel, draw
from xvr_ros.core.sim.simulate import add_foreign_object


@dataclass
class CarmAugment:
    """The ranges a C-arm view of a rendered DRR is drawn from (a number fixes a value).

    appearance: the image chain (field of view, noise, gamma, ...), in detector counts.
    attenuation: nepers of the image's densest ray (sets the dose the noise is drawn at).
    blur: Gaussian PSF sigma, canonical pixels; None: no blur.
    instrument_p: probability of a wire or screw in the beam.
    subfield_p: probability of a detector that sees only part of the rendered field.
    field_fraction: a sub-field's height and width, fraction of the rendered field's.
    pixel_scale: the view's pixel size over the canonical one (< 1: finer pixels).
    """

    appearance: AppearanceModel = field(default_factory=AppearanceModel)
    attenuation: float | tuple[float, float] = (3.0, 5.0)
    blur: float | tuple[float, float] | None = (0.3, 1.0)
    instrument_p: float = 0.5
    subfield_p: float = 0.5
    field_fraction: float | tuple[float, float] = (0.5, 1.0)
    pixel_scale: float | tuple[float, float] = (0.5, 1.5)

    def view(self, source: Detector, rng: np.random.Generator) -> Detector:
        """A detector seeing the ``source`` field or a random sub-field of it, at a random pixel size."""
        H, W = source.shape
        u = rng.random(3)
        view = source
        if u[0] < self.subfield_p:
            h = min(H, max(8, round(draw(rng, self.field_fraction) * H)))
            w = min(W, max(8, round(draw(rng, self.field_fraction) * W)))
            top, left = int(u[1] * (H - h + 1)), int(u[2] * (W - w + 1))
            view = crop_detector(source, top, H - h - top, left, W - w - left)
        return view.scaled(draw(rng, self.pixel_scale))

    def apply(
        self, lines: torch.Tensor, pose: torch.Tensor, source: Detector, rng: np.random.Generator, mu_scale: float
    ) -> tuple[torch.Tensor, Detector, torch.Tensor]:
        """One (H, W) DRR at ``source`` and its (4, 4) pose -> the C-arm's image of it.

        ``mu_scale``: the CT's densest attenuation (the instrument is 10x denser).
        Returns (1, 1, h, w) float32 line integrals ``-log(counts / full_scale)`` at the drawn view
        detector, that detector, and the (1, 1, h, w) bool true field of view.
        """
        img = lines.detach().to(torch.float64).cpu()
        top = float(img.max())
        scale = draw(rng, self.attenuation) / (top if top > 0 else 1.0)
        if rng.random() < self.instrument_p:
            img, _ = add_foreign_object(img, "random", rng, pose.detach().cpu(), source, mu_scale)
        sigma = draw(rng, self.blur) if self.blur else 0.0
        if sigma > 0:
            img = gaussian_blur(img[None, None], sigma)[0, 0]
        view = self.view(source, rng)
        img, _ = resample_to_intrinsics(img[None, None], source, view)
        model = self.appearance
        degraded = model.apply(np.exp(-scale * img[0, 0].clamp_min(0).numpy()), view, rng)
        image = -np.log(np.maximum(degraded.counts, 0.5) / model.full_scale)
        return (
            torch.from_numpy(image).to(torch.float32)[None, None],
            view,
            torch.from_numpy(degraded.fov)[None, None],
        )


def carm_views(
    lines: torch.Tensor,
    poses: torch.Tensor,
    source: Detector,
    canonical: Detector,
    rng: np.random.Generator,
    carm: CarmAugment,
    p: float,
    mu_scale: float,
    detect_fov: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, Hs, Ws) DRRs at ``source`` and their (B, 4, 4) poses -> (B, 1, H, W) network inputs at
    ``canonical``, and the (B, 1, H, W) bool mask of the pixels that show anatomy.

    ``source`` may see more than ``canonical`` (a real detector's field usually does). Each image
    becomes, with probability ``p``, a C-arm view (:meth:`CarmAugment.apply`) brought to
    ``canonical`` by :func:`~xvr_ros.core.model.inference.network_input` with its field of view:
    the true one, or the detected one (as inference does, ~0.1 s an image) when ``detect_fov``;
    the others are the clean DRRs resampled to ``canonical`` (a crop when the pixel grids align).
    """
    if source == canonical:
        out, valid = lines.clone(), torch.ones_like(lines, dtype=torch.bool)
    else:
        out, valid = network_input(lines, source, canonical)
        valid = valid.clone()  # resampling shares one mask across the batch; each image gets its own
    for b in range(len(lines)):
        if rng.random() >= p:
            continue
        image, view, fov = carm.apply(lines[b, 0], poses[b], source, rng, mu_scale)
        if detect_fov:
            fov = detected_field_of_view(image)
        image, inside = network_input(image, view, canonical, fov)
        out[b], valid[b] = image[0].to(out), inside[0].to(valid.device)
    return out, valid


def augment(img: torch.Tensor, generator: torch.Generator, p: float = 0.333) -> torch.Tensor:
    """Random intensity augmentations of (B, 1, H, W) images scaled to [0, 1], each with probability p.

    Noise, local contrast equalisation, blur, sharpen, gamma, random rectangular masking and
    simulated collimation — never geometric.
    """
    B, _, H, W = img.shape
    out = []
    for x in img.split(1):
        def coin():
            return float(torch.rand((), generator=generator)) < p

        def uniform(lo, hi):
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        if coin():  # gamma: detectors and post-processing bend the intensity curve
            x = x.clamp(min=0) ** uniform(0.7, 1.8)
        if coin():  # local contrast equalisation, as CLAHE-like post-processing does
            local = gaussian_blur(x, uniform(4, 12))
            x = (x + uniform(0.5, 2.0) * (x - local)).clamp(0, 1)
        if coin():
            x = gaussian_blur(x, uniform(0.5, 1.5))
        if coin():  # sharpen (unsharp mask)
            x = (x + uniform(0.3, 1.0) * (x - gaussian_blur(x, 1.0))).clamp(0, 1)
        if coin():
            x = x + uniform(0.005, 0.03) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        if coin():  # random rectangular masking (erasing)
            h, w = int(uniform(0.05, 0.3) * H), int(uniform(0.05, 0.3) * W)
            r, c = int(uniform(0, H - h)), int(uniform(0, W - w))
            x = x.clone()
            x[..., r : r + h, c : c + w] = uniform(0, 1)
        if coin():  # simulated collimation: zero a margin on each side
            m = [int(uniform(0, 0.12) * s) for s in (H, H, W, W)]
            x = x.clone()
            x[..., : m[0], :] = 0
            x[..., H - m[1] :, :] = 0
            x[..., :, : m[2]] = 0
            x[..., :, W - m[3] :] = 0
        out.append(x)
    return torch.cat(out)


def minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1, 1)
    hi = flat.amax(1).view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo + 1e-6)
