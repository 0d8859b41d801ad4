"""Embedding speed and accuracy of every inference engine, end to end, in one table.

For each engine and batch size: images/s from JPEG files to unit vectors (read + decode +
preprocess + forward, through ``Embedder.embed_files``, which decodes the next batch while
the current one runs), batch-1 latency of one upload (``Embedder.embed_bytes``), the
largest cosine distance from the eager torch reference, and top-1 on the 20-candidate sets
of the TLL validation split. Ratios are against eager torch measured in the same run.

    python benchmarks/embed.py                 # ../shared/tll, or the bundled demo set
    python benchmarks/embed.py --quick         # a short smoke run
    python benchmarks/embed.py --model data/model --engines torch,onnx
    python benchmarks/embed.py --model accurate --rerank   # + the re-ranker's descriptions

Speeds are the best of ``--repeats`` passes: on a shared machine the best pass is the one
least disturbed by other work. The load average is printed before and after. Because other
work can take the cores, the table also gives the process CPU time per image in the best
pass (decoding and forward, all threads) and what that work allows on two otherwise idle
cores (``2000 / CPU ms``): an upper bound that assumes perfect overlap, not a measurement.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lookalike.core.machine import cpu_description
from lookalike.core.pairs import (
    CandidateSet,
    make_candidate_sets,
    read_pairs,
    split_pairs,
)
from lookalike.core.scoring import answer_ranks, candidate_metrics
from lookalike.demo import DEMO_IMAGES
from lookalike.models.bundle import ModelBundle
from lookalike.models.embedder import Embedder
from lookalike.models.engines import ENGINES, EngineError
from lookalike.models.resolve import resolve_model

REPO = Path(__file__).resolve().parents[1]
SHARED_TLL = REPO.parent / "shared" / "tll"
BATCH_SIZES = (1, 8, 32, 64)


@dataclass
class EngineResult:
    name: str
    setup_s: float
    speed: dict[int, float] = field(default_factory=dict)
    """batch size -> images/s end to end."""
    cpu_ms: dict[int, float] = field(default_factory=dict)
    """batch size -> process CPU ms per image in the fastest pass."""
    latency_ms: float = float("nan")
    max_cos_distance: float = float("nan")
    top1: float = float("nan")
    rerank_speed: float | None = None
    """images/s of the re-ranker's descriptions at batch 32 (``--rerank``)."""
    vectors: dict[Path, np.ndarray] = field(default_factory=dict, repr=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_TLL,
                        help="TLL folder (pairs.csv, left/, right/); the bundled demo set "
                        "when it does not exist")
    parser.add_argument("--model", default=None,
                        help="model bundle directory or backbone name (default: built-in)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated engines (default: all registered)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)),
                        help="comma-separated batch sizes")
    parser.add_argument("--images", type=int, default=256,
                        help="JPEG files per speed pass")
    parser.add_argument("--repeats", type=int, default=2, help="speed passes; the best counts")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="a speed pass stops after this long (slow engines)")
    parser.add_argument("--threads", type=int, default=2, help="forward-pass threads")
    parser.add_argument("--decode-workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lookalike",
                        help="built-in models and converted engines are cached here")
    parser.add_argument("--rerank", action="store_true",
                        help="also time the model's re-ranker (embedding, learned regions "
                             "and their weights in one pass per image, what 'lookalike rank "
                             "--rerank' runs) on each engine, "
                             "against the plain embedding at batch 32 in the same run")
    parser.add_argument("--quick", action="store_true",
                        help="64 images and at most 5 s per pass, one pass, 40 candidate sets")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.max_seconds = 64, 1, min(args.max_seconds, 5.0)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.rerank and 32 not in args.batch_sizes:
        args.batch_sizes.append(32)  # the re-ranker is compared with the plain batch of 32
    names = [e for e in args.engines.split(",") if e]
    args.engines = ["torch", *[e for e in names if e != "torch"]]  # the reference comes first
    return args


def validation_sets(data: Path, quick: bool) -> tuple[list[CandidateSet], Path]:
    """The shared validation candidate sets (the demo set's own when ``data`` is absent)."""
    if not (data / "pairs.csv").is_file():
        print(f"note: {data} not found, using the bundled demo set {DEMO_IMAGES}")
        data = DEMO_IMAGES
    _, val = split_pairs(read_pairs(data / "pairs.csv"), 0.2, seed=0)
    sets = make_candidate_sets(val, 19, seed=0)
    return (sets[:40] if quick else sets), data


def embed_paths(embedder: Embedder, paths: list[Path], batch_size: int) -> dict[Path, np.ndarray]:
    vectors: dict[Path, np.ndarray] = {}
    for batch in embedder.embed_files(paths, batch_size):
        if batch.errors:
            raise SystemExit(f"error: cannot decode {paths[next(iter(batch.errors))]}")
        vectors.update(zip((paths[i] for i in batch.indices), batch.vectors, strict=True))
    return vectors


def top1(vectors: dict[Path, np.ndarray], sets: list[CandidateSet], data: Path) -> float:
    scores = [
        np.stack([vectors[data / "right" / f"{c}.jpg"] for c in s.candidates])
        @ vectors[data / "left" / f"{s.query}.jpg"]
        for s in sets
    ]
    return candidate_metrics(answer_ranks(scores, [s.answer for s in sets]))["top1"]


def throughput(
    embedder: Embedder, paths: list[Path], batch_size: int, repeats: int, max_seconds: float
) -> tuple[float, float]:
    """Best images/s over ``repeats`` end-to-end passes over ``paths``, and the process CPU
    ms per image in that pass (all threads: decoding and forward). A pass stops early after
    ``max_seconds`` so that slow engines finish too."""
    embed_paths(embedder, paths[: max(batch_size, 8)], batch_size)  # warm-up
    best, cpu_ms = 0.0, float("nan")
    for _ in range(repeats):
        done, cpu, start = 0, time.process_time(), time.perf_counter()
        for batch in embedder.embed_files(paths, batch_size):
            done += len(batch.indices)
            if time.perf_counter() - start > max_seconds:
                break
        rate = done / (time.perf_counter() - start)
        if rate > best:
            best, cpu_ms = rate, 1e3 * (time.process_time() - cpu) / done
    return best, cpu_ms


def latency_ms(embedder: Embedder, paths: list[Path], max_seconds: float) -> float:
    """Median ms for one upload: bytes -> decode -> preprocess -> forward -> vector."""
    datas = [path.read_bytes() for path in paths]
    embedder.embed_bytes(datas[0])
    times: list[float] = []
    for data in datas:
        start = time.perf_counter()
        embedder.embed_bytes(data)
        times.append(time.perf_counter() - start)
        if sum(times) > max_seconds:
            break
    return 1e3 * statistics.median(times)


def decode_ms(embedder: Embedder, paths: list[Path]) -> float:
    """Median ms to read, decode and preprocess one file on one thread."""
    times = []
    for path in paths:
        start = time.perf_counter()
        embedder.load_file(path)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_engine(
    name: str,
    bundle: ModelBundle,
    args: argparse.Namespace,
    sets: list[CandidateSet],
    data: Path,
    accuracy_paths: list[Path],
    speed_paths: list[Path],
) -> tuple[EngineResult, Embedder]:
    start = time.perf_counter()
    embedder = Embedder(bundle, name, decode_workers=args.decode_workers, threads=args.threads,
                        cache_dir=args.cache_dir)
    result = EngineResult(name, time.perf_counter() - start)
    result.vectors = embed_paths(embedder, accuracy_paths, 32)
    result.top1 = top1(result.vectors, sets, data)
    for batch_size in args.batch_sizes:
        result.speed[batch_size], result.cpu_ms[batch_size] = throughput(
            embedder, speed_paths, batch_size, args.repeats, args.max_seconds
        )
    result.latency_ms = latency_ms(embedder, speed_paths[:64], args.max_seconds)
    if args.rerank:
        from lookalike.models.rerank import reranker_for

        describer = reranker_for(embedder, args.cache_dir).embedder()
        result.rerank_speed = throughput(describer, speed_paths, 32, args.repeats,
                                         args.max_seconds)[0]
    return result, embedder


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_table(results: list[EngineResult], batch_sizes: list[int]) -> None:
    base = results[0]
    head = (["engine"] + [f"b{b} img/s" for b in batch_sizes]
            + ["best x torch", "b1 latency ms", "CPU ms/img", "2-core bound img/s",
               "max cos dist", "top-1", "d top-1", "setup s"])
    rows = []
    for r in results:
        best = max(batch_sizes, key=lambda b: r.speed[b])
        rows.append([r.name] + [f"{r.speed[b]:.1f}" for b in batch_sizes] + [
            f"{r.speed[best] / max(base.speed.values()):.1f}x", f"{r.latency_ms:.1f}",
            f"{r.cpu_ms[best]:.2f}", f"{2000 / r.cpu_ms[best]:.0f}",
            f"{r.max_cos_distance:.1e}", f"{r.top1:.4f}", f"{r.top1 - base.top1:+.4f}",
            f"{r.setup_s:.1f}",
        ])
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    reranked = [r for r in results if r.rerank_speed is not None]
    if reranked:
        print("\n| engine | plain b32 img/s | re-ranker b32 img/s | re-ranker / plain |\n"
              "|---|---|---|---|")
        for r in reranked:
            print(f"| {r.name} | {r.speed[32]:.1f} | {r.rerank_speed:.1f} | "
                  f"{r.rerank_speed / r.speed[32]:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sets, data = validation_sets(args.data, args.quick)
    accuracy_paths = list(dict.fromkeys(
        [data / "left" / f"{s.query}.jpg" for s in sets]
        + [data / "right" / f"{c}.jpg" for s in sets for c in s.candidates]
    ))
    speed_paths = (accuracy_paths * (1 + args.images // len(accuracy_paths)))[: args.images]
    bundle = resolve_model(args.model, args.cache_dir)

    print(f"machine: {cpu_description()}, python "
          f"{platform.python_version()}, torch {torch.__version__}, onnxruntime "
          f"{version('onnxruntime')}; CPU only")
    print(f"model: {bundle.name} ({bundle.fingerprint[:12]}), dim {bundle.facts.embedding_dim}; "
          f"data: {data}, {len(sets)} candidate sets, {len(accuracy_paths)} images; "
          f"speed: {len(speed_paths)} files per pass, best of {args.repeats}, "
          f"{args.threads} forward threads, {args.decode_workers} decode workers")
    for name in args.engines:
        if name in ENGINES:
            print(f"  {name}: {ENGINES[name].summary}")
    print(f"load average before: {load()}")
    results = []
    for name in args.engines:
        try:
            result, embedder = run_engine(
                name, bundle, args, sets, data, accuracy_paths, speed_paths
            )
        except EngineError as exc:
            print(f"skipped {name}: {exc}", file=sys.stderr)
            continue
        if not results:
            print(f"read + decode + preprocess: {decode_ms(embedder, speed_paths):.2f} ms/image "
                  "(median, one thread)")
        reference = (results[0] if results else result).vectors
        result.max_cos_distance = max(
            float(1.0 - reference[path] @ vector) for path, vector in result.vectors.items()
        )
        results.append(result)
        print(f"  {name}: done, load average {load()}", flush=True)
    print()
    print_table(results, args.batch_sizes)
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
