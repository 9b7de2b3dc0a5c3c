"""How well the image pins down a refined pose: a Laplace approximation of its covariance.

Refinement maximises a similarity ``s(T)``. Near the optimum ``T_hat``, treat ``k * (-s)`` as a
negative log-likelihood: the pose's posterior is then Gaussian with covariance ``(k H)^-1``, ``H``
the Hessian of ``-s`` at ``T_hat``. ``1 / k`` is the one number the Laplace approximation cannot
know (the similarity is not a log-likelihood); it is calibrated on simulated registrations (see
``bench/fit_quality.py``) and stored with the quality model (``quality_model.json``,
``covariance_scale``).

**Parameterisation of the covariance** (everything a caller sees): a *right* perturbation of the
camera-to-world pose in the C-arm frame (source at the origin, the frame of ``geometry``),

    T_true = T_hat @ se3_exp(xi),    xi = (tx, ty, tz, rx, ry, rz)

translation first (mm), then the rotation vector (rad), the order of ``rotations.se3_exp``; so
``xi`` is what ``rotations.se3_log(invert(T_hat) @ T_true)`` returns. The covariance is (6, 6)
float64 in (mm, rad) units in that order: the block ``[:3, :3]`` is the uncertainty of the X-ray
source's position, along the C-arm's own axes. It is the ordering of ROS's
``PoseWithCovariance`` (x, y, z, rotation about x, y, z), but along the C-arm's axes;
:func:`world_axes_covariance` gives it along the world's fixed axes, as ROS means it.

**How H is computed.** The gradient of ``-s`` by autodiff through the renderer at 12 poses
``T_hat (+/-) h_i e_i`` (one batched render), then central differences of that gradient: exact
for a quadratic and needs first derivatives only (the compiled renderer has no double backward).
The differences are taken in a twist about the volume's isocenter (``T_hat P exp(xi') P^-1``,
``P`` the translation to the isocenter), where rotation and translation barely couple and ``H``
is well conditioned, then mapped to the C-arm frame by the adjoint: ``xi = Ad_P xi'``. The steps
(1 mm, 0.01 rad ~ 1 mm at 100 mm from the isocenter) are about the size of the errors the
covariance has to describe, so they average the sub-pixel ripple of the similarity. It is
evaluated at one scale of the refinement's pyramid (default its finest), 12 renders with a
backward pass.

A direction in which ``H`` is not positive (a saddle or a flat valley: the image does not
constrain the pose there) gets the variance of :data:`MAX_SD` squared, so such a covariance is
large but finite; :attr:`PoseUncertainty.flat_directions` counts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xvr_ros.core.geometry import Detector, invert, make_pose
from xvr_ros.core.register import similarity as sim_mod
from xvr_ros.core.register.refine import auto_scales, finest_similarity, pyramid
from xvr_ros.core.render.renderer import render_scored
from xvr_ros.core.rotations import hat, se3_exp, se3_log

__all__ = [
    "CHI2_6DOF_95",
    "IsocenterObjective",
    "MAX_SD",
    "STEPS",
    "PoseUncertainty",
    "adjoint",
    "carm_covariance",
    "carried_uncertainty",
    "covariance_from_hessian",
    "hessian_from_gradients",
    "isocenter_adjoint",
    "isocenter_twist",
    "mahalanobis_sq",
    "pose_error_twist",
    "pose_uncertainty",
    "to_isocenter",
    "world_axes_covariance",
]

#: The 95 % quantile of the chi-square distribution with 6 degrees of freedom: a pose error
#: ``xi`` lies in the covariance's 95 % region when ``xi^T C^-1 xi <= CHI2_6DOF_95``.
CHI2_6DOF_95 = 12.591587243743977

#: Finite-difference steps (mm x3, rad x3) of the gradient, in the isocenter twist.
STEPS: tuple[float, ...] = (1.0, 1.0, 1.0, 0.01, 0.01, 0.01)

#: Standard deviation given to a direction the image does not constrain (mm x3, rad x3).
MAX_SD: tuple[float, ...] = (100.0, 100.0, 100.0, 0.5, 0.5, 0.5)


@dataclass
class PoseUncertainty:
    """A refined pose's Laplace approximation (see the module docstring for the frame).

    covariance: (6, 6) float64, (tx, ty, tz mm, rx, ry, rz rad), right perturbation in the C-arm
        frame, already multiplied by ``scale``.
    hessian: (6, 6) float64 Hessian of the negative similarity, same parameters (1/mm^2, 1/rad^2).
    hessian_isocenter: (6, 6) the same about the isocenter (what was differenced; well conditioned).
    isocenter_adjoint: (6, 6) ``Ad_P``, mapping twists about the isocenter to C-arm-frame twists.
    scale: the calibration factor applied (``covariance = scale * H^-1``).
    flat_directions: number of eigen-directions where the Hessian was not positive.
    factor: the pyramid's downsampling factor used.
    """

    covariance: torch.Tensor
    hessian: torch.Tensor
    hessian_isocenter: torch.Tensor
    isocenter_adjoint: torch.Tensor
    scale: float
    flat_directions: int
    factor: float

    @property
    def sd(self) -> torch.Tensor:
        """(6,) standard deviations: mm x3 then rad x3."""
        return self.covariance.diagonal().sqrt()


# --------------------------------------------------------------------------------------------
# the maths, independent of images
# --------------------------------------------------------------------------------------------

class IsocenterObjective:
    """``-s`` (the similarity, negated) as a function of a twist about the volume's isocenter.

    ``pose(xi') = T P se3_exp(xi') P^-1`` with ``T`` the (4, 4) pose it is centred on and ``P`` the
    translation to the isocenter in the C-arm frame (rotation and translation barely couple there,
    so its Hessian is well conditioned). Evaluated on one pyramid level ``factor`` of the X-ray
    (default the finest of ``refine.auto_scales``) with the similarity ``refine`` scores it with
    (``"auto"``), or ``similarity`` / ``sigma`` as :func:`refine.refine` takes them.

    ``objective(offsets)``: (K, 6) twists (mm x3, rad x3) -> (``-s`` (K,), its gradient (K, 6)),
    one batched render with a backward pass. Raises ValueError when the similarity is not finite.
    """

    def __init__(self, renderer, xray: torch.Tensor, detector: Detector, pose: torch.Tensor, *,
                 mask: torch.Tensor | None = None, factor: float | None = None, similarity: str | Callable = "auto",
                 sigma: float = 1.0):
        if not isinstance(xray, torch.Tensor) or xray.dim() != 4 or xray.shape[:2] != (1, 1):
            raise ValueError(f"xray must be a (1, 1, H, W) tensor, got {getattr(xray, 'shape', type(xray))}")
        if tuple(xray.shape[-2:]) != detector.shape:
            raise ValueError(f"xray is {tuple(xray.shape[-2:])} pixels but the detector is {detector.shape}")
        T = torch.as_tensor(pose).to(torch.float64).cpu().reshape(-1, 4, 4)
        if len(T) != 1 or not bool(torch.isfinite(T).all()):
            raise ValueError(f"pose must be one finite (4, 4) transform, got {tuple(pose.shape)}")
        self.center = T[0]
        self.factor = auto_scales(detector)[-1] if factor is None else float(factor)
        if similarity == "auto":
            self._fn = finest_similarity(self.factor, sigma)
        elif similarity in ("gncc", "gradncc", "mncc+gncc"):
            self._fn = sim_mod.get(similarity, sigma=sigma)
        else:
            self._fn = sim_mod.get(similarity)
        self._renderer = renderer
        self._dtype = getattr(renderer, "dtype", torch.float32)
        device = getattr(renderer, "device", torch.device("cpu"))
        self._img, self._msk, self._det = pyramid(
            xray.to(device, self._dtype), None if mask is None else mask.to(device), detector, self.factor)
        self._P = to_isocenter(renderer, self.center)
        self._P_inv = invert(self._P)
        self.adjoint = adjoint(self._P)  # xi (C-arm frame, right perturbation) = Ad xi'

    def poses(self, offsets: torch.Tensor) -> torch.Tensor:
        """(K, 6) isocenter twists -> (K, 4, 4) float64 poses."""
        return self.center @ self._P @ se3_exp(offsets.to(torch.float64)) @ self._P_inv

    def __call__(self, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xi = offsets.detach().to(torch.float64).clone().requires_grad_(True)
        drr = render_scored(self._renderer, self.poses(xi).to(self._dtype), self._det, self._msk)
        if drr.shape[1] != 1:
            drr = drr.sum(dim=1, keepdim=True)
        loss = -self._fn(drr.float(), self._img.float(), self._msk)
        if not bool(torch.isfinite(loss).all()):
            raise ValueError("the similarity is not finite near the pose")
        (g,) = torch.autograd.grad(loss.sum(), [xi])
        return loss.detach().to(torch.float64), g


def hessian_from_gradients(grad: Callable[[torch.Tensor], torch.Tensor], steps) -> torch.Tensor:
    """Hessian at 0 of a function of n parameters from central differences of its gradient.

    ``grad``: (K, n) parameter offsets -> (K, n) gradients (called once with K = 2n: all the
    offsets in one batch). ``steps``: (n,) step per parameter. Returns the symmetrised (n, n)
    float64 Hessian; exact when the function is quadratic.
    """
    h = torch.as_tensor(steps, dtype=torch.float64)
    n = len(h)
    offsets = torch.cat([torch.diag(h), -torch.diag(h)])  # (2n, n)
    g = grad(offsets).to(torch.float64)
    if g.shape != (2 * n, n):
        raise ValueError(f"grad must map ({2 * n}, {n}) offsets to ({2 * n}, {n}) gradients, got {tuple(g.shape)}")
    H = (g[:n] - g[n:]) / (2 * h[:, None])  # row i: d(grad)/d(param i)
    return 0.5 * (H + H.T)


def covariance_from_hessian(H: torch.Tensor, scale: float = 1.0, max_sd=None) -> tuple[torch.Tensor, int]:
    """``scale * H^-1`` for a symmetric (n, n) Hessian, made positive definite -> (covariance, flat count).

    In the eigenbasis of ``H``, a curvature that is not positive, or whose variance would exceed
    the ``max_sd``-scaled bound, is replaced by that bound (``max_sd``: (n,) standard deviations
    along each parameter; the bound along an eigenvector ``u`` is ``sum_i (u_i max_sd_i)^2``).
    ``flat count`` is the number of directions so replaced.
    """
    H = 0.5 * (H + H.T).to(torch.float64)
    if not bool(torch.isfinite(H).all()):
        raise ValueError("the Hessian has non-finite entries")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive, got {scale}")
    lam, U = torch.linalg.eigh(H)
    var = scale / lam.clamp_min(1e-300)
    if max_sd is not None:
        bound = ((U * torch.as_tensor(max_sd, dtype=torch.float64)[:, None]) ** 2).sum(0)
        flat = (lam <= 0) | (var > bound)
        var = torch.where(flat, bound, var)
    else:
        flat = lam <= 0
        if bool(flat.any()):
            raise ValueError("the Hessian is not positive definite and no max_sd bound was given")
    return (U * var) @ U.T, int(flat.sum())


def adjoint(T: torch.Tensor) -> torch.Tensor:
    """(6, 6) adjoint of a (4, 4) rigid transform for twists ordered (v, omega):
    ``T exp(xi) T^-1 = exp(Ad_T xi)``."""
    R, t = T[:3, :3], T[:3, 3]
    Ad = torch.zeros(6, 6, dtype=T.dtype)
    Ad[:3, :3] = R
    Ad[3:, 3:] = R
    Ad[:3, 3:] = hat(t) @ R
    return Ad


def world_axes_covariance(pose: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """The covariance as ROS's ``PoseWithCovariance`` means it: (4, 4) pose, (6, 6) -> (6, 6).

    Input: :class:`PoseUncertainty`'s covariance (right perturbation, C-arm axes). Output: the
    covariance of (position error (3,) mm, orientation error (3,) rad) both along the *world's*
    fixed axes, ``p_true = p_hat + dp``, ``R_true = so3_exp(dtheta) @ R_hat``; to first order
    ``dp = R v`` and ``dtheta = R omega``. Scale rows/columns 0-2 by 1e-3 for metres.
    """
    R = pose.reshape(4, 4).to(torch.float64)[:3, :3]
    J = torch.block_diag(R, R)
    return J @ covariance.to(torch.float64) @ J.T


def carm_covariance(hessian_isocenter: torch.Tensor, isocenter_adjoint: torch.Tensor, scale: float,
                    max_sd=MAX_SD) -> tuple[torch.Tensor, int]:
    """``scale * H^-1`` about the isocenter (bounded by ``max_sd`` there), mapped to the C-arm frame:
    (6, 6), (6, 6) -> ((6, 6) covariance, flat count). ``C = Ad_P C' Ad_P^T`` since ``xi = Ad_P xi'``."""
    cov_iso, flat = covariance_from_hessian(hessian_isocenter, scale, max_sd)
    Ad = isocenter_adjoint.to(torch.float64)
    return Ad @ cov_iso @ Ad.T, flat


def pose_error_twist(pose: torch.Tensor, true_pose: torch.Tensor) -> torch.Tensor:
    """The twist ``xi`` with ``true = pose @ se3_exp(xi)``: (B, 4, 4) x2 -> (B, 6) (mm, rad)."""
    return se3_log(invert(pose.to(torch.float64)) @ true_pose.to(torch.float64))


def mahalanobis_sq(xi: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """``xi^T C^-1 xi`` for (B, 6) twists and (B or 1, 6, 6) covariances -> (B,)."""
    xi = xi.to(torch.float64)
    sol = torch.linalg.solve(covariance.to(torch.float64).expand(len(xi), 6, 6), xi[..., None])
    return (xi[..., None] * sol).sum(dim=(-1, -2))


# --------------------------------------------------------------------------------------------
# the image term
# --------------------------------------------------------------------------------------------
def pose_uncertainty(
    renderer,
    xray: torch.Tensor,
    detector: Detector,
    pose: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    factor: float | None = None,
    similarity: str | Callable = "auto",
    sigma: float = 1.0,
    steps=STEPS,
    max_sd=MAX_SD,
) -> PoseUncertainty:
    """The Laplace covariance of a refined pose (see the module docstring).

    Args:
        renderer: the differentiable ``render.Renderer`` the refinement used.
        xray: (1, 1, H, W) the X-ray on ``detector`` (as given to ``refine``).
        detector: the X-ray's own intrinsics, full resolution.
        pose: (1, 4, 4) or (4, 4) refined camera-to-world pose, mm.
        mask: optional (1, 1, H, W) validity mask, as given to ``refine``.
        scale: calibration factor (``QualityModel.covariance_scale``); 1 = the raw ``H^-1``.
        factor: pyramid downsampling factor to evaluate at; default the finest of
            ``refine.auto_scales(detector)`` (the refinement's last scale).
        similarity, sigma: the refinement's similarity; ``"auto"``: what ``refine``'s default
            scores the finest scale ``factor`` with (the objective the refinement maximised there).
        steps: (6,) finite-difference steps (mm x3, rad x3) about the isocenter.
        max_sd: (6,) standard deviations (mm x3, rad x3) given to unconstrained directions.

    Returns:
        :class:`PoseUncertainty`.

    Raises:
        ValueError: invalid input (shapes, non-finite values).

    """
    objective = IsocenterObjective(renderer, xray, detector, pose, mask=mask, factor=factor, similarity=similarity,
                                   sigma=sigma)
    H_iso = hessian_from_gradients(lambda offsets: objective(offsets)[1], steps)
    return _from_isocenter_hessian(H_iso, objective.adjoint, scale, max_sd, objective.factor)


def carried_uncertainty(uncertainty: PoseUncertainty, renderer, pose: torch.Tensor, scale: float,
                        max_sd=MAX_SD) -> PoseUncertainty:
    """``uncertainty``'s Hessian about the isocenter carried to ``pose`` (1, 4, 4) or (4, 4) mm and
    calibrated by ``scale``: the covariance of a pose near the one it was computed at, without a
    render (tracking: consecutive frames differ by a fraction of a degree)."""
    T = torch.as_tensor(pose).to(torch.float64).cpu().reshape(4, 4)
    return _from_isocenter_hessian(uncertainty.hessian_isocenter, isocenter_adjoint(renderer, T), scale, max_sd,
                                   uncertainty.factor)


def isocenter_adjoint(renderer, pose: torch.Tensor) -> torch.Tensor:
    """(6, 6) adjoint ``Ad_P`` of the translation ``P`` from the C-arm source to the renderer's
    isocenter, for the (4, 4) float64 camera-to-world ``pose``: ``xi = Ad_P xi'``."""
    return adjoint(to_isocenter(renderer, pose))


def to_isocenter(renderer, pose: torch.Tensor) -> torch.Tensor:
    """(4, 4) float64 ``P``: the translation from the C-arm source to the isocenter of ``renderer``
    (anything with an ``isocenter`` (3,) mm in world coordinates; none = the origin), in the C-arm
    frame of the (4, 4) ``pose``."""
    isocenter = getattr(renderer, "isocenter", None)
    isocenter = torch.zeros(3, dtype=torch.float64) if isocenter is None else isocenter.to(torch.float64).cpu()
    inv = invert(pose.to(torch.float64).reshape(4, 4))
    return make_pose(torch.eye(3, dtype=torch.float64), inv[:3, :3] @ isocenter + inv[:3, 3])


def isocenter_twist(renderer, pose: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(6,) the twist about the isocenter (mm x3, rad x3; :class:`IsocenterObjective`'s ``xi'``)
    that moves the (4, 4) ``pose`` to ``other``: ``other = pose P se3_exp(xi') P^-1``."""
    P = to_isocenter(renderer, pose)
    T = invert(P) @ invert(pose.to(torch.float64).reshape(4, 4)) @ other.to(torch.float64).reshape(4, 4) @ P
    return se3_log(T[None])[0]


def _from_isocenter_hessian(H_iso: torch.Tensor, Ad: torch.Tensor, scale: float, max_sd, factor: float
                            ) -> PoseUncertainty:
    covariance, flat = carm_covariance(H_iso, Ad, scale, max_sd)
    Ad_inv = torch.linalg.inv(Ad)
    return PoseUncertainty(
        covariance=covariance,
        hessian=Ad_inv.T @ H_iso @ Ad_inv,  # xi = Ad_P xi'  =>  H = Ad_P^-T H' Ad_P^-1
        hessian_isocenter=H_iso,
        isocenter_adjoint=Ad,
        scale=float(scale),
        flat_directions=flat,
        factor=float(factor),
    )
