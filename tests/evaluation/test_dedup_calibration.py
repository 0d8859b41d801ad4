"""The dedup parameters in calibration.json: one merging writer, checked when the model loads,
and the one command that measures and writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lookalike.evaluation.verification import calibrate, write_calibration
from lookalike.models.bundle import (
    CALIBRATION_FILE,
    BundleError,
    ModelBundle,
    load_bundle,
    save_bundle,
)
from lookalike.models.model import DEDUP_KEY, update_calibration

DEDUP = {"threshold": 0.35, "candidate_cosine": 0.3, "cosine_only_threshold": 0.84, "k": 10,
         "cosine_weight": 1.0}


@pytest.fixture
def own_bundle(bundle: ModelBundle, tmp_path: Path) -> ModelBundle:
    save_bundle(bundle.net, tmp_path / "model")
    return load_bundle(tmp_path / "model")


def test_each_measurement_keeps_the_others_keys(own_bundle: ModelBundle) -> None:
    with pytest.raises(BundleError, match="verification threshold first"):
        update_calibration(own_bundle.path, own_bundle.fingerprint, {DEDUP_KEY: DEDUP})
    assert not (own_bundle.path / CALIBRATION_FILE).exists()  # a refused write stores nothing
    verification = calibrate(np.full(50, 0.8), np.full(500, 0.1), 0.01, own_bundle, {})
    write_calibration(own_bundle, verification)
    update_calibration(own_bundle.path, own_bundle.fingerprint, {DEDUP_KEY: DEDUP})
    write_calibration(own_bundle, verification)  # re-measuring verification keeps dedup
    calibration = load_bundle(own_bundle.path).calibration
    assert calibration[DEDUP_KEY] == DEDUP
    assert calibration["threshold"] == pytest.approx(verification.threshold)


@pytest.mark.parametrize("dedup", [{"threshold": 3}, "x", {**DEDUP, "k": 0},
                                   {**DEDUP, "candidate_cosine": None},
                                   {**DEDUP, "cosine_weight": -1}, {**DEDUP, "cosine_weight": "1"}])
def test_a_damaged_dedup_entry_fails_when_the_model_loads(own_bundle: ModelBundle, dedup) -> None:  # noqa: ANN001
    (own_bundle.path / CALIBRATION_FILE).write_text(json.dumps(
        {"threshold": 0.4, "model_fingerprint": own_bundle.fingerprint, DEDUP_KEY: dedup}))
    with pytest.raises(BundleError, match="dedup-evaluate"):
        load_bundle(own_bundle.path)
