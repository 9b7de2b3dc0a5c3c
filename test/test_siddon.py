"""Tests for xvr_ros.core.render.siddon: the C++ kernel, the torch reference, and independent checks.

Independent checks (not derived from either implementation): chord lengths through a box by
the slab method (uniform volume, single voxel), sums of voxel rows for axis-parallel rays, and
diffdrr's own formula re-derived in numpy (all plane parameters of the three axes *unclipped*,
sorted, midpoint lookup with grid_sample's nearest/zero-padding index arithmetic). That last
one is what the "equals diffdrr Siddon(voxel_shift=0.5) / ray length" contract means; when the
diffdrr package itself is importable the real renderer is compared as well (skipped otherwise).
Kernel tests are skipped when the C++ extension cannot be built.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xvr_ros.core.render import siddon

F64 = torch.float64


@pytest.fixture(scope="module")
def kernel():
    if not siddon.kernel_available():
        pytest.skip("C++ siddon extension could not be built")
    return siddon._SiddonKernel.apply


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def chord_length(s, t, lo, hi):
    """Length of the part of segment s->t inside the box [lo, hi] (plain Python, slab method)."""
    a0, a1 = 0.0, 1.0
    for i in range(3):
        d = t[i] - s[i]
        if d == 0.0:
            if not (lo[i] <= s[i] <= hi[i]):
                return 0.0
            continue
        u, v = (lo[i] - s[i]) / d, (hi[i] - s[i]) / d
        a0, a1 = max(a0, min(u, v)), min(a1, max(u, v))
    return max(0.0, a1 - a0) * math.dist(s, t)


def random_rays(dims, N, dtype=F64, seed=0):
    """Rays of all kinds through a box of the given dims, for B = 3 sources: 0 outside, 1 outside
    but inside the box's slabs of axes 1 and 2 (so rays parallel to those axes hit), 2 inside.
    Per source, by blocks of N // 8 rays: an end inside the volume; parallel to an axis (d_i = 0
    exactly); missing the box (sources 0, 1); the rest oblique through the far side."""
    g = torch.Generator().manual_seed(seed)
    D = torch.tensor(dims, dtype=F64)
    centre = (D - 1) / 2
    scale = float(D.max())

    def u(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    source = centre + torch.nn.functional.normalize(torch.randn(3, 3, generator=g, dtype=F64), dim=-1) * 1.5 * scale
    source[1] = torch.stack([-2.5 - u(()), u(()) * (D[1] - 1), u(()) * (D[2] - 1)])
    source[2] = u(3) * D - 0.5
    # oblique: through the far side of the volume
    target = 2 * centre - source[:, None] + (u(3, N, 3) - 0.5) * 1.4 * D
    q = max(N // 8, 1)
    target[:, :q] = u(3, q, 3) * D - 0.5  # end inside the volume
    for k in range(q, 2 * q):  # parallel to axis k % 3 (and to both 1 and 2 every fourth ray)
        target[:, k, k % 3] = source[:, k % 3]
        if k % 4 == 0:
            target[:, k, 1:] = source[:, 1:]
    # missing the box: straight away from its centre (the source is outside, so by convexity the
    # segment cannot meet the box)
    away = torch.nn.functional.normalize(source[:2] - centre, dim=-1)[:, None]
    target[:2, 2 * q : 3 * q] = source[:2, None] + away * (0.1 + u(2, q, 1)) * scale
    return source.to(dtype), target.to(dtype)


def check_gradients_match(fa, fb, volume, source, target, atol=1e-8):
    s1, t1 = source.clone().requires_grad_(), target.clone().requires_grad_()
    s2, t2 = source.clone().requires_grad_(), target.clone().requires_grad_()
    w = torch.randn(*target.shape[:2], volume.shape[-1], generator=torch.Generator().manual_seed(1), dtype=F64)
    ga = torch.autograd.grad((fa(volume, s1, t1) * w.to(volume.dtype)).sum(), (s1, t1))
    gb = torch.autograd.grad((fb(volume, s2, t2) * w.to(volume.dtype)).sum(), (s2, t2))
    torch.testing.assert_close(ga[1], gb[1], atol=atol, rtol=0)
    torch.testing.assert_close(ga[0], gb[0], atol=atol * target.shape[1], rtol=0)
    return ga


# --------------------------------------------------------------------------------------
# kernel vs reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 3])
def test_kernel_matches_reference_float64(kernel, C):
    dims = (7, 5, 6)
    volume = torch.rand(*dims, C, generator=torch.Generator().manual_seed(2), dtype=F64)
    source, target = random_rays(dims, N=160)
    J = kernel(volume, source, target)
    R = siddon.line_integrals_reference(volume, source, target)
    assert J.shape == (3, 160, C)
    torch.testing.assert_close(J, R, atol=1e-10, rtol=0)
    q = 160 // 8
    assert (J[:2, 2 * q : 3 * q] == 0).all()  # misses
    assert (J[:, :q].abs().sum(-1) > 0).all()  # ends inside
    par = [k for k in range(q, 2 * q) if k % 3]  # parallel to axis 1 or 2 (source 1 is in their slabs)
    assert (J[1:, par].abs().sum(-1) > 0).all() and (J[2, q : 2 * q].abs().sum(-1) > 0).all()
    assert (J[:, 3 * q :].abs().sum(-1) > 0).float().mean() > 0.9  # oblique
    # gradients wherever defined (random rays almost surely graze no edge)
    g = check_gradients_match(kernel, siddon.line_integrals_reference, volume, source, target)
    assert (g[1][:2, 2 * q : 3 * q] == 0).all()
    assert g[1].abs().max() > 0


@pytest.mark.parametrize("C", [1, 3])
def test_kernel_matches_reference_float32(kernel, C):
    dims = (9, 4, 6)
    volume64 = torch.rand(*dims, C, generator=torch.Generator().manual_seed(3), dtype=F64)
    source64, target64 = random_rays(dims, N=200, seed=3)
    volume, source, target = volume64.float(), source64.float(), target64.float()
    J = kernel(volume, source, target)
    assert J.dtype == torch.float32
    R32 = siddon.line_integrals_reference(volume, source, target)
    R64 = siddon.line_integrals_reference(volume.double(), source.double(), target.double())
    scale = R64.abs().max()
    assert ((J.double() - R64).abs().max() / scale) < 1e-5
    assert ((J - R32).abs().max() / R32.abs().max()) < 1e-5
    # float32 gradients vs the float64 reference on the same (rounded) inputs
    s, t = source.clone().requires_grad_(), target.clone().requires_grad_()
    gs, gt = torch.autograd.grad(kernel(volume, s, t).sum(), (s, t))
    s64, t64 = source.double().requires_grad_(), target.double().requires_grad_()
    gs64, gt64 = torch.autograd.grad(siddon.line_integrals_reference(volume.double(), s64, t64).sum(), (s64, t64))
    assert ((gt.double() - gt64).abs().max() / gt64.abs().max()) < 1e-4
    assert ((gs.double() - gs64).abs().max() / gs64.abs().max()) < 1e-4


def test_kernel_matches_reference_many_rays(kernel):
    """N >= 4096 takes the kernel's ray-reordering path; results must not depend on it."""
    dims = (11, 8, 5)
    volume = torch.rand(*dims, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    source, target = random_rays(dims, N=5000, seed=4)
    J = kernel(volume, source, target)
    R = siddon.line_integrals_reference(volume, source, target)
    torch.testing.assert_close(J, R, atol=1e-10, rtol=0)
    check_gradients_match(kernel, siddon.line_integrals_reference, volume, source, target)
    # and the same rays one per call-size that skips the reordering
    J_small = torch.cat([kernel(volume, source, target[:, i : i + 1000]) for i in range(0, 5000, 1000)], 1)
    torch.testing.assert_close(J, J_small, atol=1e-12, rtol=0)


def test_dispatch_and_validation():
    volume = torch.rand(3, 4, 5, 1, dtype=F64)
    source = torch.tensor([[-2.0, 1.5, 2.0]], dtype=F64)
    target = torch.tensor([[[5.0, 1.5, 2.2]]], dtype=F64)
    J = siddon.line_integrals(volume, source, target)
    torch.testing.assert_close(J, siddon.line_integrals_reference(volume, source, target), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="volume"):
        siddon.line_integrals(volume[..., 0], source, target)
    with pytest.raises(ValueError, match="source"):
        siddon.line_integrals(volume, source[0], target)
    with pytest.raises(ValueError, match="target"):
        siddon.line_integrals(volume, source, target[0])
    with pytest.raises(ValueError, match="B="):
        siddon.line_integrals(volume, source.expand(2, 3), target)
    with pytest.raises(TypeError, match="dtype"):
        siddon.line_integrals(volume, source.float(), target)
    with pytest.raises(TypeError, match="float32 or float64"):
        siddon.line_integrals(volume.half(), source.half(), target.half())
    # empty batch
    assert siddon.line_integrals(volume, source, target[:, :0]).shape == (1, 0, 1)
    assert siddon.line_integrals_reference(volume, source, target[:, :0]).shape == (1, 0, 1)


def test_reference_chunking_and_checkpoint():
    dims = (6, 7, 4)
    volume = torch.rand(*dims, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    source, target = random_rays(dims, N=50, seed=5)
    full = siddon.line_integrals_reference(volume, source, target)

    def tiny(v, s, t):
        return siddon.line_integrals_reference(v, s, t, max_samples=200)

    torch.testing.assert_close(tiny(volume, source, target), full, atol=1e-14, rtol=0)
    check_gradients_match(tiny, siddon.line_integrals_reference, volume, source, target, atol=1e-12)


# --------------------------------------------------------------------------------------
# analytic checks (run on whichever implementation line_integrals dispatches to, and on
# the reference)
# --------------------------------------------------------------------------------------

IMPLS = {
    "dispatch": siddon.line_integrals,
    "reference": siddon.line_integrals_reference,
}


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_box_gives_chord_length(impl):
    dims = (6, 4, 5)
    volume = torch.ones(*dims, 1, dtype=F64)
    source, target = random_rays(dims, N=64, seed=6)
    J = IMPLS[impl](volume, source, target)[..., 0]
    lo, hi = [-0.5] * 3, [d - 0.5 for d in dims]
    expected = torch.tensor(
        [[chord_length(source[b].tolist(), target[b, n].tolist(), lo, hi) for n in range(64)] for b in range(3)],
        dtype=F64,
    )
    torch.testing.assert_close(J * (target - source[:, None]).norm(dim=-1), expected, atol=1e-10, rtol=0)
    assert (expected > 0).sum() > 120


@pytest.mark.parametrize("impl", IMPLS)
def test_single_voxel_gives_value_times_own_chord(impl):
    dims = (5, 6, 4)
    ijk = (2, 3, 1)
    value = 2.75
    volume = torch.zeros(*dims, 1, dtype=F64)
    volume[ijk] = value
    g = torch.Generator().manual_seed(7)
    centre = torch.tensor(ijk, dtype=F64)
    # rays aimed at random points of (or near) the voxel, from far away in random directions
    aim = centre + (torch.rand(40, 3, generator=g, dtype=F64) - 0.5) * 1.6
    direction = torch.nn.functional.normalize(torch.randn(40, 3, generator=g, dtype=F64), dim=-1)
    source = aim - 15 * direction
    target = (aim + 15 * direction)[:, None]
    J = IMPLS[impl](volume, source, target)[..., 0, 0]
    lo = [c - 0.5 for c in ijk]
    hi = [c + 0.5 for c in ijk]
    chords = [chord_length(source[k].tolist(), target[k, 0].tolist(), lo, hi) for k in range(40)]
    expected = torch.tensor([value * c for c in chords], dtype=F64)
    torch.testing.assert_close(J * 30.0, expected, atol=1e-10, rtol=0)
    assert (expected > 0).sum() > 15 and (expected == 0).sum() > 3


@pytest.mark.parametrize("impl", IMPLS)
def test_axis_parallel_rays_sum_voxel_rows(impl):
    dims = (5, 4, 6)
    volume = torch.rand(*dims, 2, generator=torch.Generator().manual_seed(8), dtype=F64)
    rows, srcs, tgts = [], [], []
    for axis in range(3):
        for j in range(dims[(axis + 1) % 3]):
            for k in range(dims[(axis + 2) % 3]):
                s = [0.0, 0.0, 0.0]
                s[(axis + 1) % 3], s[(axis + 2) % 3] = float(j), float(k)
                t = list(s)
                forward = (j + k) % 2 == 0  # both directions
                s[axis], t[axis] = (-2.0, dims[axis] + 1.0) if forward else (dims[axis] + 1.0, -2.0)
                srcs.append(s)
                tgts.append(t)
                index = [slice(None)] * 3
                index[(axis + 1) % 3], index[(axis + 2) % 3] = j, k
                rows.append(volume[tuple(index)].sum(0))
    source = torch.tensor(srcs, dtype=F64)
    target = torch.tensor(tgts, dtype=F64)[:, None]
    J = IMPLS[impl](volume, source, target)[:, 0]
    length = (target[:, 0] - source).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(J * length, torch.stack(rows), atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_end_points_inside_volume(impl):
    """The integral only covers a in [0, 1]: a ray from voxel (1,1,1) to voxel (3,1,1) along
    axis 0 covers half of voxel 1, voxel 2 and half of voxel 3."""
    volume = torch.rand(5, 3, 3, 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    source = torch.tensor([[1.0, 1.0, 1.0]], dtype=F64)
    target = torch.tensor([[[3.0, 1.0, 1.0], [1.0, 1.0, 1.0]]], dtype=F64)
    J = IMPLS[impl](volume, source, target)[0, :, 0]
    v = volume[:, 1, 1, 0]
    torch.testing.assert_close(J[0] * 2.0, 0.5 * v[1] + v[2] + 0.5 * v[3], atol=1e-12, rtol=0)
    # a zero-length ray: the parametric integral is the value at the point
    torch.testing.assert_close(J[1], v[1], atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------
# diffdrr's formula
# --------------------------------------------------------------------------------------


def diffdrr_siddon_numpy(volume, source, target, eps=1e-8):
    """Diffdrr 0.6.1 Siddon(voxel_shift=0.5) re-derived in numpy, per ray: the parameters of
    ALL planes of the three axes (no clipping, eps added to the denominators as diffdrr does),
    sorted; the voxel at each midpoint looked up as grid_sample(mode="nearest",
    align_corners=False, zero padding) would; weighted by the parameter differences."""
    volume = np.asarray(volume)
    dims = np.array(volume.shape, dtype=np.float64)
    out = np.zeros(len(target))
    for n, t in enumerate(np.asarray(target)):
        s = np.asarray(source)
        alphas = np.sort(
            np.concatenate([(np.arange(dims[i] + 1) - 0.5 - s[i]) / (t[i] - s[i] + eps) for i in range(3)])
        )
        mid = (alphas[:-1] + alphas[1:]) / 2
        xyz = s + mid[:, None] * (t - s + eps)
        grid = 2 * (xyz + 0.5) / dims - 1  # diffdrr's normalisation
        pix = ((grid + 1) * dims - 1) / 2  # grid_sample's un-normalisation, align_corners=False
        idx = np.rint(pix).astype(np.int64)  # nearest (round half to even, like nearbyint)
        inside = np.all((idx >= 0) & (idx < dims.astype(np.int64)), axis=1)
        vals = np.zeros(len(mid))
        vals[inside] = volume[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
        out[n] = np.sum(vals * np.diff(alphas))
    return out


def far_rays(dims, B, N, seed, spread=1.2):
    """B sources far outside the volume, N oblique rays each, through (or near) the volume
    and ending far outside on the other side (diffdrr's assumption)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.tensor(dims, dtype=F64)
    centre = (D - 1) / 2
    r = float(D.norm()) + 3
    direction = torch.nn.functional.normalize(torch.randn(B, 3, generator=g, dtype=F64), dim=-1)
    source = centre - r * direction
    aim = centre + (torch.rand(B, N, 3, generator=g, dtype=F64) - 0.5) * D * spread
    target = source[:, None] + 2 * (aim - source[:, None])
    return source, target


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_diffdrr_formula(impl):
    dims = (6, 5, 4)
    volume = torch.rand(*dims, generator=torch.Generator().manual_seed(10), dtype=F64)
    source, target = far_rays(dims, 3, 12, seed=10)
    J = IMPLS[impl](volume[..., None], source, target)[..., 0]
    expected = torch.tensor(np.stack([diffdrr_siddon_numpy(volume, source[b], target[b]) for b in range(3)]))
    torch.testing.assert_close(J, expected, atol=1e-6, rtol=0)  # diffdrr's eps shifts planes ~1e-8
    assert (expected > 0).sum() > 25


def test_matches_diffdrr_package():
    """Against the real diffdrr renderer when it is installed (it usually is not in CI)."""
    renderers = pytest.importorskip("diffdrr.renderers")
    dims = (6, 5, 4)
    volume = torch.rand(*dims, generator=torch.Generator().manual_seed(11), dtype=F64)
    source, target = far_rays(dims, 4, 6, seed=11)
    img = torch.ones(4, 1, 6, dtype=F64)  # diffdrr multiplies by this (the ray length in a DRR)
    expected = renderers.Siddon(voxel_shift=0.5)(volume, source[:, None], target, img)[:, 0]
    J = siddon.line_integrals(volume[..., None], source, target)[..., 0]
    torch.testing.assert_close(J, expected, atol=1e-6, rtol=0)
    assert (expected > 0).sum() > 15


# --------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------


def gradcheck_inputs():
    dims = (4, 3, 5)
    volume = (torch.randperm(60, generator=torch.Generator().manual_seed(12)).to(F64) / 10 + 0.3).reshape(*dims, 1)
    source, target = far_rays(dims, 2, 3, seed=12, spread=0.6)
    source.requires_grad_()
    target.requires_grad_()
    return volume, source, target


def test_gradcheck_kernel(kernel):
    volume, source, target = gradcheck_inputs()
    assert (kernel(volume, source, target) != 0).all()
    assert torch.autograd.gradcheck(lambda s, t: kernel(volume, s, t), (source, target), eps=1e-6, atol=1e-5)


def test_gradcheck_reference():
    volume, source, target = gradcheck_inputs()

    def f(s, t):
        return siddon.line_integrals_reference(volume, s, t)

    assert torch.autograd.gradcheck(f, (source, target), eps=1e-6, atol=1e-5)


def test_volume_gradient(kernel):
    """The kernel gives none; line_integrals then routes to the reference, whose volume
    gradient is exact: J is linear in the volume, so J = <V, dJ/dV> per ray and channel."""
    dims = (5, 4, 6)
    volume = torch.rand(*dims, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    source, target = random_rays(dims, N=16, seed=13)
    v = volume.clone().requires_grad_()
    gv, gs = torch.autograd.grad(kernel(v, source, target.requires_grad_()).sum(), (v, target), allow_unused=True)
    assert gv is None and gs is not None
    J = siddon.line_integrals(v, source, target)
    assert J.grad_fn is not None and "SiddonKernel" not in type(J.grad_fn).__name__
    for b, n, c in [(0, 7, 0), (1, 9, 1), (2, 14, 0), (2, 4, 1), (1, 2, 0), (0, 1, 1)]:
        assert J[b, n, c] > 0
        (g,) = torch.autograd.grad(J[b, n, c], v, retain_graph=True)
        torch.testing.assert_close((g * volume).sum(), J[b, n, c].detach(), atol=1e-12, rtol=0)
        assert (g[..., 1 - c] == 0).all()
    with torch.no_grad():  # no volume gradient needed: the kernel again
        torch.testing.assert_close(siddon.line_integrals(v, source, target), J.detach(), atol=1e-10, rtol=0)
