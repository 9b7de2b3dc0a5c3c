from dataclasses import replace

import numpy as np
import pytest
import torch

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.model.inference import fill_outside, network_input
from xvr_ros.core.sim.appearance import AppearanceModel
from xvr_ros.core.train.augment import CarmAugment, carm_views

CANONICAL = Detector(1000.0, 64, 64, 4.0, 4.0)
POSE = carm_pose(torch.tensor([[10.0, 5.0, 0.0]]), torch.tensor([[0.0, 600.0, 0.0]]), degrees=True)
FIDUCIAL = torch.tensor([[12.0, -8.0, 15.0]])  # world mm, near the isocenter
# An ideal image chain: no field edge, noise, gamma, ramp, saturation or text; only the log transform.
PLAIN = AppearanceModel(field=None, penumbra_mm=None, exposure=0.8, photons=None, gamma=None, background=None,
                        saturation=None, text=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def blob(detector: Detector, uv: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """(H, W) line integrals: a Gaussian of ``sigma`` px centred at pixel coordinates ``uv``."""
    v, u = torch.meshgrid(torch.arange(detector.height) + 0.5, torch.arange(detector.width) + 0.5, indexing="ij")
    return torch.exp(-((u - uv[0]) ** 2 + (v - uv[1]) ** 2) / (2 * sigma**2)).double()


def centroid(image: torch.Tensor) -> torch.Tensor:
    """(u, v) pixel coordinates of the mass of ``image`` above its lowest value."""
    w = (image - image.min()).clamp_min(0)
    v, u = torch.meshgrid(torch.arange(image.shape[0]) + 0.5, torch.arange(image.shape[1]) + 0.5, indexing="ij")
    return torch.stack([(w * u).sum() / w.sum(), (w * v).sum() / w.sum()])


def test_zoom_and_pan_keep_the_pose_label():
    # A zoomed/panned view changes the intrinsics, not the pose: the fiducial the canonical DRR shows
    # at CANONICAL.project(POSE, X) must appear at view.project(POSE, X) in the view, and back at the
    # canonical pixel after Eq. 26 resampling.
    carm = CarmAugment(appearance=PLAIN, attenuation=2.0, blur=None, instrument_p=0.0, subfield_p=1.0,
                       field_fraction=(0.6, 0.9), pixel_scale=(0.6, 1.4))
    uv = CANONICAL.project(POSE, FIDUCIAL)[0, 0]
    lines = blob(CANONICAL, uv)
    checked = 0
    for seed in range(8):
        image, view, fov = carm.apply(lines, POSE[0], CANONICAL, np.random.default_rng(seed), mu_scale=1.0)
        assert (view.shape, view.x0, view.y0, view.delx) != (CANONICAL.shape, 0.0, 0.0, CANONICAL.delx)
        expected = view.project(POSE, FIDUCIAL)[0, 0]
        margin = 4 * 1.5 * CANONICAL.delx / view.delx
        if not (margin < expected[0] < view.width - margin and margin < expected[1] < view.height - margin):
            continue
        checked += 1
        torch.testing.assert_close(centroid(image[0, 0].double()), expected.double(), atol=0.15, rtol=0)
        back, valid = network_input(image, view, CANONICAL, fov)
        torch.testing.assert_close(centroid(back[0, 0].double()), uv.double(), atol=0.15, rtol=0)
    assert checked >= 3


def test_carm_views_shapes_ranges_and_field():
    lines = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 5
    poses = POSE.float().expand(4, 4, 4)
    same, valid = carm_views(lines, poses, CANONICAL, CANONICAL, np.random.default_rng(0), CarmAugment(), 0.0, 1.0)
    assert torch.equal(same, lines) and valid.all()  # p = 0: the DRRs as rendered
    # Rendered with 8 more pixels on every side: the clean images are the canonical centre.
    big = replace(CANONICAL, height=80, width=80)
    wide = torch.rand(4, 1, 80, 80, generator=torch.Generator().manual_seed(1)) * 5
    same, valid = carm_views(wide, poses, big, CANONICAL, np.random.default_rng(0), CarmAugment(), 0.0, 1.0)
    torch.testing.assert_close(same, wide[..., 8:72, 8:72])
    assert valid.all()
    out, valid = carm_views(wide, poses, big, CANONICAL, np.random.default_rng(0), CarmAugment(), 1.0, 1.0)
    assert out.shape == lines.shape and valid.shape == lines.shape and valid.dtype == torch.bool
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert len({float(m.float().mean()) for m in valid}) > 1  # each image its own field
    for x, m in zip(out, valid):
        assert 0.05 < m.float().mean() < 1.0  # every view has a field edge (blades, circle or both)
        assert torch.all(x[~m] == x[m].min())  # outside the field: the field's lowest value


def test_fill_outside():
    img = torch.tensor([[[[3.0, 1.0], [2.0, 9.0]]], [[[4.0, 5.0], [6.0, 7.0]]]])
    valid = torch.tensor([[[[True, False], [True, False]]], [[[False, False], [False, False]]]])
    out = fill_outside(img, valid)
    assert out[0, 0].tolist() == [[3.0, 2.0], [2.0, 2.0]]
    assert out[1].eq(0).all()  # nothing valid: zeros
