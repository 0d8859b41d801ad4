"""Exact inner-product search straight over the memory-mapped vector file.

This is the ``Flat`` index of a store: there is no second copy of the vectors in a FAISS
index, the scan reads the mapping in blocks (``faiss.knn``, BLAS for batches) and skips ids
that are not live. It is also what re-ranks an approximate index's shortlist, what searches
the rows added since the serving index last merged, and the ground truth recall is measured
against.
"""

from __future__ import annotations

import faiss
import numpy as np

from .liveness import AliveBitmap
from .vectors import VectorFile

__all__ = ["BLOCK_ROWS", "exact_search", "exact_search_ids", "merge_top", "rescore"]

#: Rows scanned per ``faiss.knn`` call: large enough for BLAS, small enough to stay in cache
#: for float16 conversion.
BLOCK_ROWS = 1 << 16


def merge_top(
    scores: list[np.ndarray], ids: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row of several ``(Q, m_i)`` score/id arrays (``-1`` ids are empty)."""
    all_scores = np.concatenate(scores, axis=1)
    all_ids = np.concatenate(ids, axis=1)
    all_scores = np.where(all_ids < 0, -np.inf, all_scores)
    if all_scores.shape[1] > k:
        part = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        all_scores = np.take_along_axis(all_scores, part, 1)
        all_ids = np.take_along_axis(all_ids, part, 1)
    order = np.argsort(-all_scores, axis=1, kind="stable")
    top_scores = np.take_along_axis(all_scores, order, 1)
    top_ids = np.take_along_axis(all_ids, order, 1)
    top_ids[~np.isfinite(top_scores)] = -1
    return top_scores, top_ids


def exact_search(
    vectors: VectorFile,
    alive: AliveBitmap,
    queries: np.ndarray,
    k: int,
    start: int,
    end: int,
    array: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` live ids in ``start..end`` for ``queries (Q, dim)``: scores, ids."""
    nq = len(queries)
    found_scores = [np.full((nq, 0), -np.inf, np.float32)]
    found_ids = [np.full((nq, 0), -1, np.int64)]
    for block_start in range(start, end, BLOCK_ROWS):
        block_end = min(end, block_start + BLOCK_ROWS)
        live = alive.range(block_start, block_end)
        live_count = int(live.sum())
        if not live_count:
            continue
        block = vectors.rows(block_start, block_end, array)
        row_ids = None
        if live_count * 2 < len(live):  # mostly removed: copy the live rows, scan fewer
            row_ids = block_start + np.flatnonzero(live)
            block = block[live]
        fetch = min(len(block), k + (0 if row_ids is not None else len(live) - live_count))
        scores, rows = faiss.knn(
            queries, np.ascontiguousarray(block), fetch, metric=faiss.METRIC_INNER_PRODUCT
        )
        ids = row_ids[rows] if row_ids is not None else block_start + rows
        if row_ids is None and live_count < len(live):
            ids = np.where(live[rows], ids, -1)
        found_scores.append(scores)
        found_ids.append(ids)
    return merge_top(found_scores, found_ids, k)


def exact_search_ids(
    vectors: VectorFile,
    queries: np.ndarray,
    ids: np.ndarray,
    k: int,
    array: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` among the given ``ids`` (a filter's selection): only their rows are
    read, so a selective filter costs what it selects, not what the store holds."""
    source = vectors.array if array is None else array
    nq = len(queries)
    found_scores = [np.full((nq, 0), -np.inf, np.float32)]
    found_ids = [np.full((nq, 0), -1, np.int64)]
    for block_start in range(0, len(ids), BLOCK_ROWS):
        chunk = np.asarray(ids[block_start : block_start + BLOCK_ROWS], np.int64)
        rows = np.ascontiguousarray(source[chunk], dtype=np.float32)
        scores, positions = faiss.knn(
            queries, rows, min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT
        )
        found_scores.append(scores)
        found_ids.append(np.where(positions >= 0, chunk[positions], -1))
    return merge_top(found_scores, found_ids, k)


def rescore(
    vectors: VectorFile, queries: np.ndarray, ids: np.ndarray, array: np.ndarray | None = None
) -> np.ndarray:
    """Exact cosine of each query with each of its candidate ``ids (Q, m)``; -inf for -1."""
    safe = np.where(ids < 0, 0, ids)
    source = vectors.array if array is None else array
    rows = np.asarray(source[safe.ravel()], dtype=np.float32).reshape(*ids.shape, vectors.dim)
    scores = np.einsum("qmd,qd->qm", rows, queries)
    return np.where(ids < 0, -np.inf, scores)
