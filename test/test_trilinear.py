"""Tests of xvr_ros.core.render.trilinear: C++ kernel vs torch reference, analytic cases, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xvr_ros.core.render import _ext
from xvr_ros.core.render.trilinear import (
    _LineIntegrals,
    line_integrals,
    line_integrals_reference,
)


@pytest.fixture(scope="module")
def kernel():
    ext = _ext.load("trilinear")
    if ext is None:
        pytest.skip("C++ trilinear extension cannot be built here")
    return ext


def kernel_fn(volume, source, target, spacing, step):
    return _LineIntegrals.apply(volume, source, target, tuple(spacing), step)


IMPLS = ["kernel", "reference"]


def get_impl(name, request):
    if name == "kernel":
        request.getfixturevalue("kernel")
        return kernel_fn
    return line_integrals_reference


def random_rays(shape, B, N, dtype, gen, inside=True):
    """Random rays around a (D0, D1, D2) box: many cross it obliquely, some miss it; with
    ``inside`` the first ray of every batch starts inside the box."""
    D = torch.tensor(shape, dtype=dtype)
    src = torch.rand(B, 3, dtype=dtype, generator=gen) * (D + 6) * 3 - (D + 6)
    tgt = torch.rand(B, N, 3, dtype=dtype, generator=gen) * (D + 6) * 3 - (D + 6)
    if inside:
        src[0] = torch.rand(3, dtype=dtype, generator=gen) * (D - 1)  # starts inside the box
    return src, tgt


# ------------------------------------------------------------------------------------------
# kernel vs reference
# ------------------------------------------------------------------------------------------


def smooth_volume(shape, C, dtype, gen):
    """Low-frequency random field: its trilinear interpolant has small gradient jumps across voxel
    faces, so float32 gradients do not depend on which side of a face a sample rounds to."""
    idx = torch.meshgrid(*[torch.arange(d, dtype=torch.float64) for d in shape], indexing="ij")
    chans = []
    for _ in range(C):
        k = torch.rand(3, 3, generator=gen, dtype=torch.float64) * 0.5
        ph = torch.rand(3, generator=gen, dtype=torch.float64) * 6.28
        chans.append(1.5 + sum(torch.sin(sum(k[j, i] * idx[i] for i in range(3)) + ph[j]) for j in range(3)) / 3)
    return torch.stack(chans, dim=-1).to(dtype).contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("C", [1, 3])
def test_kernel_matches_reference(kernel, dtype, C):
    gen = torch.Generator().manual_seed(10 + C)
    shape = (19, 13, 16)
    volume = smooth_volume(shape, C, dtype, gen)
    B, N = 2, 300  # N >= 256: the kernel reorders the rays for locality
    src, tgt = random_rays(shape, B, N, dtype, gen)
    spacing, step = (0.8, 1.3, 1.1), 0.37
    w = torch.randn(B, N, C, dtype=dtype, generator=gen)

    s1, t1 = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    s2, t2 = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    J1 = kernel_fn(volume, s1, t1, spacing, step)
    J2 = line_integrals_reference(volume, s2, t2, spacing, step)
    (J1 * w).sum().backward()
    (J2 * w).sum().backward()
    J1, J2 = J1.detach(), J2.detach()

    hits = (J2 != 0).any(-1)
    assert 0.2 * B * N < int(hits.sum()) < 0.8 * B * N, "the ray set should mix hits and misses"
    assert torch.equal(J1 == 0, J2 == 0)
    if dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-12)
    else:
        tol = dict(rtol=1e-5, atol=1e-6 * float(J2.abs().max()))
    torch.testing.assert_close(J1, J2, **tol)
    for g1, g2 in ((s1.grad, s2.grad), (t1.grad, t2.grad)):
        if dtype == torch.float32:
            tol = dict(rtol=1e-4, atol=1e-5 * float(g2.abs().max()))
        torch.testing.assert_close(g1, g2, **tol)


def test_dispatch_and_threads(kernel):
    gen = torch.Generator().manual_seed(3)
    shape = (12, 10, 11)
    volume = torch.rand(*shape, 1, generator=gen)
    src, tgt = random_rays(shape, 2, 300, torch.float32, gen)
    J = line_integrals(volume, src, tgt, (1.0, 1.0, 1.0), 0.5)
    torch.testing.assert_close(J, kernel.forward(volume, src, tgt, [1.0, 1.0, 1.0], 0.5), rtol=0, atol=0)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        J1 = line_integrals(volume, src, tgt, (1.0, 1.0, 1.0), 0.5)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(J, J1)  # per-ray work: bitwise independent of the thread count


def test_volume_gradient_routes_to_reference():
    gen = torch.Generator().manual_seed(4)
    volume = torch.rand(5, 6, 7, 1, dtype=torch.float64, generator=gen).requires_grad_()
    src, tgt = random_rays((5, 6, 7), 1, 10, torch.float64, gen)
    line_integrals(volume, src, tgt, (1.0, 1.0, 1.0), 0.3).sum().backward()
    assert volume.grad is not None and volume.grad.abs().sum() > 0


def test_validation_errors():
    vol = torch.zeros(4, 4, 4, 1)
    src, tgt = torch.zeros(2, 3), torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="volume"):
        line_integrals(torch.zeros(4, 4, 4), src, tgt, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="source"):
        line_integrals(vol, torch.zeros(2, 2), tgt, (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="target"):
        line_integrals(vol, src, torch.zeros(3, 5, 3), (1, 1, 1), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        line_integrals(vol, src.double(), tgt, (1, 1, 1), 1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        line_integrals(vol.half(), src.half(), tgt.half(), (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="spacing"):
        line_integrals(vol, src, tgt, (1, 1), 1.0)
    with pytest.raises(ValueError, match="step"):
        line_integrals(vol, src, tgt, (1, 1, 1), 0.0)
    assert line_integrals(vol, src[:0], tgt[:0], (1, 1, 1), 1.0).shape == (0, 5, 1)


# ------------------------------------------------------------------------------------------
# analytic cases
# ------------------------------------------------------------------------------------------


def slab_chord_mm(s, t, shape, spacing):
    """Length (mm) of the segment s -> t inside the box [-0.5, D - 0.5] (Kay-Kajiya slabs in mm)."""
    sp = np.asarray(spacing, dtype=np.float64)
    p, q = np.asarray(s, np.float64) * sp, np.asarray(t, np.float64) * sp
    lo, hi = -0.5 * sp, (np.asarray(shape, np.float64) - 0.5) * sp
    u = q - p
    tmin, tmax = 0.0, 1.0
    for i in range(3):
        if u[i] == 0.0:
            if not lo[i] <= p[i] <= hi[i]:
                return 0.0
            continue
        t0, t1 = sorted(((lo[i] - p[i]) / u[i], (hi[i] - p[i]) / u[i]))
        tmin, tmax = max(tmin, t0), min(tmax, t1)
    return max(tmax - tmin, 0.0) * float(np.linalg.norm(u))


@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_box_gives_chord_length(impl, request):
    fn = get_impl(impl, request)
    shape, spacing = (7, 5, 9), (0.7, 1.2, 0.9)
    volume = torch.ones(*shape, 2, dtype=torch.float64)
    src = torch.tensor([[-4.0, 2.0, 4.0], [3.2, 1.7, 4.1]], dtype=torch.float64)
    tgt = torch.tensor(
        [
            [[12.0, 2.0, 4.0], [-4.0, 2.0, 4.0], [-1.0, 2.0, 4.0], [11.0, -3.0, 13.5], [9.3, 7.2, -2.5]],
            # from inside the box: axis-aligned, oblique, ending inside, and a parallel miss
            [[3.2, 11.0, 4.1], [15.0, -6.0, 20.0], [4.9, 2.2, 6.6], [-9.0, -4.0, -7.0], [3.2, 1.7, 4.1]],
        ],
        dtype=torch.float64,
    )
    tgt[0, 2] = torch.tensor([-1.0, 6.0, 4.0])  # misses (stays below -0.5 on axis 0)
    J = fn(volume, src, tgt, spacing, 0.25)
    sp = torch.tensor(spacing, dtype=torch.float64)
    ell = ((tgt - src[:, None]) * sp).norm(dim=-1)
    for b in range(2):
        for n in range(5):
            chord = slab_chord_mm(src[b], tgt[b, n], shape, spacing)
            for c in range(2):
                if ell[b, n] == 0:  # degenerate ray s == t: one sample, J = f(s) inside the box
                    inside = bool(((src[b] >= -0.5) & (src[b] <= torch.tensor(shape) - 0.5)).all())
                    assert J[b, n, c].item() == (1.0 if inside else 0.0)
                else:
                    assert (J[b, n, c] * ell[b, n]).item() == pytest.approx(chord, rel=1e-12, abs=1e-12)
    assert J[0, 2].abs().max() == 0  # the miss
    assert J[0, 0, 0].item() * ell[0, 0].item() == pytest.approx(7 * 0.7)  # full axis-0 crossing


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_volume(impl, dtype, request):
    fn = get_impl(impl, request)
    shape, spacing = (11, 9, 10), (0.6, 1.4, 1.1)
    idx = torch.meshgrid(*[torch.arange(d, dtype=dtype) for d in shape], indexing="ij")
    volume = torch.stack(idx, dim=-1)  # channel i = index along axis i: f_i(p) = p_i
    # axis-aligned rays inside [0, D - 1] (no clamping): integral of x along x is (b^2 - a^2)/2
    src = torch.tensor([[1.3, 2.2, 3.1]], dtype=dtype)
    tgt = torch.tensor([[[8.7, 2.2, 3.1], [1.3, 7.9, 3.1], [1.3, 2.2, 0.4], [7.5, 6.6, 8.2]]], dtype=dtype)
    J = fn(volume, src, tgt, spacing, 0.3).double()
    a, b = 1.3, 8.7
    line_integral = J[0, 0, 0].item() * (b - a) * spacing[0]  # mm * index units
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert line_integral == pytest.approx((b * b - a * a) / 2 * spacing[0], rel=tol)
    # in general the midpoint rule is exact for linear f: J_i = (s_i + t_i) / 2 on interior rays
    expected = (src[:, None].double() + tgt.double()) / 2
    torch.testing.assert_close(J, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------
# gradcheck
# ------------------------------------------------------------------------------------------


def gradcheck_inputs(C):
    gen = torch.Generator().manual_seed(7 + C)
    volume = torch.randn(5, 4, 6, C, dtype=torch.float64, generator=gen)
    src = torch.tensor([[-3.1, -2.2, -1.7], [2.3, 1.6, 2.9]], dtype=torch.float64)
    tgt = torch.tensor(
        [
            [[7.2, 5.3, 8.1], [6.1, 4.9, 4.4], [2.2, 6.3, 7.7]],
            [[8.3, -3.1, 1.2], [-4.1, 5.2, 6.6], [2.1, 1.7, 9.3]],
        ],
        dtype=torch.float64,
    )
    return volume, src.requires_grad_(), tgt.requires_grad_()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("C", [1, 2])
def test_gradcheck(impl, C, request):
    fn = get_impl(impl, request)
    volume, src, tgt = gradcheck_inputs(C)
    spacing, step = (1.0, 1.2, 0.8), 0.4
    J = fn(volume, src, tgt, spacing, step)
    assert (J != 0).all(), "every gradcheck ray should cross the box"
    assert torch.autograd.gradcheck(
        lambda s, t: fn(volume, s, t, spacing, step), (src, tgt), eps=1e-6, atol=1e-7, rtol=1e-5
    )


# ------------------------------------------------------------------------------------------
# reference chunking
# ------------------------------------------------------------------------------------------


def test_reference_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    shape = (8, 9, 7)
    volume = torch.rand(*shape, 2, dtype=torch.float64, generator=gen)
    src, tgt = random_rays(shape, 2, 40, torch.float64, gen)
    spacing, step = (1.0, 0.9, 1.2), 0.5

    def run(max_samples):
        s, t = src.clone().requires_grad_(), tgt.clone().requires_grad_()
        J = line_integrals_reference(volume, s, t, spacing, step, max_samples=max_samples)
        J.sum().backward()
        return J.detach(), s.grad, t.grad

    J_big, gs_big, gt_big = run(2**22)
    sizes = []
    grid_sample = torch.nn.functional.grid_sample

    def spy(inp, grid, *args, **kwargs):
        sizes.append(grid[..., 0].numel())
        return grid_sample(inp, grid, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", spy)
    J_small, gs_small, gt_small = run(11)  # smaller than the longest rays: splits them too
    assert len(sizes) > 10 and max(sizes) <= 11
    torch.testing.assert_close(J_small, J_big, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(gs_small, gs_big, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gt_small, gt_big, rtol=1e-12, atol=1e-13)


def _python_progress_during(call) -> tuple[int, int]:
    """Iterations a second Python thread makes while ``call()`` runs, and while a sleep of as long
    runs (which releases the GIL): a call that holds the GIL starves it."""
    import threading
    import time

    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        before, t0 = count[0], time.perf_counter()
        call()
        during, seconds = count[0] - before, time.perf_counter() - t0
        before = count[0]
        time.sleep(seconds)
        asleep = count[0] - before
    finally:
        stop.set()
        thread.join()
    return during, asleep


@pytest.mark.parametrize("name", ["trilinear", "siddon"])
def test_the_kernels_release_the_gil(name):
    """A node rendering must not stop the other threads of its process (a second node, the executor)."""
    ext = _ext.load(name)
    if ext is None:
        pytest.skip(f"C++ {name} extension cannot be built here")
    gen = torch.Generator().manual_seed(0)
    shape = (160, 160, 160)
    volume = torch.rand(*shape, 1, generator=gen)
    src, tgt = random_rays(shape, 1, 60000, torch.float32, gen)
    if name == "trilinear":
        J = ext.forward(volume, src, tgt, [1.0, 1.0, 1.0], 0.25)
        calls = [lambda: ext.forward(volume, src, tgt, [1.0, 1.0, 1.0], 0.25),
                 lambda: ext.backward(torch.ones_like(J), volume, src, tgt, [1.0, 1.0, 1.0], 0.25)]
    else:
        J = ext.forward(volume, src, tgt)
        calls = [lambda: ext.forward(volume, src, tgt), lambda: ext.backward(volume, src, tgt, torch.ones_like(J))]
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the kernel on one core, the spinning thread on another
        for call in calls:
            during, asleep = _python_progress_during(call)
            assert during > 0.2 * asleep, (during, asleep)  # holding the GIL: ~0
    finally:
        torch.set_num_threads(n)
