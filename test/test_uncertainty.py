"""Laplace covariance of a refined pose: the maths on analytic functions, then through a renderer."""

from __future__ import annotations

import math

import pytest
import torch

from xvr_ros.core.geometry import Detector, carm_pose, invert
from xvr_ros.core.register.uncertainty import (
    CHI2_6DOF_95,
    MAX_SD,
    adjoint,
    covariance_from_hessian,
    hessian_from_gradients,
    mahalanobis_sq,
    pose_error_twist,
    pose_uncertainty,
    world_axes_covariance,
)
from xvr_ros.core.rotations import se3_exp, so3_log

DETECTOR = Detector(sdd=1020.0, height=40, width=40, delx=6.0, dely=6.0)
# NCC changes by ~1e-4 per mm: this scale keeps every direction well inside MAX_SD.
SCALE = 1e-4


def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T + n * torch.eye(n, dtype=torch.float64)


class BlobRenderer:
    """A differentiable stand-in for the DRR renderer: Gaussian blobs of ``sigma_mm`` (at the
    detector) at the projections of fixed 3D points."""

    dtype = torch.float32
    device = torch.device("cpu")
    isocenter = torch.zeros(3, dtype=torch.float64)

    def __init__(self, points: torch.Tensor, sigma_mm: float):
        self.points = points.to(torch.float64)
        self.sigma_mm = sigma_mm

    def __call__(self, pose: torch.Tensor, detector: Detector) -> torch.Tensor:
        uv = detector.project(pose.to(torch.float64), self.points)  # (B, N, 2) pixels
        r = torch.arange(detector.height, dtype=torch.float64) + 0.5
        c = torch.arange(detector.width, dtype=torch.float64) + 0.5
        du = (c[None, None, None, :] - uv[..., 0, None, None]) * detector.delx
        dv = (r[None, None, :, None] - uv[..., 1, None, None]) * detector.dely
        img = torch.exp(-(du**2 + dv**2) / (2 * self.sigma_mm**2)).sum(dim=1, keepdim=True)
        return img.to(self.dtype)


def cloud(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * 60.0


POSE = carm_pose(torch.tensor([[0.1, -0.05, 0.02]], dtype=torch.float64), torch.tensor([[3.0, 850.0, -2.0]],
                                                                                       dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# maths
# --------------------------------------------------------------------------------------------
def test_quadratic_bowl_laplace_covariance_is_the_inverse_hessian():
    A = random_spd(6, 0)
    b = torch.linspace(-1, 1, 6, dtype=torch.float64)
    H = hessian_from_gradients(lambda x: x @ A + b, steps=[0.3, 1.0, 2.0, 0.01, 0.05, 0.1])
    torch.testing.assert_close(H, A, rtol=1e-10, atol=1e-10)
    cov, flat = covariance_from_hessian(H, scale=2.5)
    assert flat == 0
    torch.testing.assert_close(cov, 2.5 * torch.linalg.inv(A), rtol=1e-9, atol=1e-12)


def test_hessian_rejects_a_wrong_gradient_shape():
    with pytest.raises(ValueError, match="gradients"):
        hessian_from_gradients(lambda x: x[:, :3], steps=[1.0] * 6)


def test_unconstrained_directions_get_the_bound_and_are_counted():
    H = torch.diag(torch.tensor([4.0, 4.0, -1.0, 100.0, 0.0, 100.0], dtype=torch.float64))
    cov, flat = covariance_from_hessian(H, 1.0, MAX_SD)
    assert flat == 2
    assert cov[2, 2] == pytest.approx(MAX_SD[2] ** 2)
    assert cov[4, 4] == pytest.approx(MAX_SD[4] ** 2)
    assert cov[0, 0] == pytest.approx(0.25)
    assert bool((torch.linalg.eigvalsh(cov) > 0).all())
    with pytest.raises(ValueError, match="not positive definite"):
        covariance_from_hessian(H, 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        covariance_from_hessian(torch.full((6, 6), math.nan, dtype=torch.float64))


def test_adjoint_moves_a_twist_across_a_transform():
    T = POSE[0]
    xi = torch.tensor([1.0, -2.0, 0.5, 0.02, -0.01, 0.03], dtype=torch.float64)
    torch.testing.assert_close(se3_exp(adjoint(T) @ xi), T @ se3_exp(xi) @ invert(T), rtol=1e-9, atol=1e-9)


def test_error_twist_and_world_axes_covariance():
    xi = torch.tensor([[0.04, -0.1, 0.3, 2e-5, -4e-5, 1e-5]], dtype=torch.float64)
    true = POSE @ se3_exp(xi)
    torch.testing.assert_close(pose_error_twist(POSE, true), xi, rtol=1e-9, atol=1e-9)
    # Position and fixed-axis orientation errors in the world: what the world-axes covariance describes.
    dp = true[0, :3, 3] - POSE[0, :3, 3]
    dtheta = so3_log(true[0, :3, :3] @ POSE[0, :3, :3].T)
    C = random_spd(6, 1) * 1e-2
    world = world_axes_covariance(POSE, C)
    d2_world = mahalanobis_sq(torch.cat([dp, dtheta])[None], world[None])
    torch.testing.assert_close(d2_world, mahalanobis_sq(xi, C[None]), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------------------------
# through a renderer
# --------------------------------------------------------------------------------------------
def uncertainty(points: torch.Tensor, sigma_mm: float):
    renderer = BlobRenderer(points, sigma_mm)
    xray = renderer(POSE, DETECTOR)
    return pose_uncertainty(renderer, xray, DETECTOR, POSE, factor=1.0, similarity="ncc", scale=SCALE)


def test_covariance_is_symmetric_positive_definite_in_mm_and_rad():
    u = uncertainty(cloud(12), 8.0)
    assert u.covariance.shape == (6, 6) and u.covariance.dtype == torch.float64
    torch.testing.assert_close(u.covariance, u.covariance.T)
    assert bool((torch.linalg.eigvalsh(u.covariance) > 0).all())
    assert u.flat_directions == 0
    # The Hessian and the covariance describe the same quadratic in the same parameters.
    torch.testing.assert_close(u.covariance @ u.hessian / SCALE, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-6)


def test_a_sharper_optimum_gives_a_smaller_covariance():
    wide, sharp = uncertainty(cloud(12), 16.0), uncertainty(cloud(12), 6.0)
    assert torch.logdet(sharp.covariance) < torch.logdet(wide.covariance) - 1.0


def test_a_more_informative_image_gives_a_smaller_covariance():
    few, many = uncertainty(cloud(4), 8.0), uncertainty(cloud(24, seed=3), 8.0)
    assert torch.logdet(many.covariance) < torch.logdet(few.covariance)


def test_scale_multiplies_the_covariance_and_the_95_region_is_chi_square():
    points = cloud(12)
    renderer = BlobRenderer(points, 8.0)
    xray = renderer(POSE, DETECTOR)
    one = pose_uncertainty(renderer, xray, DETECTOR, POSE, factor=1.0, similarity="ncc", scale=SCALE)
    four = pose_uncertainty(renderer, xray, DETECTOR, POSE, factor=1.0, similarity="ncc", scale=4 * SCALE)
    torch.testing.assert_close(four.covariance, 4 * one.covariance)
    # A twist at the edge of the 95 % region along the first eigenvector.
    lam, U = torch.linalg.eigh(one.covariance)
    xi = (U[:, 0] * math.sqrt(CHI2_6DOF_95 * lam[0]))[None]
    assert float(mahalanobis_sq(xi, one.covariance[None])) == pytest.approx(CHI2_6DOF_95)


def test_invalid_input_is_refused():
    renderer = BlobRenderer(cloud(4), 8.0)
    xray = renderer(POSE, DETECTOR)
    with pytest.raises(ValueError, match="pixels"):
        pose_uncertainty(renderer, xray[..., :10], DETECTOR, POSE)
    with pytest.raises(ValueError, match="finite"):
        pose_uncertainty(renderer, xray, DETECTOR, torch.full((4, 4), math.nan))
