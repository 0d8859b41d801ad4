"""What the re-ranked pair score (``/compare`` with ``rerank=true``) costs beyond describing the
two images: the score without its hubness term (cosine + weight x MaxSim both ways, the
baseline) against the shipped score (minus half of each image's hubness of that score over
the cohort's region images), in one run, on two real demo images' descriptions.

    python benchmarks/pair_score.py                    # accurate, ~30 s on 2 cores
    python benchmarks/pair_score.py --repeats 500
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lookalike.core.machine import cpu_description
from lookalike.models.embedder import Embedder
from lookalike.models.rerank import Reranker, reranker_for
from lookalike.models.resolve import default_cache_dir, resolve_model

DEMO = Path(__file__).resolve().parents[1] / "demo" / "tll" / "left"


def timed(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median and 95th percentile milliseconds of ``repeats`` calls (after one warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="accurate")
    parser.add_argument("--engine", default="onnx-int8")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    cache = default_cache_dir()
    embedder = Embedder(resolve_model(args.model, cache), args.engine)
    reranker = reranker_for(embedder, cache)
    paths = sorted(DEMO.glob("*.jpg"))[:2]
    images = np.stack([embedder.load_file(p)[0] for p in paths])
    a, b = reranker.describe(images)
    spec = reranker.spec.verification
    plain = Reranker(embedder, reranker.describe, reranker.layout, dataclasses.replace(
        reranker.spec, verification=dataclasses.replace(spec, hubness_k=0)))
    reranker.cohort()  # loaded once per model, not per request
    rows = [("describe the two images (baseline of a request)",
             *timed(lambda: reranker.describe(images), max(args.repeats // 10, 5))),
            ("pair score without the hubness term", *timed(lambda: plain.pair_score(a, b),
                                                           args.repeats)),
            (f"pair score as shipped (k={spec.hubness_k}, "
             f"{len(reranker.cohort().regions.rows)} cohort region images)",
             *timed(lambda: reranker.pair_score(a, b), args.repeats))]
    print(f"CPU: {cpu_description()}; load average {os.getloadavg()[0]:.2f}; "
          f"model {args.model}, engine {args.engine}, {args.repeats} repeats\n")
    print("| step | median ms | p95 ms | x describe |\n|---|---|---|---|")
    for name, median, p95 in rows:
        print(f"| {name} | {median:.2f} | {p95:.2f} | {median / rows[0][1]:.3f} |")


if __name__ == "__main__":
    main()
