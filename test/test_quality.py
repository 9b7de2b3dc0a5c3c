"""Registration quality: the model file, the logistic fit, and the verdict on registrations."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from test_uncertainty import DETECTOR, POSE, BlobRenderer, cloud

from xvr_ros.core.register import quality
from xvr_ros.core.register.quality import (
    FEATURES,
    MODEL_PATH,
    MODEL_PATHS,
    QualityModel,
    QualityModelError,
    accept,
    load_model,
)
from xvr_ros.core.register.refine import refine
from xvr_ros.core.rotations import se3_exp


def toy_model(**overrides) -> QualityModel:
    n = len(FEATURES)
    weights = [0.0] * n
    weights[FEATURES.index("log10_dissimilarity")] = -4.0
    fields = dict(features=FEATURES, center=[-1.0] * n, scale=[0.5] * n, weights=weights, bias=0.0, threshold=0.8,
                  covariance_scale=1e-4, fitted_on={"cases": 0}, date="2026-01-01")
    return QualityModel(**{**fields, **overrides})


# --------------------------------------------------------------------------------------------
# the model file
# --------------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    model = toy_model()
    path = model.save(tmp_path / "m.json")
    again = load_model(path)
    assert again == model
    values = {"log10_dissimilarity": -2.0, "log10_dissimilarity_gradncc": math.nan}
    assert again.p_success(values) == pytest.approx(1 / (1 + math.exp(-4.0 * 2.0)))
    data = json.loads(path.read_text())
    assert data["format"] == quality.FORMAT and data["version"] == quality.VERSION


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("version"), "version"),
        (lambda d: d.update(version=quality.VERSION + 1), "version"),
        (lambda d: d.update(format="something else"), "not a quality model"),
        (lambda d: d.update(features=list(FEATURES[:-1])), "features"),
        (lambda d: d.update(weights=d["weights"][:-1]), "weights"),
        (lambda d: d.pop("bias"), "incomplete"),
        (lambda d: d.update(bias=None), "non-numeric"),
        (lambda d: d.update(threshold=1.5), "threshold"),
        (lambda d: d.update(upper_limits={"no such feature": 1.0}), "upper_limits"),
    ],
)
def test_a_wrong_model_file_is_refused(tmp_path, edit, match):
    path = toy_model().save(tmp_path / "m.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(QualityModelError, match=match):
        load_model(path)


def test_a_missing_or_corrupt_file_is_refused(tmp_path):
    with pytest.raises(QualityModelError, match="fit_quality"):
        load_model(tmp_path / "absent.json")
    path = tmp_path / "m.json"
    path.write_text('{"format": "xvr_ros.quality_model", "vers')
    with pytest.raises(QualityModelError, match="not a readable"):
        load_model(path)
    path.write_text("[1, 2]")
    with pytest.raises(QualityModelError, match="not a quality model"):
        load_model(path)


def test_the_shipped_model_loads_and_is_calibrated_for_a_low_false_accept_rate():
    model = load_model()
    assert model.features == FEATURES
    assert 0.5 <= model.threshold < 1.0
    assert model.covariance_scale > 0
    assert model.fitted_on["cases"] > 0


def test_a_match_worse_than_every_fitted_success_gets_zero():
    model = toy_model(upper_limits={"log10_dissimilarity": -1.0})
    assert model.p_success({"log10_dissimilarity": -1.1}) > 0.5
    assert model.p_success({"log10_dissimilarity": -0.9}) == 0.0
    assert model.p_success({"log10_dissimilarity": math.nan}) == pytest.approx(0.5)  # unknown: the center
    assert model.outside({"log10_dissimilarity": -0.9}) == ["log10_dissimilarity"]


def test_the_shipped_models_do_not_vouch_for_a_registration_that_turned_far_from_its_start():
    # Seen in a fluoroscopy run (bench_tracking.py): from a network estimate 70 mm off, a full
    # registration ended turned by 117 deg and 144 mm, 228 mm mTRE, at similarity 0.18; the
    # previous model, whose weight on the move is positive, gave it p_success 0.999.
    turned = {"log10_dissimilarity": -0.087, "log10_dissimilarity_mncc": -0.273, "log10_dissimilarity_gradncc": -0.113,
              "log10_dissimilarity_coarse": -0.19, "multistart_agreement": 0.556, "log10_sd_translation": 1.553,
              "log10_sd_rotation": -0.386, "flat_directions": 0.0, "moved_rotation_deg": 117.1,
              "moved_translation_mm": 143.7, "masked_fraction": 0.538, "converged": 1.0}
    assert set(MODEL_PATHS) == {"full", "coarse", "tracking"} and MODEL_PATHS["full"] == MODEL_PATH
    for path in MODEL_PATHS.values():
        model = load_model(path)
        assert {"moved_rotation_deg", "moved_translation_mm"} <= set(model.upper_limits), path
        assert "moved_rotation_deg" in model.outside(turned) and model.p_success(turned) == 0.0, path


def test_accept():
    assert accept(0.9, 0.9) and not accept(0.89, 0.9)
    assert not accept(math.nan, 0.0)


# --------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------
def test_logistic_fit_recovers_known_weights():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    true_w, true_b = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64), 0.5
    y = (torch.rand(4000, generator=g, dtype=torch.float64) < torch.sigmoid(X @ true_w + true_b)).double()
    w, b = quality.fit_logistic(X, y, l2=1e-3)
    torch.testing.assert_close(w, true_w, atol=0.2, rtol=0)
    assert b == pytest.approx(true_b, abs=0.2)


def test_logistic_fit_stays_finite_on_separable_data():
    X = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None]
    w, b = quality.fit_logistic(X, (X[:, 0] > 0).double(), l2=1.0)
    assert math.isfinite(float(w[0])) and float(w[0]) > 0 and math.isfinite(b)


# --------------------------------------------------------------------------------------------
# a verdict on registrations (a stand-in renderer, the toy model: the plumbing, not the fit)
# --------------------------------------------------------------------------------------------
def refined(renderer, xray, start):
    return refine(renderer, xray, DETECTOR, start, similarity="ncc", scales=(2.0, 1.0), max_iterations=40)


def test_a_start_far_outside_the_capture_range_is_rejected():
    renderer = BlobRenderer(cloud(12), 8.0)
    xray = renderer(POSE, DETECTOR)
    near = POSE @ se3_exp(torch.tensor([[1.0, 2.0, -1.0, 0.002, 0.0, 0.001]], dtype=torch.float64))
    far = POSE @ se3_exp(torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.4, 0.0]], dtype=torch.float64))  # ~30 deg off
    registration = SimpleNamespace(refinement=refined(renderer, xray, near), initial_pose=near, field_of_view=None,
                                   multistart_similarity=torch.tensor([0.9, 0.2, 0.895]))
    good = quality.assess_registration(renderer, registration, xray, DETECTOR, model=toy_model())
    bad = quality.assess(renderer, xray, DETECTOR, refined(renderer, xray, far), initial_pose=far, model=toy_model())
    assert good.accepted and good.reason.startswith("accepted")
    assert not bad.accepted and bad.p_success < 0.1 and bad.reason.startswith("rejected")
    assert "dissimilarity" in bad.reason
    assert good.covariance.shape == (6, 6) and bool(torch.isfinite(good.covariance).all())
    assert set(good.features) == set(FEATURES)
    assert good.features["multistart_agreement"] == pytest.approx(2 / 3)
    assert math.isnan(bad.features["multistart_agreement"])  # no multi-start: unknown, not invented
    assert good.features["moved_translation_mm"] > 0


def test_a_refinement_cut_short_before_its_finest_scale_is_rejected():
    renderer = BlobRenderer(cloud(12), 8.0)
    xray = renderer(POSE, DETECTOR)
    near = POSE @ se3_exp(torch.tensor([[1.0, 2.0, -1.0, 0.002, 0.0, 0.001]], dtype=torch.float64))
    cut = refine(renderer, xray, DETECTOR, near, similarity="ncc", scales=(2.0, 1.0), time_budget=0.0)
    assert math.isnan(float(cut.similarity[0])), cut.message
    verdict = quality.assess(renderer, xray, DETECTOR, cut, initial_pose=near, model=toy_model(threshold=0.0))
    assert not verdict.accepted and verdict.p_success == 0.0 and "finest scale" in verdict.reason


def test_features_of_a_wrong_optimum_are_rejected_by_the_shipped_model():
    """A refinement that ended far from its start on a poor match, unconverged, with a flat optimum."""
    model = load_model()
    def dis(s):
        return math.log10(1 - s)

    failed = {
        "log10_dissimilarity": dis(0.3), "log10_dissimilarity_mncc": dis(0.4), "log10_dissimilarity_gradncc": dis(0.05),
        "log10_dissimilarity_coarse": dis(0.4), "multistart_agreement": 0.1, "log10_sd_translation": 3.0,
        "log10_sd_rotation": 0.0, "flat_directions": 3.0, "moved_rotation_deg": 25.0, "moved_translation_mm": 150.0,
        "masked_fraction": 0.3, "converged": 0.0,
    }
    assert not accept(model.p_success(failed), model.threshold)
