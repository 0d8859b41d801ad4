"""Pair verification: do two images look alike? ROC/AUC, equal error rate, a calibrated threshold.

Positives are the labelled pairs; negatives are every other (left, right) combination of the
same images, so the false-match rate is estimated on N x (N - 1) pairs rather than a sample.
The threshold for a target false-match rate (FAR) is set on the negatives alone: "same" means
score >= threshold, and at most ``far`` of the negatives reach it.

The calibration is written to ``calibration.json`` beside the bundle, never into
``config.json``: that would change the model's fingerprint and orphan every index built with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ..models.bundle import ModelBundle
from ..models.model import update_calibration
from .errors import EvaluationError

__all__ = [
    "Calibration",
    "pair_scores",
    "matrix_pairs",
    "labelled_scores",
    "verification_metrics",
    "threshold_at_far",
    "calibrate",
    "write_calibration",
]


def pair_scores(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors ``(N, D)`` of pairs ``(left[i], right[i])`` -> (positive ``(N,)``,
    negative ``(N * (N - 1),)``) cosines; negatives are all ``(left[i], right[j]), i != j``."""
    if left.shape != right.shape or len(left) < 2:
        raise EvaluationError(
            f"verification needs at least 2 pairs of equal-shaped vectors, got {left.shape} "
            f"and {right.shape}"
        )
    return matrix_pairs(np.clip(left @ right.T, -1.0, 1.0))


def matrix_pairs(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, N)`` scores of ``left[i]`` against ``right[j]`` -> (positive: the diagonal,
    negative: every other entry), as float64; for scorers other than the cosine."""
    scores = np.asarray(scores, dtype=np.float64)
    off_diagonal = ~np.eye(len(scores), dtype=bool)
    return np.diagonal(scores).copy(), scores[off_diagonal]


def labelled_scores(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) in the layout scikit-learn's curves take: 1 = matching pair."""
    labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    return labels, np.concatenate([positive, negative])


def verification_metrics(positive: np.ndarray, negative: np.ndarray) -> dict[str, float]:
    """ROC-AUC, average precision, and the equal error rate with the threshold where it holds."""
    if not len(positive) or not len(negative):
        raise EvaluationError("verification needs both matching and non-matching pairs")
    labels, scores = labelled_scores(positive, negative)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    at = int(np.argmin(np.abs(fnr - fpr)))
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        "eer": float((fpr[at] + fnr[at]) / 2),
        "eer_threshold": float(min(thresholds[at], 1.0)),
        "positives": int(len(positive)),
        "negatives": int(len(negative)),
    }


def threshold_at_far(negative: np.ndarray, far: float) -> float:
    """The lowest threshold at which at most ``far`` of the negatives score >= it."""
    if not 0.0 < far < 1.0:
        raise EvaluationError(f"the target false-match rate must be in (0, 1), got {far}")
    ordered = np.sort(np.asarray(negative, dtype=np.float64))[::-1]
    allowed = math.floor(far * len(ordered) + 1e-9)
    if allowed >= len(ordered):
        return float(ordered[-1])
    # Just above the first negative that must be rejected (ties are rejected with it).
    return float(np.nextafter(ordered[allowed], np.inf))


@dataclass(frozen=True)
class Calibration:
    """What ``calibration.json`` holds: the threshold and how it was measured."""

    threshold: float
    target_far: float
    far: float
    """False-match rate the threshold actually gives on the measured negatives."""
    tpr: float
    """Share of the matching pairs that score >= threshold."""
    auc: float
    eer: float
    eer_threshold: float
    model_fingerprint: str
    measured_on: dict[str, Any]
    created: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate(
    positive: np.ndarray,
    negative: np.ndarray,
    far: float,
    bundle: ModelBundle,
    measured_on: dict[str, Any],
) -> Calibration:
    """Choose the threshold for ``far`` and record the evidence for it."""
    threshold = threshold_at_far(negative, far)
    metrics = verification_metrics(positive, negative)
    return Calibration(
        threshold=threshold,
        target_far=far,
        far=float((negative >= threshold).mean()),
        tpr=float((positive >= threshold).mean()),
        auc=metrics["auc"],
        eer=metrics["eer"],
        eer_threshold=metrics["eer_threshold"],
        model_fingerprint=bundle.fingerprint,
        measured_on=dict(measured_on, positives=len(positive), negatives=len(negative)),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def write_calibration(bundle: ModelBundle, calibration: Calibration) -> Path:
    """Write ``calibration.json`` into the bundle directory (atomically); returns its path.

    Keys of an existing file that a :class:`Calibration` does not hold (e.g. another
    threshold kept beside the verification one) are kept."""
    if bundle.path is None:
        raise EvaluationError(f"model {bundle.name} has no bundle directory to calibrate")
    if calibration.model_fingerprint != bundle.fingerprint:
        raise EvaluationError("this calibration was measured with another model")
    return update_calibration(Path(bundle.path), bundle.fingerprint, calibration.to_dict())
