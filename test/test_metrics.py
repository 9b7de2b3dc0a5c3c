import math

import pytest
import torch

from xvr_ros.core import geometry as g
from xvr_ros.core import metrics
from xvr_ros.core.geometry import Detector

DET = Detector(sdd=1020.0, height=100, width=100, delx=1.0, dely=1.0)


def poses(n=4):
    gen = torch.Generator().manual_seed(0)
    angles = (torch.rand(n, 3, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    xyz = torch.tensor([0.0, 850.0, 0.0], dtype=torch.float64).expand(n, 3)
    return g.carm_pose(angles, xyz)


def test_zero_for_identical_poses():
    T = poses()
    X = torch.randn(10, 3, dtype=torch.float64) * 50
    for value in (
        metrics.mpe(T, T, X, DET),
        metrics.mrpe(T, T, X, DET),
        metrics.mtre(T, T, X),
        metrics.dgeo(T, T, 1020.0),
    ):
        assert value.shape == (4,)
        torch.testing.assert_close(value, torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_translation_in_carm_parameters():
    T = poses()
    delta = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)
    angles, xyz = g.carm_parameters(T)
    pred = g.carm_pose(angles, xyz + delta)
    X = torch.randn(10, 3, dtype=torch.float64) * 50
    torch.testing.assert_close(metrics.mtre(T, pred, X), torch.full((4,), 13.0, dtype=torch.float64))
    torch.testing.assert_close(metrics.dgeo(T, pred, 1020.0), torch.full((4,), 13.0, dtype=torch.float64))


def test_rotation_about_isocenter():
    T = poses()
    theta = 0.01
    P = g.make_pose(
        g.rotations.euler_angles_to_matrix(torch.tensor([theta, 0.0, 0.0], dtype=torch.float64), "ZXY"),
        torch.zeros(3, dtype=torch.float64),
    )
    pred = P @ T
    # Points on the z (rotation) axis don't move; points at radius 100 mm move by a chord.
    X = torch.tensor([[0.0, 0.0, 40.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0]], dtype=torch.float64)
    chord = 100 * 2 * math.sin(theta / 2)
    torch.testing.assert_close(metrics.mtre(T, pred, X), torch.full((4,), 2 * chord / 3, dtype=torch.float64))
    torch.testing.assert_close(metrics.dgeo(T, pred, 1020.0), torch.full((4,), 510.0 * theta, dtype=torch.float64))


def test_projection_errors_for_lateral_shift():
    # Shift the source 2 mm along the C-arm x axis: a point at the isocenter (850 mm away)
    # moves by 2 * sdd / 850 on the detector, and its lifts onto the two detector planes
    # are 2 * (1 - sdd / 850) apart.
    T = g.carm_pose(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[0.0, 850.0, 0.0]], dtype=torch.float64))
    pred = g.carm_pose(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[2.0, 850.0, 0.0]], dtype=torch.float64))
    X = torch.zeros(1, 3, dtype=torch.float64)
    assert metrics.mpe(T, pred, X, DET).item() == pytest.approx(2 * 1020 / 850)
    assert metrics.mrpe(T, pred, X, DET).item() == pytest.approx(2 * (1020 / 850 - 1))


def test_smsr():
    assert metrics.smsr(torch.tensor([0.2, 0.9, 1.1, 5.0])) == pytest.approx(50.0)
