"""Scoring candidate sets: cosine per candidate, and the optional one-to-one assignment.

Each query is scored against its own candidates only: score = cosine of the two L2-normalised
embeddings, in [-1, 1], higher is closer.

``assign`` is a *transductive* mode for closed sets. It assumes every candidate is the true
match of at most one query in the batch (as in "Totally Looks Like", where the foils of one
query are the answers of others), so it picks one candidate per query such that no candidate
is picked twice and the sum of the picked cosines is largest (the Hungarian method,
``scipy.optimize.linear_sum_assignment``). When that assumption is false - candidates that may
match several queries, or a batch that is a small sample of a larger set - it can hurt.
It also makes each query's result depend on the other queries in the batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from ..index.store import normalize_rows
from .errors import EvaluationError

__all__ = [
    "ASSIGN_BOOST",
    "MAX_ASSIGN_CELLS",
    "cosine_scores",
    "ranked_order",
    "assign",
    "boost_assigned",
    "AssignmentUnavailableError",
]

ASSIGN_BOOST = 2.0
"""Added to each assigned candidate's cosine: it then sorts first (cosines lie in [-1, 1]) and
its cosine is still readable as ``score - 2``."""

MAX_ASSIGN_CELLS = 100_000_000
"""Largest queries x distinct candidates matrix ``assign`` builds (800 MB of float64)."""

_FORBIDDEN = -1e6
"""Cost of pairing a query with a candidate outside its list: far below any sum of cosines, so
the solver only uses such a cell when a query cannot get any of its own candidates."""


class AssignmentUnavailableError(EvaluationError):
    """scipy is not installed (e.g. a slim serving image), so ``assign`` cannot run."""


def cosine_scores(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """``(D,)`` query and ``(C, D)`` candidates -> ``(C,)`` cosines, clamped to [-1, 1]."""
    scores = normalize_rows(candidates) @ normalize_rows(query)[0]
    return np.clip(scores, -1.0, 1.0)


def ranked_order(scores: np.ndarray) -> np.ndarray:
    """Positions sorted by descending score; ties keep the input order."""
    return np.argsort(-np.asarray(scores), kind="stable")


def assign(candidates: Sequence[Sequence[Hashable]], scores: Sequence[np.ndarray]) -> list[int]:
    """One candidate per query, no candidate twice, largest total cosine.

    ``candidates[q]`` names query ``q``'s candidates (any hashable identity shared across
    queries); ``scores[q]`` are their cosines. Returns, per query, the position of its assigned
    candidate in its own list, or -1 where every one of its candidates went to other queries.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # scipy is imported here so that plain ranking never needs it
        raise AssignmentUnavailableError(
            "one-to-one assignment needs scipy, which is not installed here: pip install scipy"
        ) from exc
    columns: dict[Hashable, int] = {}
    for row in candidates:
        for name in row:
            columns.setdefault(name, len(columns))
    cells = len(candidates) * len(columns)
    if cells > MAX_ASSIGN_CELLS:
        raise EvaluationError(
            f"assignment over {len(candidates):,} queries x {len(columns):,} candidates is too "
            f"large ({cells:,} cells; the limit is {MAX_ASSIGN_CELLS:,}): split the batch"
        )
    weights = np.full((len(candidates), len(columns)), _FORBIDDEN)
    for q, (row, row_scores) in enumerate(zip(candidates, scores, strict=True)):
        weights[q, [columns[name] for name in row]] = row_scores
    rows, cols = linear_sum_assignment(weights, maximize=True)
    chosen = [-1] * len(candidates)
    position = [{columns[name]: i for i, name in enumerate(row)} for row in candidates]
    for q, c in zip(rows, cols, strict=True):
        chosen[q] = position[q].get(c, -1)
    return chosen


def boost_assigned(scores: Sequence[np.ndarray], chosen: Sequence[int]) -> list[np.ndarray]:
    """Scores with each assigned candidate raised by :data:`ASSIGN_BOOST`, others unchanged."""
    boosted = []
    for row_scores, position in zip(scores, chosen, strict=True):
        row = np.array(row_scores, dtype=np.float64)
        if position >= 0:
            row[position] += ASSIGN_BOOST
        boosted.append(row)
    return boosted
