"""Did a registration succeed? A calibrated probability from what exists after refinement.

A refinement always returns a pose; one that ended in a wrong local optimum looks, to a robot,
exactly like a good one. This module turns what the registration knows at the end (never the
truth) into ``p_success``, the probability that the pose is within 1 mm mTRE, and an accept /
reject decision:

1. :func:`features` (names in :data:`FEATURES`): the final similarity at the finest scale and its
   two terms (mNCC, gradient NCC) at the refined pose and the best similarity at the coarsest
   scale, each as ``log10(1 - s)``; how many multi-start candidates agreed with the best one; the
   Laplace covariance's size about the isocenter (:mod:`.uncertainty`, uncalibrated) and how many
   directions the image left unconstrained; how far the pose moved from where the registration
   started; the masked fraction of the image; whether the optimiser converged.
2. A logistic model on the standardised features: ``p = sigmoid(bias + w . (f - center) / scale)``,
   ``center`` and ``scale`` robust (the median and the MAD of the fitting cases, so that the few
   gross failures do not set the scale). A missing feature (NaN, e.g. no multi-start) takes the
   center, so it says nothing. A registration whose image match is worse, or whose pose moved
   further from its start, than every successful fitting registration's (``upper_limits``) gets
   ``p = 0``: the model would be extrapolating.
3. ``accepted = p >= threshold``. The model file's ``threshold`` was chosen when fitting for a
   low false-accept rate; a caller may pass a stricter one.

The fitted model is a small versioned JSON file shipped in the package (:data:`MODEL_PATH`); it
also carries the covariance calibration factor (``covariance_scale``). Tracked fluoroscopy frames
(``tracking.track``: Newton steps from the previous frame's pose, assessed on a coarser level) have
a model of their own (:data:`TRACKING_MODEL_PATH`): their features lie elsewhere and separate
success from failure differently, and so have full registrations stopped a scale early (the first
frame of a fluoroscopy run, which tracking then finishes: :data:`COARSE_MODEL_PATH`). Refit with
``python bench/fit_quality.py [--path coarse|tracking]``
(simulated registrations, see that script). :func:`load_model`
refuses a missing, corrupt, or other-version file with :class:`QualityModelError`.

After a registration: ``assess_registration(renderer, registration, xray.image, xray.detector)``
(or :func:`assess` with the pieces) -> :class:`Assessment` (``p_success``, ``accepted``,
``reason``, ``covariance``). It costs 13 renders at the refinement's finest scale (one for a
tracked frame, whose Newton steps brought a Hessian along).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xvr_ros.core.geometry import Detector
from xvr_ros.core.io.files import atomic_path
from xvr_ros.core.metrics import pose_errors
from xvr_ros.core.register import similarity as sim_mod
from xvr_ros.core.register.refine import RefineResult, intra_op_threads, pyramid
from xvr_ros.core.register.uncertainty import (
    MAX_SD,
    PoseUncertainty,
    carried_uncertainty,
    covariance_from_hessian,
    pose_uncertainty,
)
from xvr_ros.core.render.renderer import render_scored

__all__ = [
    "FEATURES",
    "FORMAT",
    "COARSE_MODEL_PATH",
    "MODEL_PATH",
    "MODEL_PATHS",
    "TRACKING_MODEL_PATH",
    "VERSION",
    "Assessment",
    "QualityModel",
    "QualityModelError",
    "accept",
    "assess",
    "assess_registration",
    "features",
    "fit_logistic",
    "load_model",
    "similarity_terms",
]

FORMAT = "xvr_ros.quality_model"
VERSION = 1
MODEL_PATH = Path(__file__).resolve().parent / "quality_model.json"
TRACKING_MODEL_PATH = MODEL_PATH.with_name("quality_model_tracking.json")
COARSE_MODEL_PATH = MODEL_PATH.with_name("quality_model_coarse.json")
#: Each registration path's model file: "full", "coarse" (a full registration stopped a scale
#: early, ``registration.coarse_scales``) and "tracking".
MODEL_PATHS = {"full": MODEL_PATH, "coarse": COARSE_MODEL_PATH, "tracking": TRACKING_MODEL_PATH}

#: The features, in the model's order (see the module docstring).
FEATURES: tuple[str, ...] = (
    "log10_dissimilarity",
    "log10_dissimilarity_mncc",
    "log10_dissimilarity_gradncc",
    "log10_dissimilarity_coarse",
    "multistart_agreement",
    "log10_sd_translation",
    "log10_sd_rotation",
    "flat_directions",
    "moved_rotation_deg",
    "moved_translation_mm",
    "masked_fraction",
    "converged",
)

#: Multi-start candidates within this similarity of the best count as agreeing with it.
AGREEMENT_TOLERANCE = 0.01


class QualityModelError(ValueError):
    """The quality model file is missing, unreadable, or not a model this code can use."""


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
def similarity_terms(
    renderer, xray: torch.Tensor, detector: Detector, pose: torch.Tensor, *, mask=None, factor: float = 1.0,
    sigma: float = 1.0,
) -> dict[str, float]:
    """The two halves of the default similarity, mNCC and gradient NCC, at ``pose`` (1, 4, 4) on the
    pyramid level ``factor`` of the (1, 1, H, W) X-ray -> ``{"mncc": .., "gradncc": ..}``."""
    dtype = getattr(renderer, "dtype", torch.float32)
    device = getattr(renderer, "device", torch.device("cpu"))
    img, msk, det = pyramid(xray.to(device, dtype), None if mask is None else mask.to(device), detector, factor)
    with torch.no_grad():
        drr = render_scored(renderer, pose.reshape(1, 4, 4).to(device, dtype), det, msk).sum(dim=1, keepdim=True)
        return {
            "mncc": float(sim_mod.mncc(drr.float(), img.float(), msk)[0]),
            "gradncc": float(sim_mod.gradncc(drr.float(), img.float(), msk, sigma=sigma)[0]),
        }


def _log10_dissimilarity(similarity: float) -> float:
    """``log10(1 - s)``: spreads the successes' 0.95-0.99 and squeezes the failures' 0.2-0.7."""
    return math.log10(max(1.0 - float(similarity), 1e-6)) if math.isfinite(similarity) else math.nan


def features(
    refinement: RefineResult,
    uncertainty: PoseUncertainty,
    terms: dict[str, float],
    *,
    initial_pose: torch.Tensor,
    mask: torch.Tensor | None = None,
    multistart_similarity: torch.Tensor | None = None,
) -> dict[str, float]:
    """The :data:`FEATURES` of one registration (batch of one) -> {name: value}; NaN = unknown.

    ``refinement``: the final ``refine`` result; ``uncertainty``: :func:`pose_uncertainty` of its
    pose (its scale does not matter: the isocenter Hessian is used); ``terms``:
    :func:`similarity_terms` at its pose; ``initial_pose``: (1, 4, 4) where the registration
    started (network, positioner or given), before any multi-start; ``mask``: the validity mask
    the refinement used; ``multistart_similarity``: (K,) the candidates' similarities, if run.
    """
    if len(refinement.pose) != 1:
        raise ValueError(f"features are for one registration, got a batch of {len(refinement.pose)}")
    coarse = [float(s[0]) for s, f in zip(refinement.trajectory, refinement.trajectory_scale)
              if f == refinement.scales[0]]
    coarse = [s for s in coarse if math.isfinite(s)]
    agreement = math.nan
    if multistart_similarity is not None and len(multistart_similarity):
        ms = torch.nan_to_num(multistart_similarity.double(), nan=-math.inf)
        agreement = float((ms >= ms.max() - AGREEMENT_TOLERANCE).double().mean())
    cov, flat = covariance_from_hessian(uncertainty.hessian_isocenter, 1.0, MAX_SD)
    var = cov.diagonal()
    rot_deg, trans_mm = pose_errors(initial_pose.reshape(1, 4, 4).double().cpu(), refinement.pose.double().cpu())
    valid = 1.0 if mask is None else float((mask > 0).double().mean())
    converged = refinement.converged
    return {
        "log10_dissimilarity": _log10_dissimilarity(float(refinement.similarity[0])),
        "log10_dissimilarity_mncc": _log10_dissimilarity(terms["mncc"]),
        "log10_dissimilarity_gradncc": _log10_dissimilarity(terms["gradncc"]),
        "log10_dissimilarity_coarse": _log10_dissimilarity(max(coarse)) if coarse else math.nan,
        "multistart_agreement": agreement,
        "log10_sd_translation": 0.5 * math.log10(float(var[:3].sum())),
        "log10_sd_rotation": 0.5 * math.log10(float(var[3:].sum())),
        "flat_directions": float(flat),
        "moved_rotation_deg": float(rot_deg[0]),
        "moved_translation_mm": float(trans_mm[0]),
        "masked_fraction": 1.0 - valid,
        "converged": math.nan if converged is None else float(bool(converged[0])),
    }


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass
class QualityModel:
    """A fitted logistic model: ``p_success = sigmoid(bias + sum_i w_i (f_i - center_i) / scale_i)``.

    features: names, in order; center, scale, weights: one float per feature; threshold: default
    acceptance threshold on ``p_success``; covariance_scale: calibration factor of the Laplace
    covariance (``uncertainty.pose_uncertainty(scale=...)``); upper_limits: {feature: value} the
    edge of what the fit has seen succeed: a registration beyond any of them (e.g. a match worse
    than every successful fitting registration's) gets ``p_success`` 0, since the logistic model
    would only be extrapolating there; fitted_on: free-form description (cases, simulator,
    command, figures); date: ISO date of the fit.
    """

    features: tuple[str, ...]
    center: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    threshold: float
    covariance_scale: float
    upper_limits: dict[str, float] = field(default_factory=dict)
    target: str = "mTRE < 1 mm"
    fitted_on: dict = field(default_factory=dict)
    date: str = ""

    def __post_init__(self):
        n = len(self.features)
        if not all(len(v) == n for v in (self.center, self.scale, self.weights)):
            raise QualityModelError(f"{n} features but {len(self.center)} centers, {len(self.scale)} scales and "
                                    f"{len(self.weights)} weights")
        numbers = [*self.center, *self.scale, *self.weights, self.bias, self.threshold, self.covariance_scale]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise QualityModelError("the model has non-numeric or non-finite parameters")
        if not all(s > 0 for s in self.scale) or not self.covariance_scale > 0:
            raise QualityModelError("feature scales and covariance_scale must be positive")
        if not 0.0 <= self.threshold <= 1.0:
            raise QualityModelError(f"threshold must be a probability, got {self.threshold}")
        if not isinstance(self.upper_limits, dict) or not set(self.upper_limits) <= set(self.features):
            raise QualityModelError(f"upper_limits must map feature names to numbers, got {self.upper_limits!r}")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.upper_limits.values()):
            raise QualityModelError("upper_limits must be finite numbers")

    def standardise(self, values: dict[str, float]) -> list[float]:
        """{name: value} -> standardised values in the model's order; NaN/missing -> 0 (the center)."""
        z = []
        for name, m, s in zip(self.features, self.center, self.scale):
            v = values.get(name, math.nan)
            z.append(0.0 if v is None or not math.isfinite(v) else (float(v) - m) / s)
        return z

    def logit_terms(self, values: dict[str, float]) -> dict[str, float]:
        """Each feature's contribution ``w_i z_i`` to the logit."""
        return {n: w * z for n, w, z in zip(self.features, self.weights, self.standardise(values))}

    def outside(self, values: dict[str, float]) -> list[str]:
        """The features beyond their :attr:`upper_limits` (unknown values are not)."""
        return [n for n, lim in self.upper_limits.items() if math.isfinite(values.get(n, math.nan)) and values[n] > lim]

    def p_success(self, values: dict[str, float]) -> float:
        """P(mTRE < 1 mm) for one registration's features; 0 beyond the :attr:`upper_limits`."""
        if self.outside(values):
            return 0.0
        return _sigmoid(self.bias + sum(self.logit_terms(values).values()))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "target": self.target,
            "features": list(self.features),
            "center": self.center,
            "scale": self.scale,
            "weights": self.weights,
            "bias": self.bias,
            "threshold": self.threshold,
            "covariance_scale": self.covariance_scale,
            "upper_limits": self.upper_limits,
            "fitted_on": self.fitted_on,
            "date": self.date,
        }

    def save(self, path: str | os.PathLike = MODEL_PATH) -> Path:
        """Write the model as JSON, atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return Path(path)


def load_model(path: str | os.PathLike | None = None) -> QualityModel:
    """Read a model written by :meth:`QualityModel.save` (default: the package's :data:`MODEL_PATH`).

    Raises:
        QualityModelError: the file is missing, not JSON, not a quality model, of another version,
            or its features are not this code's :data:`FEATURES`.

    """
    path = Path(MODEL_PATH if path is None else path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise QualityModelError(f"{path}: no quality model; fit one with `python bench/fit_quality.py`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QualityModelError(f"{path}: not a readable quality model ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise QualityModelError(f"{path}: not a quality model (format {found!r}, expected {FORMAT!r})")
    if data.get("version") != VERSION:
        raise QualityModelError(f"{path}: model version {data.get('version')!r}, this code reads version {VERSION}; "
                                "refit with `python bench/fit_quality.py`")
    if tuple(data.get("features", ())) != FEATURES:
        raise QualityModelError(f"{path}: features {data.get('features')} differ from this code's {list(FEATURES)}")
    try:
        return QualityModel(
            features=tuple(data["features"]), center=list(data["center"]), scale=list(data["scale"]),
            weights=list(data["weights"]), bias=data["bias"], threshold=data["threshold"],
            covariance_scale=data["covariance_scale"], upper_limits=data.get("upper_limits", {}),
            target=data.get("target", ""),
            fitted_on=data.get("fitted_on", {}), date=data.get("date", ""),
        )
    except (KeyError, TypeError) as e:
        raise QualityModelError(f"{path}: incomplete quality model ({e!r})") from None


def accept(p_success: float, threshold: float) -> bool:
    """Accept a registration when ``p_success >= threshold`` (NaN is never accepted)."""
    return bool(math.isfinite(p_success) and p_success >= threshold)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1.0, iterations: int = 50) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression by Newton's method (IRLS).

    X: (N, D) standardised features; y: (N,) 0/1 labels; l2: ridge on the weights (not the bias).
    Returns (weights (D,), bias). The ridge keeps it finite on separable data.
    """
    X = X.to(torch.float64)
    y = y.to(torch.float64)
    N, D = X.shape
    A = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], dim=1)
    reg = torch.full((D + 1,), float(l2), dtype=torch.float64)
    reg[-1] = 1e-6
    beta = torch.zeros(D + 1, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(A @ beta)
        g = A.T @ (p - y) + reg * beta
        Hm = (A * (p * (1 - p))[:, None]).T @ A + torch.diag(reg)
        step = torch.linalg.solve(Hm, g)
        beta = beta - step
        if float(step.abs().max()) < 1e-10:
            break
    return beta[:-1], float(beta[-1])


# --------------------------------------------------------------------------------------------
# the one call after a registration
# --------------------------------------------------------------------------------------------
@dataclass
class Assessment:
    """The verdict on one registration.

    p_success: P(mTRE < 1 mm) from the quality model.
    accepted: ``p_success >= threshold``.
    threshold: the threshold used.
    reason: one line for logs and diagnostics (the largest negative contributions when rejected).
    covariance: (6, 6) float64 calibrated covariance of the refined pose (tx, ty, tz mm, rx, ry, rz
        rad; right perturbation in the C-arm frame, see :mod:`.uncertainty`).
    features: the feature values.
    uncertainty: the full :class:`~.uncertainty.PoseUncertainty`.
    """

    p_success: float
    accepted: bool
    threshold: float
    reason: str
    covariance: torch.Tensor
    features: dict[str, float]
    uncertainty: PoseUncertainty


def _reason(model: QualityModel, values: dict[str, float], p: float, accepted: bool, threshold: float) -> str:
    if accepted:
        return f"accepted: p_success {p:.3f} >= {threshold:.3f}"
    beyond = model.outside(values)
    if beyond:
        what = ", ".join(f"{n}={values[n]:.3g} > {model.upper_limits[n]:.3g}" for n in beyond)
        return f"rejected: worse than every successful registration the model was fitted on ({what})"
    worst = sorted(model.logit_terms(values).items(), key=lambda kv: kv[1])[:2]
    why = ", ".join(f"{n}={values.get(n, math.nan):.3g}" for n, c in worst if c < 0)
    return f"rejected: p_success {p:.3f} < {threshold:.3f}" + (f" (weakest: {why})" if why else "")


def assess(
    renderer,
    xray: torch.Tensor,
    detector: Detector,
    refinement: RefineResult,
    *,
    initial_pose: torch.Tensor,
    mask: torch.Tensor | None = None,
    multistart_similarity: torch.Tensor | None = None,
    model: QualityModel | None = None,
    threshold: float | None = None,
    uncertainty: PoseUncertainty | None = None,
) -> Assessment:
    """Covariance, ``p_success`` and accept/reject for one finished registration.

    Args:
        renderer, xray, detector, mask: as given to ``refine`` ((1, 1, H, W) X-ray, full-resolution
            detector, optional (1, 1, H, W) mask).
        refinement: the final ``RefineResult`` (one pose).
        initial_pose: (1, 4, 4) where the registration started (before any multi-start), mm.
        multistart_similarity: (K,) the multi-start candidates' similarities, if multi-start ran.
        model: the quality model; default :func:`load_model` of the package's file.
        threshold: acceptance threshold; default the model's.
        uncertainty: a Hessian already computed near the refined pose (a tracked frame's, see
            ``tracking.track``): carried to the pose and calibrated, instead of the 12 renders.

    Raises:
        QualityModelError: no usable model. ValueError: an invalid threshold. A pose whose
        covariance cannot be computed is rejected (``p_success`` 0), not raised.

    """
    model = load_model() if model is None else model
    threshold = model.threshold if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    factor = refinement.scales[-1] if refinement.scales else None
    try:
        if uncertainty is not None:
            unc = carried_uncertainty(uncertainty, renderer, refinement.pose, model.covariance_scale)
        else:
            # One thread, as the refinement: small images, and a second thread on a busy CPU waits
            # for a time slice at every operation, several times slower.
            with intra_op_threads(1):
                unc = pose_uncertainty(renderer, xray, detector, refinement.pose, mask=mask,
                                       scale=model.covariance_scale, factor=factor)
    except ValueError as e:  # e.g. the similarity is not finite near the pose: nothing to trust
        cov = torch.diag(torch.tensor(MAX_SD, dtype=torch.float64) ** 2)
        zeros = torch.zeros(6, 6, dtype=torch.float64)
        unc = PoseUncertainty(cov, zeros, zeros, torch.eye(6, dtype=torch.float64), model.covariance_scale, 6,
                              math.nan if factor is None else float(factor))
        return Assessment(0.0, False, threshold, f"rejected: no covariance ({e})", cov, {}, unc)
    terms = similarity_terms(renderer, xray, detector, refinement.pose, mask=mask, factor=unc.factor)
    values = features(refinement, unc, terms, initial_pose=initial_pose, mask=mask,
                      multistart_similarity=multistart_similarity)
    if not math.isfinite(values["log10_dissimilarity"]):
        # The time budget ran out before the finest scale: the final match, the model's main
        # evidence, is unknown, and a missing feature would take the fitted median (say "typical").
        return Assessment(0.0, False, threshold, "rejected: the refinement stopped before its finest scale "
                          "(time budget), so its match is unknown", unc.covariance, values, unc)
    p = model.p_success(values)
    ok = accept(p, threshold)
    return Assessment(p, ok, threshold, _reason(model, values, p, ok, threshold), unc.covariance, values, unc)


def assess_registration(
    renderer, registration, xray: torch.Tensor, detector: Detector, *, model: QualityModel | None = None,
    threshold: float | None = None,
) -> Assessment:
    """:func:`assess` for a ``registration.Registration`` of the (1, 1, H, W) ``xray`` on ``detector``.

    Reads ``registration.refinement``, ``.initial_pose``, the mask the refinement used (``.mask``;
    ``.field_of_view`` when there is none) and the multi-start candidates' similarities
    (``.multistart_similarity``, if present) and a tracked frame's Hessian (``.uncertainty``).
    """
    mask = getattr(registration, "mask", None)
    if mask is None:
        mask = getattr(registration, "field_of_view", None)
    return assess(
        renderer, xray, detector, registration.refinement, initial_pose=registration.initial_pose, mask=mask,
        multistart_similarity=getattr(registration, "multistart_similarity", None), model=model, threshold=threshold,
        uncertainty=getattr(registration, "uncertainty", None),
    )
