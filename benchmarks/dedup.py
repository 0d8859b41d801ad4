"""Near-duplicate groups at scale: seconds and peak RSS of ``find_duplicate_groups`` on stores
of synthetic vectors with planted near-copies, against an all-in-memory exact k-NN baseline
measured in the same run.

Data: clustered 256-d unit vectors (``benchmarks/index.py``'s generator; cluster mates sit at
cosine ~0.73) plus 1% planted near-copies (cosine ~0.99 to their source). The stores have no
thumbnails, so pairs are judged by cosine alone (``cosine_only_threshold``): this measures the
k-NN pass, the pair collection and the union-find; the keypoint check on real thumbnails is
timed separately in RESULTS.md (per image and per pair). The baseline holds every vector in a
FAISS ``IndexFlatIP`` in RAM and runs the same k-NN exactly (what FiftyOne-style tools do);
the N x N matrix imagededup builds is not run (100k x 100k floats = 40 GB).

    python benchmarks/dedup.py --sizes 100000
    nohup python benchmarks/dedup.py --sizes 100000,1000000 > dedup-bench.log 2>&1 &

Each measurement runs in a fresh subprocess, so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index import clustered, load  # noqa: E402

K = 10
THRESHOLD = 0.9


def planted(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors: ``n - n // 100`` clustered ones and ``n // 100`` near-copies of random
    ones (appended); returns the vectors and the ``(source, copy)`` row pairs."""
    copies = n // 100
    base = clustered(n - copies, dim, seed)
    rng = np.random.default_rng(seed + 1)
    sources = rng.choice(len(base), copies, replace=False)
    noisy = base[sources] + 0.1 * rng.normal(size=(copies, dim)).astype(np.float32) / np.sqrt(dim)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    pairs = np.stack([sources, np.arange(len(base), n)], axis=1)
    return np.vstack([base, noisy]).astype(np.float32), pairs


def peak_rss() -> int:
    """This process's peak RSS (VmHWM: unlike ``ru_maxrss`` it is not inherited from the
    parent across fork and exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def build_worker(vectors: Path, store_path: Path) -> dict:
    from lookalike.index.store import IndexStore

    data = np.load(vectors, mmap_mode="r")
    started = time.perf_counter()
    store = IndexStore.create(store_path, dim=data.shape[1], model_fingerprint="bench",
                              background=False)
    for start in range(0, len(data), 10_000):
        chunk = np.asarray(data[start:start + 10_000])
        store.add([f"v{i:07d}" for i in range(start, start + len(chunk))], chunk)
    store.save()
    info = store.manifest["index"]
    store.close()
    return {"build_s": time.perf_counter() - started, "index": info}


def found_pairs(groups: list[list[int]]) -> set[tuple[int, int]]:
    return {(a, b) for g in groups for i, a in enumerate(sorted(g)) for b in sorted(g)[i + 1:]}


def score(groups: list[list[int]], truth: np.ndarray) -> dict:
    claimed, true = found_pairs(groups), {tuple(sorted(p)) for p in truth.tolist()}
    hits = len(claimed & true)
    return {"groups": len(groups), "precision": hits / max(len(claimed), 1),
            "recall": hits / max(len(true), 1)}


def dedup_worker(store_path: Path, pairs: Path) -> dict:
    from lookalike.index.dedup import DedupParams, find_duplicate_groups
    from lookalike.index.store import IndexStore

    started = time.perf_counter()
    store = IndexStore.open(store_path, background=False)
    groups = find_duplicate_groups(store, DedupParams(cosine_only_threshold=THRESHOLD, k=K))
    seconds = time.perf_counter() - started
    store.close()
    rows = [[int(key[1:]) for key in g.keys] for g in groups]
    return {"seconds": seconds, "peak_rss": peak_rss(), **score(rows, np.load(pairs))}


def baseline_worker(vectors: Path, pairs: Path) -> dict:
    import faiss
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    started = time.perf_counter()
    data = np.load(vectors)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    scores, ids = index.search(data, K + 1)
    keep = (scores >= THRESHOLD) & (ids != np.arange(len(data))[:, None]) & (ids >= 0)
    rows, cols = np.nonzero(keep)
    graph = coo_array((np.ones(len(rows)), (rows, ids[rows, cols])), shape=(len(data),) * 2)
    _, labels = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for node in np.unique(np.concatenate([rows, ids[rows, cols]])).tolist():
        members.setdefault(int(labels[node]), []).append(node)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss": peak_rss(), **score(list(members.values()),
                                                                 np.load(pairs))}


def run_worker(mode: str, threads: int, **paths: Path) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--threads", str(threads)]
    for name, value in paths.items():
        command += [f"--{name}", str(value)]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{mode} worker failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-max", type=int, default=200_000,
                        help="skip the exact in-RAM baseline above this size (it is quadratic)")
    parser.add_argument("--worker")
    parser.add_argument("--vectors", type=Path)
    parser.add_argument("--pairs", type=Path)
    parser.add_argument("--store", type=Path)
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    if args.worker:
        result = {"build": lambda: build_worker(args.vectors, args.store),
                  "dedup": lambda: dedup_worker(args.store, args.pairs),
                  "baseline": lambda: baseline_worker(args.vectors, args.pairs)}[args.worker]()
        print(json.dumps(result))
        return
    print(f"# {load()} at start")
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="dedup-bench-") as work:
            work = Path(work)
            data, truth = planted(size, args.dim)
            np.save(work / "v.npy", data)
            np.save(work / "p.npy", truth)
            del data
            built = run_worker("build", args.threads, vectors=work / "v.npy", store=work / "s")
            ours = run_worker("dedup", args.threads, store=work / "s", pairs=work / "p.npy")
            base = run_worker("baseline", args.threads, vectors=work / "v.npy",
                              pairs=work / "p.npy") if size <= args.baseline_max else None
            vectors_bytes = size * args.dim * 4
            rows.append((size, built, ours, base, vectors_bytes, load()))
            print(json.dumps({"size": size, "build": built, "dedup": ours, "baseline": base,
                              "load": load()}), flush=True)
    print("\n| items | index | dedup s | peak RSS | RSS / vectors | P / R planted | "
          "exact in-RAM baseline s | its RSS | time ratio | RSS ratio | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, built, ours, base, vectors_bytes, at in rows:
        if base is None:  # not run: quadratic
            base = {"seconds": float("nan"), "peak_rss": float("nan")}
        print(f"| {size:,} | {built['index'].get('factory', '?') if built['index'] else 'exact'} | "
              f"{ours['seconds']:.1f} | {ours['peak_rss'] / 2**20:,.0f} MiB | "
              f"{ours['peak_rss'] / vectors_bytes:.2f}x | "
              f"{ours['precision']:.3f} / {ours['recall']:.3f} | {base['seconds']:.1f} | "
              f"{base['peak_rss'] / 2**20:,.0f} MiB | {ours['seconds'] / base['seconds']:.2f}x | "
              f"{ours['peak_rss'] / base['peak_rss']:.2f}x | {at} |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
