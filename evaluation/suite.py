"""``lookalike evaluate``: every metric and figure for one model on one set of labelled pairs.

Each image is embedded once; candidate-set ranking, retrieval, verification, the two-of-three
test and the figures all reuse those vectors. The output folder holds ``metrics.json``, the
PNGs and ``report.md``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.pairs import Pair, make_candidate_sets
from ..core.scoring import answer_ranks, candidate_metrics
from ..index.store import IndexStore
from ..models.embedder import Embedder
from . import plots
from .challenge import Challenge, answers_from_pairs
from .errors import EvaluationError
from .images import ImageFolder, embed_unique
from .ranking import assign, boost_assigned, cosine_scores, ranked_order
from .report import write_report
from .retrieval import index_retrieval_metrics
from .triplets import make_triplets, two_of_three
from .verification import Calibration, calibrate, pair_scores, verification_metrics

__all__ = ["EvaluationOptions", "EvaluationResult", "run_evaluation"]


@dataclass(frozen=True)
class EvaluationOptions:
    foils: int = 19
    seed: int = 0
    far: float = 0.01
    ks: tuple[int, ...] = (1, 5, 10)
    grid_queries: int = 6
    map_pairs: int = 300
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        """Fail before the slow embedding, not after it."""
        if not 0.0 < self.far < 1.0:
            raise EvaluationError(f"the target false-match rate must be in (0, 1), got {self.far}")
        if self.foils < 1 or not self.ks or min(self.ks) < 1:
            raise EvaluationError("foils and every k must be at least 1")


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    calibration: Calibration
    report: Path


def _candidate_sets(
    pairs: Sequence[Pair], challenge: Challenge | None, options: EvaluationOptions
) -> tuple[list[str], list[tuple[str, ...]], list[int]]:
    if challenge is None:
        sets = make_candidate_sets(pairs, options.foils, options.seed)
        return [s.query for s in sets], [s.candidates for s in sets], [s.answer for s in sets]
    return list(challenge.queries), list(challenge.candidates), answers_from_pairs(challenge, pairs)


def run_evaluation(
    pairs: Sequence[Pair],
    left: ImageFolder,
    right: ImageFolder,
    embedder: Embedder,
    out_dir: Path,
    *,
    challenge: Challenge | None = None,
    options: EvaluationOptions = EvaluationOptions(),
    data: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Score ``pairs`` (left image -> right image) and write the report into ``out_dir``."""
    if len(pairs) < 2:
        raise EvaluationError(f"evaluation needs at least 2 pairs, got {len(pairs)}")
    started = time.perf_counter()
    queries, candidates, answers = _candidate_sets(pairs, challenge, options)
    left_paths = left.paths([*(query for query, _ in pairs), *queries])
    right_paths = right.paths([*(r for _, r in pairs), *(k for row in candidates for k in row)])
    vectors = embed_unique(
        embedder,
        [*left_paths.values(), *right_paths.values()],
        batch_size=options.batch_size,
        progress=options.progress,
    )
    embed_s = time.perf_counter() - started

    def left_vec(key: str) -> np.ndarray:
        return vectors[left_paths[key]]

    def right_vecs(keys: Sequence[str]) -> np.ndarray:
        return np.stack([vectors[right_paths[key]] for key in keys])

    lefts = np.stack([left_vec(query) for query, _ in pairs])
    rights = right_vecs([r for _, r in pairs])

    scores = [
        cosine_scores(left_vec(q), right_vecs(row))
        for q, row in zip(queries, candidates, strict=True)
    ]
    assigned = boost_assigned(scores, assign(candidates, scores))
    data = dict(data or {}, pairs=len(pairs))
    metrics: dict[str, Any] = {
        "model": {
            "name": embedder.bundle.name,
            "fingerprint": embedder.fingerprint,
            "engine": embedder.engine_name,
        },
        "data": data,
        "candidates": dict(
            candidate_metrics(answer_ranks(scores, answers)), candidates=len(candidates[0])
        ),
        "candidates_assign": candidate_metrics(answer_ranks(assigned, answers)),
    }

    gallery = sorted({r for _, r in pairs})
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        store = IndexStore.create(
            Path(tmp) / "gallery", dim=embedder.dim, model_fingerprint=embedder.fingerprint
        )
        try:
            store.add(gallery, right_vecs(gallery))
            metrics["retrieval"] = index_retrieval_metrics(
                store, lefts, [{r} for _, r in pairs], options.ks
            )
        finally:
            store.close()

    positive, negative = pair_scores(lefts, rights)
    metrics["verification"] = verification_metrics(positive, negative)
    calibration = calibrate(positive, negative, options.far, embedder.bundle, data)
    metrics["calibration"] = {
        key: value
        for key, value in calibration.to_dict().items()
        if key not in ("measured_on", "model_fingerprint")
    }
    metrics["two_of_three"] = two_of_three(lefts, rights, make_triplets(len(pairs), options.seed))

    out_dir.mkdir(parents=True, exist_ok=True)
    grid = [
        plots.GridRow(
            left_paths[query],
            [
                (right_paths[row[i]], float(row_scores[i]), i == answer)
                for i in ranked_order(row_scores)[:5]
            ],
        )
        for query, row, row_scores, answer in list(
            zip(queries, candidates, scores, answers, strict=True)
        )[: options.grid_queries]
    ]
    figures = {
        "roc": plots.roc_plot(
            positive,
            negative,
            out_dir / "roc.png",
            metrics["verification"]["auc"],
            (calibration.far, calibration.tpr),
        ),
        "precision_recall": plots.precision_recall_plot(
            positive,
            negative,
            out_dir / "precision_recall.png",
            metrics["verification"]["average_precision"],
        ),
        "score_histogram": plots.score_histogram(
            positive, negative, out_dir / "score_histogram.png", calibration.threshold
        ),
        "embedding_map": plots.embedding_map(
            lefts, rights, out_dir / "embedding_map.png", options.seed, options.map_pairs
        ),
        "top_matches": plots.top_matches_grid(grid, out_dir / "top_matches.png"),
    }
    metrics["figures"] = {name: path.name for name, path in figures.items()}
    metrics["timing"] = {
        "images": len(vectors),
        "embed_s": round(embed_s, 2),
        "total_s": round(time.perf_counter() - started, 2),
    }
    return EvaluationResult(metrics, calibration, write_report(out_dir, metrics))
