"""ROC/AUC/EER, the threshold for a false-match rate, and calibration.json in a real bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lookalike.evaluation.errors import EvaluationError
from lookalike.evaluation.verification import (
    calibrate,
    pair_scores,
    threshold_at_far,
    verification_metrics,
    write_calibration,
)
from lookalike.models.bundle import (
    CALIBRATION_FILE,
    BundleError,
    ModelBundle,
    load_bundle,
    save_bundle,
)


def test_pair_scores_use_every_other_pair_as_negative() -> None:
    rng = np.random.default_rng(0)
    left, right = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in rng.normal(size=(2, 4, 3)))
    positive, negative = pair_scores(left, right)
    full = left @ right.T
    np.testing.assert_allclose(positive, np.diagonal(full))
    assert len(negative) == 12
    np.testing.assert_allclose(sorted(negative), sorted(full[~np.eye(4, dtype=bool)]))


@pytest.mark.parametrize("far", [0.001, 0.01, 0.1, 0.5])
def test_threshold_meets_the_false_match_rate_and_is_the_lowest_that_does(far: float) -> None:
    negative = np.random.default_rng(1).normal(size=10_000)
    threshold = threshold_at_far(negative, far)
    assert (negative >= threshold).mean() <= far
    below = np.nextafter(np.sort(negative)[::-1][int(far * 10_000)], -np.inf)
    assert below < threshold and (negative >= below).mean() > far


def test_threshold_rejects_impossible_rates() -> None:
    for far in (0.0, 1.0, -0.1):
        with pytest.raises(EvaluationError, match="false-match rate"):
            threshold_at_far(np.zeros(10), far)


def test_metrics_on_separable_and_overlapping_scores() -> None:
    perfect = verification_metrics(np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.3]))
    assert perfect["auc"] == 1.0 and perfect["eer"] == 0.0
    assert 0.3 < perfect["eer_threshold"] <= 0.8
    rng = np.random.default_rng(2)
    positive, negative = rng.normal(1, 1, 500), rng.normal(0, 1, 5000)
    metrics = verification_metrics(positive, negative)
    labels = np.r_[np.ones(500), np.zeros(5000)]
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, np.r_[positive, negative]))
    # Two unit-variance normals one sigma apart cross at 0.5: EER = P(N(0,1) > 0.5) ~ 0.31.
    assert metrics["eer"] == pytest.approx(0.31, abs=0.03)
    assert metrics["eer_threshold"] == pytest.approx(0.5, abs=0.15)


@pytest.fixture
def own_bundle(bundle: ModelBundle, tmp_path: Path) -> ModelBundle:
    """A writable copy of the default model as a bundle directory."""
    save_bundle(bundle.net, tmp_path / "model")
    return load_bundle(tmp_path / "model")


def test_calibration_is_written_beside_the_bundle_and_loaded(own_bundle: ModelBundle) -> None:
    assert own_bundle.calibration is None
    rng = np.random.default_rng(3)
    positive, negative = rng.normal(0.6, 0.1, 200), rng.normal(0.3, 0.1, 20_000)
    calibration = calibrate(positive, negative, 0.01, own_bundle, {"pairs_file": "x.csv"})
    path = write_calibration(own_bundle, calibration)
    assert path == own_bundle.path / CALIBRATION_FILE
    reloaded = load_bundle(own_bundle.path)
    assert reloaded.fingerprint == own_bundle.fingerprint, "calibrating must not change the model"
    assert reloaded.calibration["threshold"] == pytest.approx(calibration.threshold)
    assert reloaded.calibration["target_far"] == 0.01
    assert reloaded.calibration["far"] <= 0.01 and reloaded.calibration["tpr"] > 0.5
    assert reloaded.calibration["measured_on"] == {
        "pairs_file": "x.csv",
        "positives": 200,
        "negatives": 20_000,
    }
    assert "threshold" not in json.loads((own_bundle.path / "config.json").read_text())


def test_rewriting_a_calibration_keeps_keys_it_does_not_hold(own_bundle: ModelBundle) -> None:
    file = own_bundle.path / CALIBRATION_FILE
    file.write_text(json.dumps({"threshold": 0.5, "duplicate_threshold": 0.93,
                                "model_fingerprint": own_bundle.fingerprint}))
    calibration = calibrate(np.ones(3), np.zeros(300), 0.01, own_bundle, {})
    write_calibration(own_bundle, calibration)
    written = json.loads(file.read_text())
    assert written["duplicate_threshold"] == 0.93
    assert written["threshold"] == calibration.threshold != 0.5


def test_calibration_of_other_weights_is_ignored(own_bundle: ModelBundle) -> None:
    file = own_bundle.path / CALIBRATION_FILE
    file.write_text(json.dumps({"threshold": 0.5, "model_fingerprint": "0" * 64}))
    assert load_bundle(own_bundle.path).calibration is None
    calibration = calibrate(np.ones(3), np.zeros(300), 0.01, own_bundle, {})
    other = ModelBundle(own_bundle.net, "f" * 64, own_bundle.path, "other")
    with pytest.raises(EvaluationError, match="another model"):
        write_calibration(other, calibration)


@pytest.mark.parametrize("text", ["{not json", '{"far": 0.1}', '{"threshold": 7}', "[1, 2]"])
def test_a_damaged_calibration_is_a_clear_error(own_bundle: ModelBundle, text: str) -> None:
    (own_bundle.path / CALIBRATION_FILE).write_text(text)
    with pytest.raises(BundleError, match="calibration.json"):
        load_bundle(own_bundle.path)
