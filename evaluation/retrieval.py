"""Retrieval over a whole index: precision@K, recall@K and MAP@K.

Unlike a candidate set, the query competes with every indexed image, so these numbers fall as
the index grows: report the index size with them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

import numpy as np

from ..index.store import IndexStore
from .errors import EvaluationError

__all__ = ["retrieval_metrics", "index_retrieval_metrics"]


def retrieval_metrics(
    retrieved: Sequence[Sequence[str]],
    relevant: Sequence[Collection[str]],
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """``precision@k``, ``recall@k`` and ``map@k`` averaged over queries.

    ``retrieved[q]`` is the ranked result list of query ``q``; ``relevant[q]`` the keys that
    count as hits. AP@k = sum over hit positions i <= k of precision@i, divided by
    min(k, number of relevant keys), so a perfect ranking scores 1 whatever k is.
    """
    ks = sorted(set(ks))
    if len(retrieved) != len(relevant) or not retrieved:
        raise EvaluationError(
            f"need one relevant set per query, got {len(retrieved)} result lists and "
            f"{len(relevant)} relevant sets"
        )
    if any(not truth for truth in relevant):
        raise EvaluationError("every query needs at least one relevant key")
    depth = max(ks)
    hits = np.zeros((len(retrieved), depth))
    for q, (results, truth) in enumerate(zip(retrieved, relevant, strict=True)):
        row = [key in truth for key in list(results)[:depth]]
        hits[q, : len(row)] = row
    n_relevant = np.array([len(truth) for truth in relevant], dtype=np.float64)
    cumulative = np.cumsum(hits, axis=1)
    precision_at_i = cumulative / np.arange(1, depth + 1)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"precision@{k}"] = float((cumulative[:, k - 1] / k).mean())
        metrics[f"recall@{k}"] = float((cumulative[:, k - 1] / n_relevant).mean())
        average_precision = (precision_at_i[:, :k] * hits[:, :k]).sum(axis=1)
        metrics[f"map@{k}"] = float((average_precision / np.minimum(n_relevant, k)).mean())
    metrics["n"] = len(retrieved)
    return metrics


def index_retrieval_metrics(
    store: IndexStore,
    queries: np.ndarray,
    relevant: Sequence[Collection[str]],
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Search ``store`` with each query vector ``(Q, D)`` and score the results."""
    ks = sorted(set(ks))
    results = store.search(queries, max(ks))
    metrics = retrieval_metrics([[m.key for m in row] for row in results], relevant, ks)
    metrics["index_size"] = len(store)
    return metrics
