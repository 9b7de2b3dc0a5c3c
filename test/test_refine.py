"""Coarse-to-fine pose refinement on an analytic phantom (core/refine.py)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.metrics import mtre
from xvr_ros.core.register.refine import auto_scales, depth_gain, pyramid, refine
from xvr_ros.core.render.renderer import Renderer

DET = Detector(sdd=1020.0, height=64, width=64, delx=2.5, dely=2.5)
BLOBS = (  # centre (mm), radii (mm), attenuation (1/mm): deliberately asymmetric
    ((15.0, -5.0, 20.0), (8.0, 8.0, 18.0), 0.06),
    ((-22.0, 10.0, -15.0), (12.0, 6.0, 6.0), 0.05),
    ((8.0, 18.0, -32.0), (6.0, 6.0, 6.0), 0.08),
    ((-10.0, -20.0, 35.0), (5.0, 14.0, 5.0), 0.07),
)


def phantom(n: int = 48, spacing: float = 2.5) -> Volume:
    """A body ellipsoid with ellipsoidal 'bones' and a box, on an n^3 grid centred on the origin."""
    c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    data = 0.02 * ((x / 52) ** 2 + (y / 40) ** 2 + (z / 56) ** 2 <= 1)
    for (cx, cy, cz), (rx, ry, rz), mu in BLOBS:
        data = data + mu * (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1)
    box = (x.abs() - 25).abs() < 4  # two slabs at x = +-25 mm ...
    box &= (y + 5).abs() < 10
    box &= (z - 5).abs() < 20  # ... limited in y and z
    data = data + 0.03 * box
    affine = torch.diag(torch.tensor([spacing] * 3 + [1.0], dtype=torch.float64))
    affine[:3, 3] = -(n - 1) / 2 * spacing
    return Volume(data=data.float(), affine=affine)


FIDUCIALS = torch.tensor([b[0] for b in BLOBS] + [(25.0, -5.0, 5.0), (-25.0, -5.0, 5.0)], dtype=torch.float64)


@pytest.fixture(scope="module")
def setup():
    vol = phantom()
    renderer = Renderer(vol)
    truth = carm_pose(torch.tensor([[10.0, -5.0, 3.0]]), torch.tensor([[4.0, 820.0, -6.0]]), degrees=True).double()
    with torch.no_grad():
        xray = Renderer(vol, method="siddon")(truth, DET)
    return renderer, truth, xray


def offset(truth, rot_deg=(2.0, -2.0, 1.5), xyz_mm=(5.0, -5.0, 4.0)):
    angles, xyz = carm_parameters(truth, degrees=True)
    d_rot, d_xyz = torch.tensor(rot_deg, dtype=truth.dtype), torch.tensor(xyz_mm, dtype=truth.dtype)
    return carm_pose(angles + d_rot, xyz + d_xyz, degrees=True)


def test_recovers_a_small_offset(setup):
    renderer, truth, xray = setup
    init = torch.cat([offset(truth), offset(truth, (-1.5, 1.0, -2.0), (-4.0, 5.0, 3.0))])
    before = mtre(truth.expand(2, 4, 4), init, FIDUCIALS)
    assert (before > 5).all()
    res = refine(renderer, xray, DET, init)
    after = mtre(truth.expand(2, 4, 4), res.pose.double(), FIDUCIALS)
    # ~9 mm -> well under 2 mm (on a 64 px image of 2.5 mm pixels the depth is the weak axis:
    # 1 mm of depth scales this phantom's projection by 0.03 px)
    assert (after < 2.0).all(), (before, after, res.message)
    assert res.converged.all(), res.message
    assert res.scales == auto_scales(DET) == (4.0, 2.0, 1.0)
    assert set(res.time_per_scale) == set(res.scales)
    assert res.iterations == len(res.trajectory) == len(res.trajectory_scale) <= 500
    assert res.trajectory_scale == sorted(res.trajectory_scale, reverse=True)  # coarse to fine
    assert (res.similarity > 0.95).all() and res.similarity.shape == (2,)
    torch.testing.assert_close(res.init_pose, init)
    # the euler and se(3) parameterisations both work
    res_se3 = refine(renderer, xray, DET, init[:1], parameterization="se3")
    assert float(mtre(truth, res_se3.pose.double(), FIDUCIALS)) < 2.0, res_se3.message


def test_masked_corruption_does_not_derail(setup):
    renderer, truth, xray = setup
    corrupted = xray.clone()
    mask = torch.ones_like(xray, dtype=torch.bool)
    corrupted[..., 5:30, 36:60] = 50.0 * xray.max()  # a bright object / burnt-out region
    mask[..., 5:30, 36:60] = False
    corrupted[..., :, :6] = 0.0  # a collimator edge
    mask[..., :, :6] = False
    init = offset(truth)
    res = refine(renderer, corrupted, DET, init, mask=mask)
    assert float(mtre(truth, res.pose.double(), FIDUCIALS)) < 2.0, res.message
    assert res.converged.all()
    # without the mask the corrupted region wins: the same start ends far off
    res_unmasked = refine(renderer, corrupted, DET, init, max_iterations=30)
    assert float(mtre(truth, res_unmasked.pose.double(), FIDUCIALS)) > 2.0


def test_time_budget_zero_returns_the_init_pose_promptly(setup):
    renderer, truth, xray = setup
    init = offset(truth)
    t0 = time.perf_counter()
    res = refine(renderer, xray, DET, init, time_budget=0.0)
    assert time.perf_counter() - t0 < 2.0
    assert not res.converged.any()
    assert res.iterations == 0
    assert torch.equal(res.pose, init)
    assert "time budget" in res.message
    # a short budget stops early, keeps a valid pose and says so
    res = refine(renderer, xray, DET, init, time_budget=0.05)
    assert not res.converged.any() and torch.isfinite(res.pose).all()
    # a callback can stop it (e.g. a cancelled goal)
    calls = []
    res = refine(renderer, xray, DET, init, callback=lambda info: calls.append(info["iteration"]) or len(calls) >= 3)
    assert res.iterations == 3 and not res.converged.any() and "callback" in res.message


def test_poor_start_does_not_raise(setup):
    renderer, truth, xray = setup
    far = carm_pose(torch.tensor([[90.0, 40.0, 0.0]]), torch.tensor([[300.0, 820.0, 300.0]]), degrees=True)
    res = refine(renderer, xray, DET, far, max_iterations=20)
    assert not res.converged.any() and torch.isfinite(res.pose).all() and res.message


def test_invalid_input_raises(setup):
    renderer, truth, xray = setup
    init = offset(truth)
    with pytest.raises(ValueError, match="detector"):
        refine(renderer, xray[..., :32, :], DET, init)
    with pytest.raises(ValueError):
        refine(renderer, xray[0], DET, init)  # not 4D
    bad = xray.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        refine(renderer, bad, DET, init)
    bad_pose = init.clone()
    bad_pose[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        refine(renderer, xray, DET, bad_pose)
    with pytest.raises(ValueError, match="empty"):
        refine(renderer, xray, DET, init, mask=torch.zeros_like(xray, dtype=torch.bool))
    with pytest.raises(ValueError):
        refine(renderer, xray, DET, init, mask=torch.ones(1, 1, 10, 10, dtype=torch.bool))
    with pytest.raises(ValueError):
        refine(renderer, xray.expand(3, 1, 64, 64), DET, torch.cat([init, init]))  # batch mismatch
    with pytest.raises(ValueError):
        refine(renderer, xray, DET, init, scales=(1, 2))  # fine to coarse
    with pytest.raises(ValueError):
        refine(renderer, xray, DET, init, parameterization="quaternion")
    with pytest.raises(ValueError, match="num_threads"):
        refine(renderer, xray, DET, init, num_threads=0)


def test_num_threads_applies_during_the_refinement_only(setup):
    renderer, truth, xray = setup
    before = torch.get_num_threads()
    seen = []
    refine(renderer, xray, DET, offset(truth), max_iterations=2, num_threads=1,
           callback=lambda info: seen.append(torch.get_num_threads()))
    assert seen == [1, 1] and torch.get_num_threads() == before
    refine(renderer, xray, DET, offset(truth), max_iterations=1, num_threads=None,
           callback=lambda info: seen.append(torch.get_num_threads()))
    assert seen[-1] == before


def test_pyramid_keeps_the_physical_detector_and_masks_partial_pixels():
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[..., :, :3] = False
    img, m, det = pyramid(x, mask, DET, 4.0)
    assert det.shape == (16, 16)
    assert math.isclose(det.width * det.delx, DET.width * DET.delx) and det.sdd == DET.sdd
    assert not m[..., :, 0].any() and m[..., :, 1:].all()  # the partly collimated column is invalid
    torch.testing.assert_close(img[..., 1:], torch.nn.functional.avg_pool2d(x, 4)[..., 1:])


@pytest.mark.parametrize("orientation", ["AP", None])
def test_depth_gain_is_along_the_central_ray(orientation):
    """The faster translation axis is the one that moves the source along the central ray: the
    magnification, not the image position, changes."""
    det = Detector(sdd=1020.0, height=48, width=64, delx=1.0, dely=1.0, orientation=orientation)
    gain = depth_gain(det, 4.0)
    assert sorted(gain.tolist()) == [1.0, 1.0, 4.0]
    angles, xyz = torch.tensor([[20.0, -10.0, 5.0]], dtype=torch.float64), torch.tensor([[3.0, 800.0, -4.0]])
    T = carm_pose(angles, xyz.double(), degrees=True)
    moved = carm_pose(angles, xyz.double() + (gain - 1.0) / 3.0, degrees=True)
    ray = T[0, :3, :3] @ det.reorient(torch.float64)[:3, :3] @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    shift = moved[0, :3, 3] - T[0, :3, 3]
    torch.testing.assert_close(shift.abs(), ray.abs())  # one mm along the central ray


def test_auto_similarity_scores_the_finest_scale_with_gradient_ncc(setup):
    """``similarity="auto"``: the reported (finest-scale) similarity is gradient NCC, smoothed by
    ``sigma`` only where that scale does not pool the X-ray by 2 or more pixels per side."""
    from xvr_ros.core.register.similarity import gradncc

    renderer, truth, xray = setup
    init = offset(truth).float()
    for factor, sigma in ((1.0, 1.0), (2.0, 0.0)):
        res = refine(renderer, xray, DET, init, scales=(factor,), max_iterations=0)
        img, _, det = pyramid(xray.float(), None, DET, factor)
        with torch.no_grad():
            expected = gradncc(renderer(init, det), img, sigma=sigma).double()
        torch.testing.assert_close(res.similarity, expected, rtol=0, atol=1e-5)
