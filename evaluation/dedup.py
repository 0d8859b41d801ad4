"""Measure near-duplicate detection on a planted set, and choose its method and threshold by
cross-validation over disjoint groups of originals.

Why cross-validation: the threshold that looks best on the images it was tuned on is an
optimistic estimate; the figures must predict images never seen. Items are split into ``folds``
by group (an original, its copies and its TLL partner stay together); on each fold the method's
threshold (and, for the keypoint method, the weight of the cosine blended into its score) is
chosen on the other folds (best F1 of duplicate pairs) and measured on this one as a dedup of
that fold's items alone. The mean and standard error over folds are reported; the
shipped threshold is the one chosen on all groups.

Pairs are counted after grouping: a group of n items claims all n(n-1)/2 pairs, which is what a
person reviewing the groups sees.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write
from ..index.dedup import (
    DedupParams,
    candidate_pairs,
    duplicate_score,
    group_pairs,
    judge_pairs,
)
from ..index.store import IndexStore
from .dedup_set import DedupSet

__all__ = [
    "METHODS", "PairScores", "collect_scores", "cross_validate", "evaluate_dedup",
    "pair_metrics",
]

METHODS = ("cosine", "keypoints")
"""``cosine``: the embedding alone; ``keypoints``: embedding candidates judged by matching the
thumbnails' SIFT keypoints, blended with the cosine (what
:func:`~lookalike.index.dedup.find_duplicate_groups` ships)."""

GRID = np.round(np.arange(0.10, 0.99, 0.01), 2)
COSINE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)
"""Weights of the cosine in the keypoint method's score, chosen with the threshold. 0 is the
keypoint share alone; the measured curve falls off past 2 (look-alikes creep in)."""


@dataclass(frozen=True)
class PairScores:
    """Every candidate pair of a store with both signals: positions into ``keys``."""

    keys: list[str]
    first: np.ndarray
    second: np.ndarray
    cosine: np.ndarray
    keypoint: np.ndarray

    def score(self, method: str, cosine_weight: float = 0.0) -> np.ndarray:
        if method == "cosine":
            return self.cosine
        return duplicate_score(self.keypoint, self.cosine, cosine_weight)


def collect_scores(store: IndexStore, floor: float, k: int = 10) -> PairScores:
    """Candidate pairs at cosine ``floor`` with their keypoint similarity (judged at -1, so that
    every candidate comes back with its score)."""
    keys = store.keys()
    first, second, cosines = candidate_pairs(store, keys, floor, k)
    loose = DedupParams(threshold=-1.0, candidate_cosine=floor, cosine_only_threshold=-1.0, k=k)
    judged = judge_pairs(store, keys, first, second, cosines, loose)
    return PairScores(keys, np.array([i for i, _, _, _ in judged], np.int64),
                      np.array([j for _, j, _, _ in judged], np.int64),
                      np.array([c for _, _, _, c in judged], np.float32),
                      np.array([s for _, _, s, _ in judged], np.float32))


def pair_metrics(predicted: set[tuple[str, str]], truth: set[tuple[str, str]]) -> dict[str, float]:
    """Precision, recall and F1 of duplicate pairs (precision 1 when nothing is claimed)."""
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    recall = hits / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "claimed": len(predicted), "true": len(truth)}


def grouped_pairs(scores: PairScores, method: str, threshold: float,
                  allowed: set[str] | None = None, cosine_weight: float = 0.0
                  ) -> set[tuple[str, str]]:
    """The pairs a dedup at ``threshold`` claims (all pairs within each group), among the
    items in ``allowed`` only (a fold) when given."""
    values = scores.score(method, cosine_weight)
    accepted = [
        (i, j, float(s), float(c)) for i, j, s, c in zip(
            scores.first.tolist(), scores.second.tolist(), values, scores.cosine, strict=True)
        if s >= threshold and (allowed is None or (scores.keys[i] in allowed
                                                   and scores.keys[j] in allowed))
    ]
    claimed = set()
    for group in group_pairs(scores.keys, accepted):
        members = sorted(group.keys)
        claimed.update((a, b) for n, a in enumerate(members) for b in members[n + 1:])
    return claimed


def curve(scores: PairScores, truth: set[tuple[str, str]], method: str,
          allowed: set[str] | None = None, cosine_weight: float = 0.0
          ) -> list[dict[str, float]]:
    """Precision/recall/F1 at every threshold of the grid."""
    return [{"threshold": float(t), **pair_metrics(
        grouped_pairs(scores, method, t, allowed, cosine_weight), truth)} for t in GRID]


def best_threshold(points: Sequence[dict[str, float]]) -> float:
    """The threshold of best F1 (the middle one of a plateau, so that it is not on an edge)."""
    top = max(p["f1"] for p in points)
    plateau = [p["threshold"] for p in points if p["f1"] >= top - 1e-9]
    return float(plateau[len(plateau) // 2])


def best_setting(scores: PairScores, truth: set[tuple[str, str]], method: str,
                 allowed: set[str] | None = None) -> tuple[float, float, list[dict[str, float]]]:
    """``(cosine_weight, threshold, curve)`` of best F1 on ``allowed``: the threshold alone for
    ``cosine``, the weight and the threshold together for ``keypoints``."""
    best: tuple[float, float, float, list[dict[str, float]]] | None = None
    for weight in (0.0,) if method == "cosine" else COSINE_WEIGHTS:
        points = curve(scores, truth, method, allowed, weight)
        top = max(p["f1"] for p in points)
        if best is None or top > best[0] + 1e-9:
            best = (top, weight, best_threshold(points), points)
    assert best is not None
    return best[1], best[2], best[3]


def _folds(data: DedupSet, keys: Sequence[str], folds: int, seed: int) -> list[set[str]]:
    groups = sorted({data.groups[key] for key in keys})
    random.Random(seed).shuffle(groups)
    fold_of = {group: n % folds for n, group in enumerate(groups)}
    members: list[set[str]] = [set() for _ in range(folds)]
    for key in keys:
        members[fold_of[data.groups[key]]].add(key)
    return members


def _truth_within(data: DedupSet, allowed: set[str]) -> set[tuple[str, str]]:
    return {pair for pair in data.duplicates if pair[0] in allowed and pair[1] in allowed}


def _mean_se(values: Sequence[float]) -> dict[str, float]:
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": mean, "se": se}


def cross_validate(scores: PairScores, data: DedupSet, folds: int = 5, seed: int = 0
                   ) -> dict[str, Any]:
    """Per method: the threshold chosen on the other folds and precision/recall/F1 on each
    held-out fold (mean and standard error), and the threshold chosen on everything."""
    parts = _folds(data, scores.keys, folds, seed)
    everything = set(scores.keys)
    report: dict[str, Any] = {"folds": folds, "seed": seed, "methods": {}}
    for method in METHODS:
        per_fold = []
        for held_out in parts:
            train = everything - held_out
            weight, chosen, _ = best_setting(scores, _truth_within(data, train), method, train)
            found = pair_metrics(grouped_pairs(scores, method, chosen, held_out, weight),
                                 _truth_within(data, held_out))
            per_fold.append({"threshold": chosen, "cosine_weight": weight, **found})
        weight, chosen, full = best_setting(scores, set(data.duplicates), method)
        report["methods"][method] = {
            "folds": per_fold,
            **{name: _mean_se([f[name] for f in per_fold])
               for name in ("precision", "recall", "f1", "threshold")},
            "threshold_all": chosen,
            "cosine_weight_all": weight,
            "curve": full,
        }
    return report


def choose_params(report: dict[str, Any], floor: float, k: int) -> DedupParams:
    """The shipped parameters: the keypoint method's threshold and cosine weight chosen on all
    groups, and the cosine-only threshold for items stored without thumbnails."""
    methods = report["methods"]
    return DedupParams(threshold=methods["keypoints"]["threshold_all"], candidate_cosine=floor,
                       cosine_only_threshold=methods["cosine"]["threshold_all"], k=k,
                       cosine_weight=methods["keypoints"]["cosine_weight_all"])


def curve_plot(report: dict[str, Any], path: Path, chosen: float) -> Path:
    """Precision and recall of duplicate pairs against the threshold, per method, with the
    shipped threshold marked: where the guidance for ``--threshold`` comes from."""
    from .plots import plot_curves

    lines = {}
    for method, found in report["methods"].items():
        points = found["curve"]
        thresholds = [p["threshold"] for p in points]
        lines[f"{method} precision"] = (thresholds, [p["precision"] for p in points])
        lines[f"{method} recall"] = (thresholds, [p["recall"] for p in points])
    return plot_curves(lines, path, xlabel="threshold", ylabel="duplicate pairs",
                       title="near-duplicate groups: precision / recall", mark=chosen)


def evaluate_dedup(
    data: DedupSet, store: IndexStore, out: Path, *, floor: float = 0.3, k: int = 10,
    folds: int = 5, seed: int = 0,
) -> dict[str, Any]:
    """Cross-validate both methods on ``store`` (built from ``data.folder``), plot the curve
    and write ``dedup-metrics.json`` into ``out``; returns the report with ``params``."""
    started = time.perf_counter()
    scores = collect_scores(store, floor, k)
    report = cross_validate(scores, data, folds, seed)
    params = choose_params(report, floor, k)
    report["params"] = dataclasses.asdict(params)
    report["candidates"] = len(scores.first)
    report["items"] = len(scores.keys)
    report["duplicate_pairs"] = len(data.duplicates)
    report["seconds"] = time.perf_counter() - started
    report["plot"] = str(curve_plot(report, out / "dedup-curve.png", params.threshold))
    atomic_write(out / "dedup-metrics.json", json.dumps(report, indent=2, sort_keys=True))
    return report
