"""Do two images look alike? The pair verdict that ``POST /compare`` and ``lookalike compare``
share, so both judge a pair by the same score at the same threshold.

* Plain: the cosine; with the calibration's :data:`~.model.HUBNESS_KEY` entry, the cosine minus
  half of each image's hubness against the model's cohort (:mod:`.cohort`), at that entry's
  threshold; else the calibrated threshold, or the caller's fallback for an uncalibrated model.
* Re-ranked: the re-ranker's calibrated pair score (:meth:`~.rerank.Reranker.pair_score`).

This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.scoring import unit
from .cohort import cohort_of
from .model import HUBNESS_KEY, Model

if TYPE_CHECKING:
    from .rerank import Reranker

__all__ = ["Verdict", "plain_verdict", "reranked_verdict"]


@dataclass(frozen=True)
class Verdict:
    """``score`` is the pair's cosine; ``verdict_score`` what ``threshold`` applies to;
    ``calibration`` how that threshold was measured (None: the caller's fallback)."""

    score: float
    verdict_score: float
    threshold: float
    calibration: dict[str, Any] | None
    rerank_score: float | None = None

    @property
    def same(self) -> bool:
        return self.verdict_score >= self.threshold

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None


def plain_verdict(model: Model, a: np.ndarray, b: np.ndarray, fallback_threshold: float
                  ) -> Verdict:
    """The verdict on two embeddings of ``model``."""
    a, b = unit(np.asarray(a, np.float32)), unit(np.asarray(b, np.float32))
    score, calibration = float(np.clip(a @ b, -1.0, 1.0)), model.calibration
    if calibration is None:
        return Verdict(score, score, fallback_threshold, None)
    entry = calibration.get(HUBNESS_KEY)
    if entry is None:
        return Verdict(score, score, float(calibration["threshold"]), calibration)
    corrected = cohort_of(model, len(a)).corrected(score, a, b, entry["k"])
    return Verdict(score, corrected, float(entry["threshold"]), entry)


def reranked_verdict(reranker: Reranker, a: np.ndarray, b: np.ndarray) -> Verdict:
    """The verdict on two descriptions (:meth:`~.rerank.Reranker.describe`), ``a`` the query."""
    pair, verification = reranker.pair_score(a, b)
    return Verdict(float(reranker.cosines(a, b[None])[0]), pair, verification.threshold,
                   verification.entry, rerank_score=pair)
