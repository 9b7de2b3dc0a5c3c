"""Simulated targets through the image chain (sim/simulate.py, sim/appearance.py), perturbed C-arm poses."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from xvr_ros.core.geometry import Detector, carm_parameters, carm_pose, invert
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render.renderer import Renderer
from xvr_ros.core.rotations import matrix_to_euler_angles
from xvr_ros.core.sim.appearance import FULL_SCALE, AppearanceModel
from xvr_ros.core.sim.simulate import Instrument, _cylinder_chords, perturb_poses, simulate_xray
from xvr_ros.core.train.presets import pose_generator, resolve_ranges, sample_poses

DET = Detector(sdd=1020.0, height=48, width=56, delx=3.0, dely=3.0)
#: Only the field of view: no noise, gain, ramp, saturation or text, hard edges.
FIELD_ONLY = dict(penumbra_mm=None, photons=None, gamma=None, background=None, saturation=None, text=False,
                  exposure=1.0)


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
    return sample_poses(resolve_ranges("chest"), 3, pose_generator(4))


def test_seeded_determinism(siddon, poses):
    a = simulate_xray(siddon, poses, DET, seed=11)
    b = simulate_xray(siddon, poses, DET, seed=11)
    c = simulate_xray(siddon, poses, DET, seed=12)
    assert a.image.shape == (3, 1, 48, 56) and a.image.dtype == torch.float32
    assert a.counts.shape == (3, 1, 48, 56) and a.fov.dtype == torch.bool and a.fov.shape == (3, 1, 48, 56)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.fov, b.fov)
    assert a.params == b.params
    assert not torch.equal(a.counts, c.counts)
    # detector counts: integers within the full scale; the image is their log transform
    assert (a.counts == a.counts.round()).all() and a.counts.min() >= 0 and a.counts.max() <= FULL_SCALE
    torch.testing.assert_close(a.image, (-torch.log(a.counts.clamp_min(0.5) / FULL_SCALE)).float())
    torch.testing.assert_close(a.pose, poses)
    # the images of one batch differ in their appearance (each has its own draws)
    assert len({p["gamma"] for p in a.params["appearance"]}) == 3
    # a Volume works as well as a prepared renderer, and gives the same images
    d = simulate_xray(siddon.volume, poses, DET, seed=11)
    torch.testing.assert_close(d.counts, a.counts)


def test_ideal_detector_is_the_exponential_of_the_line_integrals(siddon, poses):
    clean = simulate_xray(siddon, poses, DET, seed=1, appearance=None, foreign_object=None, blur=None)
    with torch.no_grad():
        L = siddon(poses, DET).sum(1, keepdim=True).double()
    scale = 4.0 / L.flatten(1).amax(1)  # attenuation_range nepers on the densest ray
    torch.testing.assert_close(clean.counts, FULL_SCALE * torch.exp(-scale[:, None, None, None] * L))
    assert clean.fov.all()
    shifted = simulate_xray(siddon, poses, DET, seed=1, foreign_object=None)
    assert ((shifted.image - clean.image).abs().flatten(1).amax(1) > 1e-2).all()


@pytest.mark.parametrize("field", ["blades", "circle", "iris"])
def test_field_of_view_leaks_outside_and_keeps_the_inside(siddon, poses, field):
    """With every other effect off, a pixel inside the field keeps its counts and one outside
    keeps the leakage fraction of them (hard edges; up to one exposure gain per image, as the
    automatic exposure meters the field): the shutter is dark, not one constant value."""
    full = simulate_xray(siddon, poses, DET, seed=3, foreign_object=None, blur=None,
                         appearance=AppearanceModel(field=None, **FIELD_ONLY))
    sim = simulate_xray(siddon, poses, DET, seed=3, foreign_object=None, blur=None,
                        appearance=AppearanceModel(field=field, **FIELD_ONLY))
    for b in range(3):
        drawn = sim.params["appearance"][b]["field"]
        assert drawn["kind"] == field and 0.01 <= drawn["leakage"] <= 0.05
        inside, outside = sim.fov[b, 0], ~sim.fov[b, 0]
        assert 0.02 < outside.float().mean() < 0.7
        # away from rounding (low counts) and clipping (full scale)
        usable = (full.counts[b, 0] > 200) & (full.counts[b, 0] < FULL_SCALE) & (sim.counts[b, 0] < FULL_SCALE)
        ratio = sim.counts[b, 0] / full.counts[b, 0]
        gain = float(ratio[inside & usable].max())
        if field == "blades":
            torch.testing.assert_close(ratio[inside & usable], torch.full_like(ratio[inside & usable], gain),
                                       rtol=5e-3, atol=0)
        else:  # vignetting: brightness falls towards the rim
            assert float(ratio[inside & usable].min()) >= gain * (1 - drawn["vignetting"]) - 5e-3
        far = outside & usable & (sim.counts[b, 0] > 20)
        if far.any():
            leak = ratio[far] / gain
            assert float(leak.max()) <= drawn["leakage"] * 1.05 and float(leak.min()) >= drawn["leakage"] * 0.6
        if field == "blades":
            assert len(drawn["blades"]) >= 1 and all(abs(bl["angle_deg"]) <= 6.0 for bl in drawn["blades"])
        assert float(sim.counts[b, 0][outside].std()) > 0  # not one constant value


def test_appearance_effects_draw_independently():
    """Switching one effect off leaves the others' draws as they were; text and saturation are
    outside the true field of view."""
    T = np.exp(-np.linspace(0.2, 3.0, 64 * 80).reshape(64, 80))
    det = Detector(sdd=1000.0, height=64, width=80, delx=1.0, dely=1.0)
    full = AppearanceModel(field="blades", saturation=0.05).apply(T, det, np.random.default_rng(5))
    quiet = AppearanceModel(field="blades", saturation=0.05, photons=None).apply(T, det, np.random.default_rng(5))
    assert full.params["field"] == quiet.params["field"] and full.params["gamma"] == quiet.params["gamma"]
    assert quiet.params["photons"] == 0.0 and full.params["photons"] >= 3e3
    top = full.counts >= full.params["clip"]
    assert top.any() and not (top & full.fov).any()
    assert full.params["text"]["pixels"] > 0
    with pytest.raises(ValueError, match="field"):
        AppearanceModel(field="hexagon")
    with pytest.raises(ValueError, match="shape"):
        AppearanceModel().apply(T[:10], det, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["wire", "screw"])
def test_foreign_object_raises_line_integrals_only_where_drawn(siddon, poses, kind):
    common = dict(seed=5, appearance=None, blur=None)
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


def test_perturb_poses_respects_bounds_in_the_carm_frame():
    T = sample_poses(resolve_ranges("chest"), 300, pose_generator(9), dtype=torch.float64)
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


# --------------------------------------------------------------------------------------------
# fluoroscopy runs: a pinned setting, an explicit instrument
# --------------------------------------------------------------------------------------------
def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def test_appearance_without_a_setting_is_unchanged():
    """The quality model and the benches were fitted on these images: the run option must leave the
    default draws bit for bit (digests from before it existed; a numpy that changes its generators
    changes them too, and then the fitted models need a refit anyway)."""
    yy, xx = np.mgrid[0:48, 0:56]
    T = np.exp(-2.0 * np.exp(-((xx - 30) ** 2 + (yy - 20) ** 2) / 200.0))
    pinned = {
        (0, "random"): ("ef9023b6c39ed376", "4b158664328af6be"),
        (1, "blades"): ("389fc35fafaccffc", "c5c1fb26e6dde2ee"),
        (3, "iris"): ("ad6e5394e8d24592", "8008c3b4a63a69f3"),
    }
    for (seed, field), want in pinned.items():
        out = AppearanceModel(field=field).apply(T, DET, np.random.default_rng(seed))
        assert (digest(out.counts), digest(out.fov)) == want
        again = AppearanceModel(field=field).apply(T, DET, np.random.default_rng(seed), setting=None)
        assert np.array_equal(again.counts, out.counts)


def test_a_run_shares_its_setting_and_draws_fresh_noise(siddon, poses):
    wire = Instrument((-30.0, 5.0, -10.0), (30.0, -5.0, 20.0))
    common = dict(foreign_object=wire, run_seed=7)
    a = simulate_xray(siddon, poses[:1], DET, seed=1, **common)
    b = simulate_xray(siddon, poses[1:2], DET, seed=2, **common)
    # One collimation, exposure setting, gamma, text and blur for the whole run, whatever the pose ...
    # Exposed to half the full scale nothing saturates: the true field of view is the collimator's alone.
    field = dict(appearance=AppearanceModel(field="random", **{**FIELD_ONLY, "exposure": 0.5}), **common)
    fa = simulate_xray(siddon, poses[:1], DET, seed=1, **field).fov
    assert torch.equal(fa, simulate_xray(siddon, poses[2:], DET, seed=3, **field).fov) and not fa.all()
    pa, pb = a.params["appearance"][0], b.params["appearance"][0]
    assert pa["field"] == pb["field"] and pa["gamma"] == pb["gamma"] and pa["text"] == pb["text"]
    assert pa["photons"] == pb["photons"] and a.params["blur"] == b.params["blur"]
    # ... and only the quantum noise differs between frames of the same view: none without noise.
    c = simulate_xray(siddon, poses[:1], DET, seed=2, **common)
    assert not torch.equal(a.counts, c.counts)
    quiet = AppearanceModel(photons=None)
    q1 = simulate_xray(siddon, poses[:1], DET, seed=1, appearance=quiet, **common)
    q2 = simulate_xray(siddon, poses[:1], DET, seed=2, appearance=quiet, **common)
    assert torch.equal(q1.counts, q2.counts)
    # Without a run each frame has its own setting.
    d = simulate_xray(siddon, poses[:1], DET, seed=2, foreign_object=wire)
    assert d.params["appearance"][0]["gamma"] != pa["gamma"]


def test_an_explicit_instrument_is_the_same_object_in_every_view(siddon, poses):
    """A random object placed for a view, given back as an Instrument, gives that image bit for bit;
    one Instrument is the same world-space cylinder under every pose."""
    drawn = simulate_xray(siddon, poses[:1], DET, seed=4, foreign_object="wire")
    obj = drawn.params["foreign_object"][0]
    given = Instrument(tuple(obj["p0"]), tuple(obj["p1"]), obj["radius"], obj["kind"])
    same = simulate_xray(siddon, poses[:1], DET, seed=4, foreign_object=given)
    assert torch.equal(same.counts, drawn.counts) and same.params["foreign_object"][0] == obj
    wire = Instrument((-30.0, 5.0, -10.0), (30.0, -5.0, 20.0), radius=1.0)
    sim = simulate_xray(siddon, poses, DET, seed=4, foreign_object=wire, appearance=None, blur=None)
    clean = simulate_xray(siddon, poses, DET, seed=4, foreign_object=None, appearance=None, blur=None)
    with torch.no_grad():
        top = siddon(poses, DET).sum(1).double().flatten(1).amax(1)  # the CT's densest ray, attenuated 4 nepers
    mu = 10.0 * float(siddon.volume.data.max())
    for b in range(3):
        src, tgt = DET.rays(poses[b : b + 1].double())
        ends = torch.tensor([wire.p0, wire.p1], dtype=torch.float64)
        chord = _cylinder_chords(src, tgt, ends[:1], ends[1:], torch.tensor([1.0], dtype=torch.float64))
        expect = clean.counts[b, 0] * torch.exp(-4.0 / top[b] * mu * chord.reshape(DET.shape))
        torch.testing.assert_close(sim.counts[b, 0], expect, rtol=1e-6, atol=1e-6)
        assert (chord > 0).any()
    for bad in (
        dict(p0=(0, 0, 0), p1=(0, 0, 0)),
        dict(p0=(0, 0), p1=(1, 0, 0)),
        dict(p0=(0, 0, 0), p1=(1, 0, 0), radius=0),
    ):
        with pytest.raises(ValueError):
            Instrument(**bad)


def test_invalid_arguments(siddon, poses):
    with pytest.raises(ValueError):
        simulate_xray(Renderer(siddon.volume), poses, DET)  # not Siddon
    with pytest.raises(ValueError):
        simulate_xray(siddon, poses, DET, appearance=AppearanceModel(field="hexagon"))
    with pytest.raises(ValueError):
        simulate_xray(siddon, poses, DET, foreign_object="stent")
    bad = poses.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        simulate_xray(siddon, bad, DET)
