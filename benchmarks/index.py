"""IndexStore at scale: every index type and ``auto`` on the same data, in one table.

For each size and index type: build seconds (add in 10k batches + ``save``, which trains,
fills and tunes the index), open seconds, serving RSS against the size of vectors + index
on disk, recall@10 against exact search, single-query and batched QPS, one-add and
one-remove latency at N, and search p99 idle and while a 10k-item add (100 adds of 100)
and any merge it causes run. Ratios are against exact search (the ``Flat`` store, a scan
of the memory-mapped vectors) measured in the same run, or against faiss's in-RAM
``IndexFlatIP`` when the run has no ``exact`` type. Data: clustered synthetic 256-d
unit vectors (held-out queries from the same clusters) and real embeddings of the demo
images with the default model.

    python benchmarks/index.py --sizes 100000              # a quick run (~5 min on 2 cores)
    nohup python benchmarks/index.py --sizes 100000,1000000 > index-bench.log 2>&1 &
    python benchmarks/index.py --sizes demo                # real embeddings only
    python benchmarks/index.py --sizes 10000000 --types auto --vector-dtype float16  # ~30 min

Each (size, type) builds in one subprocess and serves in a fresh one, so build garbage
never counts in the serving RSS. FAISS threads are set with ``--threads`` in every worker.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from lookalike.core.machine import cpu_description

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TYPES = "exact,auto,HNSW32,IVF1024/PQ32"
HNSW_MAX = 200_000  # HNSW inserts ~14k vectors/s at 100k here, slower as it grows: bound it
IN_RAM_MAX = 2_000_000  # above this, exact search (truth, reference QPS) streams the file
CLUSTERS = 1000


def clustered(n: int, dim: int, seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """Unit vectors around ``CLUSTERS`` fixed centres (seed 0 for the centres), written into
    ``out`` when given (a memory-mapped ``.npy``, so 10M rows never sit in RAM at once)."""
    centres = np.random.default_rng(0).normal(size=(CLUSTERS, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32) if out is None else out
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = centres[rng.integers(0, CLUSTERS, m)] + 0.6 * rng.normal(
            size=(m, dim)).astype(np.float32)
        faiss.normalize_L2(block)
        out[start : start + m] = block
    return out


def demo_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """Default-model embeddings of the demo images: right images indexed, left ones queries."""
    from lookalike.demo import DEMO_IMAGES
    from lookalike.models.embedder import Embedder
    from lookalike.models.resolve import resolve_model
    from lookalike.service.settings import Settings

    settings = Settings()
    embedder = Embedder(resolve_model(settings.model, settings.cache_dir), engine=settings.engine)
    def embed(folder: str) -> np.ndarray:
        paths = sorted((DEMO_IMAGES / folder).glob("*.jpg"))
        return np.concatenate([b.vectors for b in embedder.embed_files(paths, 32)])
    return embed("right"), embed("left")


def dataset(size: str, dim: int, work: Path) -> tuple[Path, Path]:
    """Write (base, queries) for ``size`` once as .npy under ``work``; return their paths."""
    base, queries = work / f"base-{size}.npy", work / f"queries-{size}.npy"
    if not base.exists():
        if size == "demo":
            b, q = demo_embeddings()
            np.save(base, b)
        else:
            partial = base.with_suffix(".partial.npy")  # renamed when complete
            b = np.lib.format.open_memmap(partial, "w+", np.float32, (int(size), dim))
            clustered(int(size), dim, 1, out=b)
            b.flush()
            del b
            partial.rename(base)
            q = clustered(1000, dim, 2)
        np.save(queries, q)
    return base, queries


def streamed_knn(base: np.ndarray, queries: np.ndarray, k: int,
                 block: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` over a memory-mapped base, one block of rows at a time."""
    scores, ids = [], []
    for start in range(0, len(base), block):
        d, i = faiss.knn(queries, np.asarray(base[start : start + block]), k,
                         metric=faiss.METRIC_INNER_PRODUCT)
        scores.append(d)
        ids.append(i + start)
    d, i = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
    order = np.argsort(-d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def factory_of(kind: str) -> str:
    return {"exact": "Flat", "auto": "auto"}.get(kind, kind.replace("/", ","))


def build_worker(args: argparse.Namespace) -> dict:
    from lookalike.index.store import IndexStore

    base = np.load(args.base, mmap_mode="r")
    started = time.perf_counter()
    store = IndexStore.create(args.store, dim=base.shape[1], model_fingerprint="bench",
                              factory=factory_of(args.kind), background=False,
                              vector_dtype=args.vector_dtype)
    for start in range(0, len(base), 10_000):
        chunk = np.asarray(base[start : start + 10_000])
        store.add([f"v{i}" for i in range(start, start + len(chunk))], chunk)
    added = time.perf_counter() - started
    store.save()
    build = time.perf_counter() - started
    info = store.manifest["index"]
    store.close()
    return {"build_s": build, "add_all_s": added, "index": info}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def timed_searches(search, queries: np.ndarray, budget_s: float, limit: int,
                   passes: int = 3) -> list[float]:
    """Single-query latencies (s) of the least disturbed of ``passes`` passes over at most
    ``limit`` queries, each pass cut at ``budget_s`` seconds (other work shares the cores)."""
    best: list[float] = []
    for _ in range(passes):
        latencies = []
        deadline = time.perf_counter() + budget_s
        for query in queries[:limit]:
            t = time.perf_counter()
            search(query[None], 10)
            latencies.append(time.perf_counter() - t)
            if t > deadline:
                break
        if not best or np.mean(latencies) < np.mean(best):
            best = latencies
    return best


def serve_worker(args: argparse.Namespace) -> dict:
    from lookalike.index.store import MERGE_MIN_ROWS, IndexStore

    queries = np.load(args.queries)
    truth = np.load(args.truth)
    t = time.perf_counter()
    store = IndexStore.open(args.store, model_fingerprint="bench")
    open_s = time.perf_counter() - t
    n = len(store)
    # warm up, then single-query latency and QPS
    store.search(queries[:5], k=10)
    single = timed_searches(store.search, queries, args.budget, 300)
    t = time.perf_counter()
    batched_q = queries[: max(100, min(len(queries), 1000 if n <= 200_000 else 200))]
    results = []
    for start in range(0, len(batched_q), 100):
        results += store.search(batched_q[start : start + 100], k=10)
    batched_qps = len(batched_q) / (time.perf_counter() - t)
    found = np.array([[int(m.key[1:]) for m in r] + [-1] * (10 - len(r)) for r in results])
    recall = float(np.mean([len(set(f) & set(tr[:10])) / 10
                            for f, tr in zip(found, truth[: len(found)], strict=True)]))
    rss = rss_bytes()
    on_disk = sum(f.stat().st_size for f in Path(args.store).glob("index-*.faiss"))
    vectors_bytes = n * store.dim * np.dtype(store.manifest["vector_dtype"]).itemsize
    # one add / one remove at N
    rng = np.random.default_rng(7)
    extra = rng.normal(size=(40, store.dim)).astype(np.float32)
    add_ms, remove_ms = [], []
    for i in range(20):
        t = time.perf_counter()
        store.add([f"x{i}"], extra[i : i + 1])
        add_ms.append(1e3 * (time.perf_counter() - t))
    for i in range(20):
        t = time.perf_counter()
        store.remove([f"v{i * 997 % n}"])
        remove_ms.append(1e3 * (time.perf_counter() - t))
    idle = timed_searches(store.search, queries[::-1], args.budget, 300)
    # p99 while a 10k-item add (100 x 100) and its merge (in the writer for IVF) run
    big = rng.normal(size=(10_000, store.dim)).astype(np.float32)
    done = threading.Event()

    def writer() -> None:
        for start in range(0, 10_000, 100):
            store.add([f"y{i}" for i in range(start, start + 100)], big[start : start + 100])
        done.set()

    during: list[float] = []
    thread = threading.Thread(target=writer)
    started = time.perf_counter()
    thread.start()
    i = 0
    while time.perf_counter() - started < args.budget * 3:
        unmerged = store.manifest["index"].get("unmerged", 0)
        if done.is_set() and unmerged < MERGE_MIN_ROWS:  # the background merge caught up
            break
        q = queries[(len(queries) // 2 + i) % len(queries)]
        t = time.perf_counter()
        store.search(q[None], k=10)
        during.append(time.perf_counter() - t)
        i += 1
    thread.join()
    add_window = time.perf_counter() - started
    store.close()
    return {
        "n": n, "open_s": open_s, "single_qps": 1 / float(np.mean(single)),
        "single_p50_ms": 1e3 * percentile(single, 50), "batched_qps": batched_qps,
        "recall": recall, "rss": rss, "vectors_bytes": vectors_bytes, "index_bytes": on_disk,
        "add_ms": float(np.median(add_ms)), "add_max_ms": max(add_ms),
        "remove_ms": float(np.median(remove_ms)), "remove_max_ms": max(remove_ms),
        "idle_p99_ms": 1e3 * percentile(idle, 99), "during_p99_ms": 1e3 * percentile(during, 99),
        "during_searches": len(during), "add_window_s": add_window,
    }


def run_worker(mode: str, threads: int, **kw: object) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--threads", str(threads),
               "--switch-interval-ms", str(sys.getswitchinterval() * 1e3)]
    for name, value in kw.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{mode} worker failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="demo,100000,1000000",
                        help="comma-separated item counts, and/or 'demo' (real embeddings)")
    parser.add_argument("--types", default=DEFAULT_TYPES,
                        help="comma-separated: exact, auto, or FAISS factories with / for ,")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vector-dtype", choices=("float32", "float16"), default="float32",
                        help="how the stores keep their vectors (float16 halves the file; "
                        "10M x 256 is 5.1 GB instead of 10.2)")
    parser.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="seconds per latency measurement")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory")
    parser.add_argument("--hnsw-max", type=int, default=HNSW_MAX,
                        help="skip HNSW types above this many items")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--switch-interval-ms", type=float, default=1.0,
                        help="Python's thread switch interval in every worker (the service's "
                        "default, LOOKALIKE_GIL_SWITCH_INTERVAL_MS; Python's own is 5)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("kind", "base", "queries", "truth", "store"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    if args.worker:
        result = build_worker(args) if args.worker == "build" else serve_worker(args)
        print(json.dumps(result))
        return

    print(f"CPU: {cpu_description()}; faiss {faiss.__version__}, "
          f"{args.threads} FAISS threads; switch interval {args.switch_interval_ms} ms; "
          f"{args.vector_dtype} vectors; {load()}",
          flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    reference: dict[str, tuple[float, float]] = {}
    for size in args.sizes.split(","):
        base_path, query_path = dataset(size, args.dim, work)
        base = np.load(base_path, mmap_mode="r")
        queries = np.load(query_path)
        if len(base) <= IN_RAM_MAX:
            exact = faiss.IndexFlatIP(base.shape[1])
            exact.add(np.asarray(base))
            search = exact.search
        else:  # 10M float32 is 10 GB: scan the memory-mapped file in blocks instead
            search = functools.partial(streamed_knn, base)
        truth_path = work / f"truth-{size}.npy"
        np.save(truth_path, search(queries, 10)[1])
        single = timed_searches(search, queries, args.budget, 100)
        t = time.perf_counter()
        search(queries[:100], 10)
        reference[size] = (1 / float(np.mean(single)), 100 / (time.perf_counter() - t))
        search = exact = None
        for kind in args.types.split(","):
            if kind.startswith("HNSW") and len(base) > args.hnsw_max:
                print(f"  skip {kind} at {len(base)} (> --hnsw-max {args.hnsw_max})", flush=True)
                continue
            store = work / f"store-{size}-{kind.replace(',', '_').replace('/', '_')}"
            shutil.rmtree(store, ignore_errors=True)
            try:
                built = run_worker("build", args.threads, kind=kind, base=base_path, store=store,
                                   vector_dtype=args.vector_dtype)
                served = run_worker("serve", args.threads, store=store, queries=query_path,
                                    truth=truth_path, budget=args.budget)
            except RuntimeError as exc:
                print(f"  {size} {kind}: FAILED {exc}", flush=True)
                continue
            row = {"size": size, "kind": kind, **built, **served}
            rows.append(row)
            print(f"  {size} {kind}: {json.dumps(row)}  [{load()}]", flush=True)
            shutil.rmtree(store, ignore_errors=True)
    print_table(rows, reference)
    for size, (single_qps, batch_qps) in reference.items():
        print(f"reference, faiss IndexFlatIP in RAM at {size}: {single_qps:.1f} single-query QPS,"
              f" {batch_qps:.1f} batched QPS (batches of 100)")
    print(load())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_table(rows: list[dict], reference: dict[str, tuple[float, float]]) -> None:
    """Ratios are against the ``exact`` store row of the same size, or, when the run has no
    such row, against faiss's in-RAM ``IndexFlatIP`` measured in the same run."""
    header = ("| N | type | serving index | build s | open s | RSS GB (x vec+idx) | recall@10 "
              "| 1-query QPS (x exact) | batch QPS (x exact) | add ms | remove ms "
              "| p99 idle / during 10k add ms |")
    print("\n" + header + "\n" + "|---" * 12 + "|")
    exact = {r["size"]: (r["single_qps"], r["batched_qps"]) for r in rows if r["kind"] == "exact"}
    for r in rows:
        single_base, batch_base = exact.get(r["size"]) or reference[r["size"]]
        index = r["index"]
        serving = index["factory"] + (f" {index['params']}" if index.get("params") else "")
        footprint = r["rss"] / max(1, r["vectors_bytes"] + r["index_bytes"])
        print(
            f"| {r['n']:,} | {r['kind']} | {serving} | {r['build_s']:.1f} | {r['open_s']:.2f} "
            f"| {r['rss'] / 2**30:.2f} ({footprint:.2f}x) | {r['recall']:.3f} "
            f"| {r['single_qps']:.0f} ({r['single_qps'] / single_base:.1f}x) "
            f"| {r['batched_qps']:.0f} ({r['batched_qps'] / batch_base:.1f}x) "
            f"| {r['add_ms']:.2f} | {r['remove_ms']:.2f} "
            f"| {r['idle_p99_ms']:.2f} / {r['during_p99_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
