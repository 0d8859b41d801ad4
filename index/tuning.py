"""``factory="auto"``: which index a store should have at its size, and the knobs for it.

The choice follows FAISS's own guidelines (and autofaiss): an exact scan while it is cheap,
then an inverted file with about ``sqrt(N)`` lists whose codes are 8-bit scalar quantised
(a quarter of float32) or, when even those exceed the memory budget, product quantised.
Either way the shortlist is re-ranked exactly from the stored vectors, so the codes only
have to find the neighbours, not score them. HNSW is not chosen automatically: it cannot
remove in place (removals become tombstones until a rebuild) and it builds about ten times
slower than IVF on two cores; it stays available as an explicit factory (``HNSW32``).

:func:`tune` measures recall@10 against the exact scan on a sample of stored vectors (each
query leaves itself out) and picks the cheapest ``nprobe``/``efSearch`` that reaches the
target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AUTO",
    "DEFAULT_TARGET_RECALL",
    "FILTER_EXACT_MAX",
    "FILTER_INDEX_MIN_FRACTION",
    "FLAT_MAX_WORK",
    "TuneReport",
    "choose_factory",
    "knob_grid",
    "recall_at_k",
    "tune",
]

AUTO = "auto"
DEFAULT_TARGET_RECALL = 0.95
#: An exact scan reads ``count * dim`` floats per query; up to 2**24 (65k x 256) that is a
#: few milliseconds on one core, which is "fast enough" to stay exact.
FLAT_MAX_WORK = 1 << 24
#: Memory the codes of an automatically chosen index may take (SQ8 is ``dim`` bytes a vector).
DEFAULT_MEMORY_BUDGET = 8 << 30
RERANK_FACTOR = 4
#: A filtered search scans exactly the vectors its filter selects when they are at most
#: ``FILTER_EXACT_MAX`` or less than ``FILTER_INDEX_MIN_FRACTION`` of the store; otherwise the
#: index searches with an id selector and ``nprobe``/``efSearch`` grown by 1 / fraction (and
#: the exact scan still runs when that finds fewer than ``k``). Measured by
#: ``benchmarks/filters.py`` at 100k (RESULTS.md, issue 13): the exact scan costs about its
#: share of a full scan and always has recall 1; the selector path is flat in time but its
#: recall@10 fell to 0.76-0.91 at 2-10% selectivity and was 0.998 at 20%.
FILTER_EXACT_MAX = 20_000
FILTER_INDEX_MIN_FRACTION = 0.2


def choose_factory(count: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """The FAISS factory string ``auto`` serves ``count`` vectors of ``dim`` with."""
    if count * dim <= FLAT_MAX_WORK:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(count)))
    nlist = min(65536, max(64, nlist))
    if count * dim <= memory_budget:
        return f"IVF{nlist},SQ8"
    sub = next(m for m in (dim // 4, dim // 8, dim // 16, 1) if m and dim % m == 0)
    return f"IVF{nlist},PQ{sub}"


def knob_grid(family: str, nlist: int = 0) -> list[dict[str, int]]:
    """Knob settings to try, cheapest first."""
    if family == "ivf":
        return [{"nprobe": 2**i} for i in range(int(math.log2(max(1, nlist))) + 1)]
    if family == "hnsw":
        return [{"efSearch": e} for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)]
    return [{}]


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's true top-``k`` ids found in its top-``k``."""
    hits = [
        len(set(f[:k][f[:k] >= 0].tolist()) & set(t[:k][t[:k] >= 0].tolist()))
        / max(1, int((t[:k] >= 0).sum()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


@dataclass
class TuneReport:
    """What :func:`tune` measured: every setting tried and the one chosen."""

    factory: str
    target_recall: float
    sample: int
    chosen: dict[str, int]
    recall: float
    reached: bool
    tried: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tune(
    factory: str,
    grid: list[dict[str, int]],
    search: Callable[[np.ndarray, int, dict[str, int]], np.ndarray],
    truth: np.ndarray,
    queries: np.ndarray,
    self_ids: np.ndarray,
    target_recall: float = DEFAULT_TARGET_RECALL,
    k: int = 10,
) -> TuneReport:
    """First knobs in ``grid`` (cheapest first) whose re-ranked top-``k`` reaches
    ``target_recall`` against ``truth``; the last ones tried when none does.

    ``search(queries, k + 1, knobs)`` returns re-ranked ids ``(Q, k + 1)``; ``truth`` the exact
    ones. Each query is a stored vector and ``self_ids`` its id, left out of both.
    """
    truth = _leave_out(truth, self_ids, k)
    tried: list[dict[str, Any]] = []
    best: tuple[dict[str, int], float] = ({}, 0.0)
    for knobs in grid:
        started = time.perf_counter()
        found = _leave_out(search(queries, k + 1, knobs), self_ids, k)
        elapsed = time.perf_counter() - started
        recall = recall_at_k(found, truth, k)
        tried.append({"params": knobs, "recall": recall, "ms_per_query":
                      1e3 * elapsed / max(1, len(queries))})
        best = (knobs, recall)
        if recall >= target_recall:
            break
    return TuneReport(factory, target_recall, len(queries), best[0], best[1],
                      best[1] >= target_recall, tried)


def _leave_out(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    rows = []
    for row, own in zip(ids, self_ids, strict=True):
        kept = row[row != own][:k]
        rows.append(np.pad(kept, (0, k - len(kept)), constant_values=-1))
    return np.array(rows, dtype=np.int64).reshape(len(ids), k)
