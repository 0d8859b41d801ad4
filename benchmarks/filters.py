"""Filtered search latency: ``IndexStore.search`` with a metadata filter at 1%, 10% and 100%
selectivity against the same store's unfiltered search, in one run.

Store search (no HTTP): what the filter adds is the store's work; ``/match`` adds the same
decode/embed/HTTP cost to filtered and unfiltered requests. Data: clustered synthetic 256-d
unit vectors (``benchmarks/index.py``'s generator) with metadata ``{"bucket": i % 100,
"album": ...}``, so ``bucket == 0`` selects 1%, ``bucket < 10`` 10%, ``bucket < 100`` all.

For each store type (``auto``, which serves IVF-SQ8 at 100k, and exact ``Flat``) and
selectivity it prints p50/p99 of single-query searches with a **cold** filter (a new filter
each query: SQLite selects the ids) and a **warm** one (the same filter again: the ids come
from the store's cache), recall@10 against brute force over the filtered set, and the ratio
to unfiltered p50. ``--crossover`` also times the two filtered paths (exact scan of the
selected vectors vs the index with an id selector) at several selectivities, which is what
``FILTER_EXACT_MAX`` and ``FILTER_INDEX_MIN_FRACTION`` in ``index/tuning.py`` are set from.

    python benchmarks/filters.py                       # 100k items, ~3 min on 2 cores
    python benchmarks/filters.py --size 20000 --queries 50
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import clustered  # noqa: E402  (benchmarks/index.py: the same synthetic data)
from lookalike.core.machine import cpu_description  # noqa: E402
from lookalike.index import store as store_module  # noqa: E402
from lookalike.index.filters import Filter  # noqa: E402
from lookalike.index.store import IndexStore  # noqa: E402

ALBUMS = ["holiday", "work", "family", "pets", "travel"]


def cpu_line() -> str:
    return f"CPU: {cpu_description()}"


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def build(path: Path, base: np.ndarray, factory: str) -> IndexStore:
    store = IndexStore.create(path, dim=base.shape[1], model_fingerprint="bench",
                              factory=factory, background=False)
    for start in range(0, len(base), 10_000):
        chunk = base[start : start + 10_000]
        ids = range(start, start + len(chunk))
        store.add([f"v{i}" for i in ids], chunk,
                  metadata=[{"bucket": i % 100, "album": ALBUMS[i % 7 % 5]} for i in ids])
    store.save()
    return store


def truth(base: np.ndarray, query: np.ndarray, buckets: int, k: int = 10) -> set[str]:
    rows = np.flatnonzero(np.arange(len(base)) % 100 < buckets)
    scores = base[rows] @ query
    return {f"v{rows[i]}" for i in np.argsort(-scores)[:k]}


CPU_MS: list[float] = []  # this thread's CPU time of each search timed last


def timed(store: IndexStore, queries: np.ndarray, where, cold: bool) -> tuple[list[float], list]:
    """Wall latencies (ms) and results; ``cold`` clears the filter cache before every query.
    The searches' CPU times go to ``CPU_MS``: on a machine other jobs load, the wall time
    includes waiting for a core, the CPU time (FAISS runs one thread here) does not."""
    times, results = [], []
    CPU_MS.clear()
    for query in queries:
        if cold:
            store._filter_cache.clear()
        c, t = time.thread_time(), time.perf_counter()
        (found,) = store.search(query[None], 10, where=where)
        times.append(1e3 * (time.perf_counter() - t))
        CPU_MS.append(1e3 * (time.thread_time() - c))
        results.append(found)
    return times, results


def measure(store: IndexStore, base: np.ndarray, queries: np.ndarray, label: str) -> None:
    store.search(queries[:3], 10)
    plain, _ = timed(store, queries, None, cold=False)
    plain_p50, plain_cpu = float(np.percentile(plain, 50)), float(np.median(CPU_MS))
    print(f"\n{label}: serving {store.manifest['index']['factory']} "
          f"{store.manifest['index'].get('params') or ''}; {load()}")
    print("| filter | selected | cold p50 / p99 ms (CPU p50) | warm p50 / p99 ms (CPU p50) "
          "| warm x unfiltered, wall (CPU) | recall@10 |")
    print("|---|---|---|---|---|---|")
    print(f"| none | 100% | - | {plain_p50:.2f} / {np.percentile(plain, 99):.2f} "
          f"({plain_cpu:.2f}) | 1.00 | - |")
    for buckets, name in ((1, "1%"), (10, "10%"), (100, "100%")):
        where = Filter.parse({"bucket": {"lt": buckets}})
        cold, _ = timed(store, queries[: max(5, len(queries) // 4)], where, cold=True)
        cold_cpu = float(np.median(CPU_MS))
        warm, results = timed(store, queries, where, cold=False)
        warm_cpu = float(np.median(CPU_MS))
        recall = np.mean([len({m.key for m in r} & truth(base, q, buckets)) / 10
                          for r, q in zip(results, queries, strict=True)])
        print(f"| bucket < {buckets} | {name} | {np.percentile(cold, 50):.2f} / "
              f"{np.percentile(cold, 99):.2f} ({cold_cpu:.2f}) | {np.percentile(warm, 50):.2f} / "
              f"{np.percentile(warm, 99):.2f} ({warm_cpu:.2f}) "
              f"| {np.percentile(warm, 50) / plain_p50:.2f} ({warm_cpu / plain_cpu:.2f}) "
              f"| {recall:.3f} |")


def crossover(store: IndexStore, base: np.ndarray, queries: np.ndarray) -> None:
    """Warm p50 of each filtered path at several selectivities (same store, same queries)."""
    print(f"\ncrossover on {store.manifest['index']['factory']} ({len(store):,} items): warm "
          f"p50 wall ms / CPU ms and recall@10 of each path; {load()}")
    print("| selected | ids | exact scan of the selected | index (or full scan) + id selector |")
    print("|---|---|---|---|")
    for buckets in (1, 2, 5, 10, 20, 50):
        where = Filter.parse({"bucket": {"lt": buckets}})
        cells = []
        for limit in (10**12, 0):  # exact path, then selector path
            store_module.FILTER_EXACT_MAX = limit
            store_module.FILTER_INDEX_MIN_FRACTION = 0.0
            times, results = timed(store, queries, where, cold=False)
            recall = np.mean([len({m.key for m in r} & truth(base, q, buckets)) / 10
                              for r, q in zip(results, queries, strict=True)])
            cells.append(f"{np.percentile(times, 50):.2f} / {np.median(CPU_MS):.2f} "
                         f"({recall:.3f})")
        selected = len(store._selected(where, store._view))
        print(f"| {buckets}% | {selected:,} | {cells[0]} | {cells[1]} |")
    store_module.FILTER_EXACT_MAX = DEFAULT_EXACT_MAX
    store_module.FILTER_INDEX_MIN_FRACTION = DEFAULT_MIN_FRACTION


DEFAULT_EXACT_MAX = store_module.FILTER_EXACT_MAX
DEFAULT_MIN_FRACTION = store_module.FILTER_INDEX_MIN_FRACTION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads")
    parser.add_argument("--types", default="auto,Flat")
    parser.add_argument("--crossover", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    sys.setswitchinterval(1e-3)
    print(f"{cpu_line()}; faiss {faiss.__version__}, {args.threads} FAISS thread(s); {load()}")
    base = clustered(args.size, 256, 1)
    queries = clustered(args.queries, 256, 2)
    with tempfile.TemporaryDirectory(prefix="bench-filters-") as work:
        for factory in args.types.split(","):
            started = time.perf_counter()
            store = build(Path(work) / factory, base, factory)
            print(f"\nbuilt {factory} over {len(store):,} items in "
                  f"{time.perf_counter() - started:.1f} s")
            measure(store, base, queries, f"{factory}, {args.size:,} items")
            if args.crossover:
                crossover(store, base, queries)
            store.close()
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
