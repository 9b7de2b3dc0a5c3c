"""The track's Kalman filter (core/register/pose_filter.py): analytic checks on synthetic measurements."""

from __future__ import annotations

import math

import pytest
import torch

from xvr_ros.core.geometry import carm_pose, invert, make_pose
from xvr_ros.core.register.pose_filter import PoseFilter
from xvr_ros.core.register.uncertainty import CHI2_6DOF_95, adjoint
from xvr_ros.core.rotations import se3_exp, se3_log

ISOCENTER = torch.tensor([10.0, -20.0, 5.0], dtype=torch.float64)
FPS = 7.5


def carm(alpha_deg: float = 0.0, x: float = 0.0) -> torch.Tensor:
    """A C-arm pose 820 mm from ``ISOCENTER``, turned ``alpha_deg`` about it, the patient moved ``x`` mm."""
    f64 = dict(dtype=torch.float64)
    T = carm_pose(torch.tensor([alpha_deg, 0.0, 0.0], **f64), torch.tensor([0.0, 820.0, 0.0], **f64), degrees=True)
    return make_pose(torch.eye(3, dtype=torch.float64), ISOCENTER + torch.tensor([x, 0.0, 0.0], **f64)) @ T


def depth_axis(pose: torch.Tensor) -> torch.Tensor:
    """(3,) the unit direction from the source to the isocenter along the C-arm's own axes."""
    c = invert(pose)[:3, :3] @ ISOCENTER + invert(pose)[:3, 3]
    return c / c.norm()


def covariance(pose: torch.Tensor, depth_sd: float = 2.0, other_sd: float = 0.05, rad_sd: float = 1e-4) -> torch.Tensor:
    """A tracked frame's covariance along the C-arm's axes: ``depth_sd`` mm along the beam through
    the isocenter, ``other_sd`` mm across it, ``rad_sd`` rad (all about the isocenter)."""
    d = depth_axis(pose)
    across = other_sd ** 2 * torch.eye(3, dtype=torch.float64) + (depth_sd ** 2 - other_sd ** 2) * torch.outer(d, d)
    about_isocenter = torch.block_diag(across, rad_sd ** 2 * torch.eye(3, dtype=torch.float64))
    P = make_pose(torch.eye(3, dtype=torch.float64), invert(pose)[:3, :3] @ ISOCENTER + invert(pose)[:3, 3])
    Ad = adjoint(P)
    return Ad @ about_isocenter @ Ad.T


def along_depth(pose: torch.Tensor, mm: float) -> torch.Tensor:
    """``pose`` with the source moved ``mm`` along the beam (what a tracked frame's depth error does)."""
    xi = torch.zeros(6, dtype=torch.float64)
    xi[:3] = mm * depth_axis(pose)
    return pose @ se3_exp(xi[None])[0]


def depth_error(pose: torch.Tensor, true: torch.Tensor) -> float:
    xi = se3_log((invert(true) @ pose)[None])[0]
    return float(xi[:3] @ depth_axis(true))


def test_a_still_pose_averages_the_depth_and_its_covariance_says_by_how_much():
    noise = torch.Generator().manual_seed(0)
    f = PoseFilter(ISOCENTER, acceleration_mm=3.0)
    true = carm()
    raw, filtered, variances = [], [], []
    for i in range(400):
        e = 2.0 * float(torch.randn(1, generator=noise, dtype=torch.float64))
        measured = along_depth(true, e)
        pose, cov = f.update(i / FPS, measured, covariance(measured))
        d = depth_axis(pose)
        raw.append(e)
        filtered.append(depth_error(pose, true))
        variances.append(float(d @ cov[:3, :3] @ d))
    raw_var = torch.tensor(raw[20:]).pow(2).mean()
    filtered_var = torch.tensor(filtered[20:]).pow(2).mean()
    assert filtered_var < 0.4 * raw_var, (filtered_var, raw_var)
    reported = sum(variances[20:]) / len(variances[20:])
    assert 0.6 < reported / filtered_var < 1.6, (reported, filtered_var)  # consistent with its own scatter


def test_a_turning_c_arm_and_a_moving_table_are_followed_without_lag():
    """5 deg/s about the isocenter and 5 mm/s of table: a constant velocity the filter learns,
    measured exactly across the beam and noisily along it."""
    noise = torch.Generator().manual_seed(1)
    f = PoseFilter(ISOCENTER, acceleration_mm=3.0)
    across, raw, filtered = [], [], []
    for i in range(60):
        t = i / FPS
        true = carm(5.0 * t, 5.0 * t)
        e = 1.5 * float(torch.randn(1, generator=noise, dtype=torch.float64))
        measured = along_depth(true, e)
        pose, _ = f.update(t, measured, covariance(measured, depth_sd=1.5))
        xi = se3_log((invert(true) @ pose)[None])[0]
        d = depth_axis(true)
        across.append(float((xi[:3] - (xi[:3] @ d) * d).norm()))
        raw.append(e)
        filtered.append(float(xi[:3] @ d))
    assert max(across) < 0.01, across  # what the frames pin down, the filter does not lag behind
    assert torch.tensor(filtered[10:]).pow(2).mean() < 0.6 * torch.tensor(raw[10:]).pow(2).mean()
    ahead = f.predict(60 / FPS)
    assert float((invert(carm(5.0 * 60 / FPS, 5.0 * 60 / FPS)) @ ahead)[:3, 3].norm()) < 1.5


def test_a_frame_outside_the_gate_restarts_the_filter_there():
    f = PoseFilter(ISOCENTER)
    true = carm()
    for i in range(10):
        f.update(i / FPS, true, covariance(true))
    jumped = carm(x=30.0)  # the table moved 30 mm in a frame: no velocity model explains it
    pose, cov = f.update(10 / FPS, jumped, covariance(jumped))
    assert torch.allclose(pose, jumped) and torch.allclose(cov, covariance(jumped))
    assert torch.allclose(f.predict(11 / FPS), jumped)  # and forgot the velocity


def test_a_frame_with_an_unbounded_direction_restarts_it():
    f = PoseFilter(ISOCENTER)
    for i in range(5):
        f.update(i / FPS, carm(), covariance(carm()))
    flat = covariance(carm(), depth_sd=100.0)  # a Hessian flat in depth (uncertainty.MAX_SD)
    assert f.bounded(carm(), covariance(carm())) and not f.bounded(carm(), flat)
    lagging = along_depth(carm(), 5.0)
    pose, _ = f.update(5 / FPS, lagging, flat)
    assert torch.allclose(pose, lagging) and f.frames == 1


def test_the_first_frame_and_a_restarted_stream_start_it_with_the_frame_itself():
    f = PoseFilter(ISOCENTER)
    assert not f.started and f.predict(1.0) is None
    a, b = carm(), along_depth(carm(), 1.0)
    pose, cov = f.update(5.0, a, covariance(a))
    assert f.started and torch.allclose(pose, a) and torch.allclose(cov, covariance(a))  # the convention round-trips
    pose, _ = f.update(4.0, b, covariance(b))  # time went backwards (a replayed bag restarted)
    assert torch.allclose(pose, b)
    f.reset()
    assert not f.started


@pytest.mark.parametrize("bad", [dict(acceleration_mm=0.0), dict(acceleration_rad=-1.0), dict(gate=math.nan),
                                 dict(velocity_mm=math.inf)])
def test_refuses_settings_that_are_not_positive(bad):
    with pytest.raises(ValueError):
        PoseFilter(ISOCENTER, **bad)


def test_surprise_measures_a_frame_against_the_prediction_without_fusing_it():
    f = PoseFilter(ISOCENTER)
    sharp = covariance(carm(), depth_sd=0.7)  # a 512 px tracked frame's
    assert f.surprise(0.0, carm(), sharp) == math.inf  # nothing to expect yet
    for i in range(5):
        f.update(i / FPS, carm(), sharp)
    before = f.predict(5 / FPS)
    expected = f.surprise(5 / FPS, along_depth(carm(), 0.3), sharp)
    lagging = f.surprise(5 / FPS, along_depth(carm(), 6.0), sharp)
    assert expected < 1.0 and lagging > CHI2_6DOF_95, (expected, lagging)
    assert torch.equal(f.predict(5 / FPS), before) and f.frames == 5
    assert f.surprise(4 / FPS, carm(), sharp) == math.inf  # not after its last frame
