"""Image similarities: invariances, masks, stability (core/similarity.py)."""

from __future__ import annotations

import pytest
import torch

from xvr_ros.core.register import similarity as S

NAMES = ["ncc", "mncc", "gncc", "mncc+gncc"]


def smooth_images(b=2, h=40, w=48, seed=0):
    """Random images with structure at several scales (so every window has some variance)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)
    x = x.cumsum(-1).cumsum(-2)
    return x + 5 * torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_identical_images_score_one(name):
    x = smooth_images()
    s = S.get(name)(x, x)
    assert s.shape == (2,)
    torch.testing.assert_close(s, torch.ones(2, dtype=x.dtype), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_affine_intensity_change_keeps_one_and_negation_gives_minus_one(name):
    x = smooth_images()
    f = S.get(name)
    for a, b in ((3.0, 2.0), (1e-3, -7.0), (250.0, 1e4)):
        torch.testing.assert_close(f(a * x + b, x), f(x, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(f(-x, x), -f(x, x), atol=1e-6, rtol=0)
    torch.testing.assert_close(f(-x, x), -torch.ones(2, dtype=x.dtype), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_unrelated_images_score_near_zero_and_noise_lowers_the_score(name):
    gen = torch.Generator().manual_seed(7)
    white = torch.randn(2, 2, 1, 64, 64, generator=gen, dtype=torch.float64)
    f = S.get(name)
    assert f(white[0], white[1]).abs().max() < 0.1
    x = smooth_images()
    noisy = x + 20 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    assert (f(noisy, x) < f(x, x) - 0.05).all()


@pytest.mark.parametrize("name", NAMES)
def test_masked_pixels_have_no_influence(name):
    x = smooth_images()
    y = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    mask = torch.ones(1, 1, 40, 48, dtype=torch.bool)
    mask[..., :12] = False  # a collimated strip
    mask[..., 30:, 30:] = False  # and a corner
    f = S.get(name)
    ref = f(x, y, mask)
    for corrupt in (1e6, -3.0, float("nan"), float("inf")):
        x2, y2 = x.clone(), y.clone()
        x2[..., :12] = corrupt
        y2[..., 30:, 30:] = -corrupt
        torch.testing.assert_close(f(x2, y2, mask), ref, atol=1e-9, rtol=0)
    # the mask matters: without it the corrupted strip changes the score
    x2 = x.clone()
    x2[..., :12] = 1e3
    assert (f(x2, y) - f(x, y)).abs().max() > 1e-3
    # a per-item mask (B, 1, H, W) and a float mask act the same as the broadcast bool mask
    torch.testing.assert_close(f(x, y, mask.expand(2, 1, 40, 48)), ref)
    torch.testing.assert_close(f(x, y, mask.double()), ref)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_finite_on_constant_images(name):
    f = S.get(name)
    const = torch.full((2, 1, 32, 32), 3.0, requires_grad=True)
    other = torch.rand(2, 1, 32, 32)
    for a, b in ((const, other), (const, const), (other, const)):
        s = f(a, b)
        assert torch.isfinite(s).all()
        (grad,) = torch.autograd.grad(s.sum(), const)
        assert torch.isfinite(grad).all()


def test_gradient_points_towards_alignment():
    """A shifted copy: the similarity increases as the shift shrinks (all four, sub-pixel too)."""
    x = smooth_images(b=1, h=48, w=48)
    for name in NAMES:
        f = S.get(name)
        values = [float(f(torch.roll(x, k, dims=-1)[..., 8:-8, 8:-8], x[..., 8:-8, 8:-8])) for k in (3, 2, 1, 0)]
        assert values == sorted(values), (name, values)


def test_invalid_arguments():
    x = smooth_images()
    with pytest.raises(ValueError):
        S.ncc(x, x[..., :10])
    with pytest.raises(ValueError):
        S.ncc(x, x, torch.ones(1, 1, 5, 5))
    with pytest.raises(ValueError):
        S.get("mutual_information")


@pytest.mark.parametrize("k", [1, 3, 9])
def test_box_mean_is_the_window_average(k):
    x = torch.rand(2, 3, 40, 33, dtype=torch.float32) * 100.0 + 1e3  # a large offset: no rounding loss
    expected = torch.nn.functional.avg_pool2d(x.double(), k, stride=1)
    torch.testing.assert_close(S.box_mean(x, k).double(), expected, rtol=1e-6, atol=1e-4)


def test_sobel_of_a_ramp_is_its_slope():
    """The ramp 2c - r: the kernels correlate with [1, 0, -1] (x[c-1] - x[c+1]) and the 1-2-1 smoothing sums
    to 4, so the x gradient is -2 * 2 * 4 = -16 and the y gradient 2 * 4 = 8 on every interior pixel."""
    r, c = torch.meshgrid(torch.arange(20.0), torch.arange(24.0), indexing="ij")
    grad, weight = S.sobel((2 * c - r)[None, None])
    inner = weight[0, 0] > 0
    torch.testing.assert_close(grad[0, 0][inner], torch.full_like(grad[0, 0][inner], -16.0))
    torch.testing.assert_close(grad[0, 1][inner], torch.full_like(grad[0, 1][inner], 8.0))
