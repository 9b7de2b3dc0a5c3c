"""Simulated targets with domain shift, random and perturbed C-arm poses (core/simulate.py)."""

from __future__ import annotations

import math

import pytest
import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose, invert
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.rotations import matrix_to_euler_angles
from xvr_ros.core.sim.simulate import (
    CHEST_RANGES,
    _cylinder_chords,
    perturb_poses,
    random_carm_poses,
    simulate_xray,
)

DET = Detector(sdd=1020.0, height=48, width=56, delx=3.0, dely=3.0)
NO_SHIFT = dict(gamma=1.0, contrast=1.0, offset=0.0, photons=None, blur=None, background=None)


def phantom(n: int = 40, spacing: float = 3.0) -> Volume:
    """A body-sized ellipsoid with a few denser off-centre blobs, centred on the origin."""
    c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * spacing
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    data = 0.02 * ((x / 50) ** 2 + (y / 40) ** 2 + (z / 55) ** 2 <= 1)
    for (cx, cy, cz), r, mu in (((15, -5, 20), 10, 0.06), ((-20, 10, -15), 8, 0.05), ((5, 15, -30), 6, 0.08)):
        data = data + mu * (((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) <= r * r)
    affine = torch.diag(torch.tensor([spacing] * 3 + [1.0], dtype=torch.float64))
    affine[:3, 3] = -(n - 1) / 2 * spacing
    return Volume(data=data.float(), affine=affine)


@pytest.fixture(scope="module")
def siddon():
    return Renderer(phantom(), method="siddon")


@pytest.fixture(scope="module")
def poses():
    return random_carm_poses(3, seed=4)


def test_seeded_determinism(siddon, poses):
    a = simulate_xray(siddon, poses, DET, seed=11)
    b = simulate_xray(siddon, poses, DET, seed=11)
    c = simulate_xray(siddon, poses, DET, seed=12)
    assert a.image.shape == (3, 1, 48, 56) and a.image.dtype == torch.float32
    assert a.valid_mask.shape == (3, 1, 48, 56) and a.valid_mask.dtype == torch.bool
    assert torch.equal(a.image, b.image) and torch.equal(a.valid_mask, b.valid_mask)
    assert a.params == b.params
    assert not torch.equal(a.image, c.image)
    assert torch.isfinite(a.image).all()
    torch.testing.assert_close(a.pose, poses)
    # the images of one batch differ in their domain shift (each has its own draws)
    assert len(set(a.params["gamma"])) == 3
    # a Volume works as well as a prepared renderer, and gives the same images
    d = simulate_xray(siddon.volume, poses, DET, seed=11)
    torch.testing.assert_close(d.image, a.image)


def test_domain_shift_changes_the_image_but_not_the_anatomy(siddon, poses):
    clean = simulate_xray(siddon, poses, DET, seed=1, collimation=None, foreign_object=None, **NO_SHIFT)
    with torch.no_grad():
        reference = siddon(poses, DET)
    torch.testing.assert_close(clean.image, reference.float(), atol=1e-5, rtol=1e-5)
    shifted = simulate_xray(siddon, poses, DET, seed=1, collimation=None, foreign_object=None)
    diff = (shifted.image - clean.image).abs().flatten(1).amax(1)
    assert (diff > 1e-3 * clean.image.flatten(1).amax(1)).all()


@pytest.mark.parametrize("kind", ["edge", "rectangle", "random"])
def test_mask_marks_collimated_pixels(siddon, poses, kind):
    sim = simulate_xray(siddon, poses, DET, seed=3, collimation=kind)
    for b in range(3):
        valid = sim.valid_mask[b, 0]
        blocked = ~valid
        assert 0.02 < blocked.float().mean() < 0.6
        assert (sim.image[b, 0][blocked] == 0).all()
        assert sim.params["collimation"][b]["kind"] in ("edge", "rectangle")
        if kind != "random":
            assert sim.params["collimation"][b]["kind"] == kind
        if sim.params["collimation"][b]["kind"] == "rectangle":
            # the blocked pixels frame the image: every border has some
            assert blocked[0].any() and blocked[-1].any() and blocked[:, 0].any() and blocked[:, -1].any()
    none = simulate_xray(siddon, poses, DET, seed=3, collimation=None)
    assert none.valid_mask.all()
    # collimation does not change the valid pixels
    m = sim.valid_mask
    torch.testing.assert_close(sim.image[m], none.image[m])


@pytest.mark.parametrize("kind", ["wire", "screw"])
def test_foreign_object_raises_line_integrals_only_where_drawn(siddon, poses, kind):
    common = dict(seed=5, collimation=None, gamma=(0.8, 1.2), photons=None, blur=None)
    without = simulate_xray(siddon, poses, DET, foreign_object=None, **common)
    with_obj = simulate_xray(siddon, poses, DET, foreign_object=kind, **common)
    diff = (with_obj.image - without.image)[:, 0].double()
    assert (diff >= -1e-5).all()
    for b in range(3):
        obj = with_obj.params["foreign_object"][b]
        assert obj["kind"] == kind
        src, tgt = DET.rays(poses[b : b + 1].double())
        ends = torch.tensor([obj["p0"], obj["p1"]], dtype=torch.float64)
        radius = torch.tensor([obj["radius"]], dtype=torch.float64)
        chord = _cylinder_chords(src, tgt, ends[:1], ends[1:], radius).reshape(DET.height, DET.width)
        drawn = chord > 0
        assert drawn.any(), "the object is placed in the field of view"
        assert drawn.float().mean() < 0.25, "and it is small"
        assert (diff[b][~drawn].abs() < 1e-5).all()
        assert (diff[b][chord > 0.2 * chord.max()] > 0).all()
        # the chord through a cylinder never exceeds its length or its diameter / sin(angle)
        assert chord.max() <= math.dist(obj["p0"], obj["p1"]) + 2 * obj["radius"] + 1e-6


def test_cylinder_chord_is_exact():
    """Rays across a cylinder along z of radius 2: a ray at distance d from the axis has the chord
    2 sqrt(r^2 - d^2) (0 beyond r); a ray along the axis, the cylinder's length."""
    src = torch.tensor([[-100.0, 0.0, 0.0]], dtype=torch.float64)
    tgt = torch.tensor([[[100.0, 0, 0], [100.0, 2, 0], [100.0, 6, 0], [100.0, 0, 10]]], dtype=torch.float64)
    c0 = torch.tensor([[0.0, 0.0, -5.0]], dtype=torch.float64)
    c1 = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)
    chord = _cylinder_chords(src, tgt, c0, c1, torch.tensor([2.0], dtype=torch.float64))[0]
    d = 1.0 / math.sqrt(1 + 1e-4)  # the second ray crosses x = 0 at y = 1 with slope 1/100
    torch.testing.assert_close(chord[:3], torch.tensor([4.0, 2 * math.sqrt(4 - d * d), 0.0], dtype=torch.float64))
    # the tilted ray enters through the side at x = -2 and leaves through the cap z = 5 at x = 0
    torch.testing.assert_close(chord[3], torch.tensor(2 * math.sqrt(1 + 0.05**2), dtype=torch.float64))
    along = _cylinder_chords(
        torch.tensor([[0.0, 0.0, -100.0]], dtype=torch.float64),
        torch.tensor([[[0.0, 0.5, 100.0]]], dtype=torch.float64),
        c0, c1, torch.tensor([2.0], dtype=torch.float64),
    )
    torch.testing.assert_close(along[0, 0], torch.tensor(10.0, dtype=torch.float64), atol=0.01, rtol=0)


def test_random_carm_poses_respect_ranges():
    ranges = {"alpha": (-10.0, 20.0), "y": (800.0, 900.0)}
    T = random_carm_poses(200, ranges, seed=2)
    assert T.shape == (200, 4, 4)
    angles, xyz = carm_parameters(T.double(), degrees=True)
    bounds = {**CHEST_RANGES, **ranges}
    values = torch.cat([angles, xyz], dim=-1)
    for k, name in enumerate(["alpha", "beta", "gamma", "x", "y", "z"]):
        lo, hi = bounds[name]
        assert values[:, k].min() >= lo - 1e-3 and values[:, k].max() <= hi + 1e-3
        assert values[:, k].max() - values[:, k].min() > 0.8 * (hi - lo)  # spans the range
    assert torch.equal(T, random_carm_poses(200, ranges, seed=2))
    with pytest.raises(ValueError):
        random_carm_poses(2, {"delta": (0, 1)})


def test_perturb_poses_respects_bounds_in_the_carm_frame():
    T = random_carm_poses(300, seed=9, dtype=torch.float64)
    P = perturb_poses(T, rot_deg=5.0, inplane_mm=15.0, depth_mm=40.0, seed=1)
    assert P.shape == T.shape and P.dtype == T.dtype
    # the relative transform, in the C-arm frame
    delta = invert(T) @ P
    rot = matrix_to_euler_angles(delta[:, :3, :3], "ZXY") * 180 / math.pi
    assert rot.abs().max() <= 5.0 + 1e-6 and rot.abs().max() > 4.5
    # the isocenter's displacement in the C-arm frame: x, z in-plane, y along the central ray
    iso_before = (invert(T) @ torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))[:, :3]
    iso_after = (invert(P) @ torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))[:, :3]
    shift = -(iso_after - iso_before)
    _, xyz0 = carm_parameters(T)
    _, xyz1 = carm_parameters(P)
    torch.testing.assert_close(shift, xyz1 - xyz0)
    for k, bound in ((0, 15.0), (1, 40.0), (2, 15.0)):
        assert shift[:, k].abs().max() <= bound + 1e-6
        assert shift[:, k].abs().max() > 0.9 * bound
    # the central ray's direction changes by at most the rotation, never more
    ray = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    cos = ((T[:, :3, :3] @ ray) * (P[:, :3, :3] @ ray)).sum(-1).clamp(-1, 1)
    assert torch.rad2deg(torch.acos(cos)).max() <= 5.0 * math.sqrt(3) + 1e-6
    # seeded
    assert torch.equal(P, perturb_poses(T, seed=1))
    assert not torch.equal(P, perturb_poses(T, seed=2))
    # zero bounds change nothing
    torch.testing.assert_close(perturb_poses(T, 0.0, 0.0, 0.0), T)
    # a single (4, 4) pose works too
    assert perturb_poses(carm_pose(torch.zeros(3), torch.tensor([0.0, 850.0, 0.0])), seed=0).shape == (1, 4, 4)


def test_invalid_arguments(siddon, poses):
    with pytest.raises(ValueError):
        simulate_xray(Renderer(siddon.volume), poses, DET)  # not Siddon
    with pytest.raises(ValueError):
        simulate_xray(siddon, poses, DET, collimation="circle")
    with pytest.raises(ValueError):
        simulate_xray(siddon, poses, DET, foreign_object="stent")
    bad = poses.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        simulate_xray(siddon, bad, DET)
