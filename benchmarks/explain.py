"""Explanations: how faithful (the deletion test) and how costly (against a plain /match).

Faithfulness, over the demo pairs: the exact split and the occlusion approximation each rank
the regions of both images; greying out the top ``--top`` regions per side must lower the
cosine more than greying out as many random regions (``--draws`` draws). Also checked: for
the exact method, constant + maps add up to the cosine on every pair (largest error shown).

Cost, in the same run, through the real app (TestClient, a store of the 200 demo images):
median latency of a plain /match (upload, k=10), of /explain (upload vs an indexed key), of
/match with explain=true (the top ``explain_top`` explained), and of one explanation offline
(``Explainer.explain``) against embedding the two images. Ratios are against the plain /match.

    python benchmarks/explain.py                  # default engine (onnx-int8; explains on onnx)
    python benchmarks/explain.py --engine torch --pairs 20 --requests 10
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from lookalike.demo import DEMO_IMAGES
from lookalike.evaluation.explanations import deletion_test
from lookalike.index.build import build_index
from lookalike.index.store import IndexStore
from lookalike.models.engines import DEFAULT_ENGINE
from lookalike.models.explain import Explainer
from lookalike.models.resolve import ModelOptions, create_embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings

sys.path.insert(0, str(Path(__file__).parent))
from lookalike.core.machine import cpu_description  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default=DEFAULT_ENGINE)
    parser.add_argument("--pairs", type=int, default=100, help="demo pairs for the deletion test")
    parser.add_argument("--top", type=int, default=5, help="regions masked per side (of 49)")
    parser.add_argument("--draws", type=int, default=5, help="random masks per pair")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per route")
    parser.add_argument("--no-deletion", action="store_true", help="measure the cost only")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lookalike")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(f"CPU: {cpu_description()}; load before: {os.getloadavg()}")
    options = ModelOptions.from_env(engine=args.engine, cache_dir=str(args.cache_dir))
    embedder = create_embedder(options)
    with open(DEMO_IMAGES / "pairs.csv", newline="") as handle:
        names = [(row["left"], row["right"]) for row in csv.DictReader(handle)][: args.pairs]
    pairs = [(embedder.load_file(DEMO_IMAGES / "left" / f"{a}.jpg")[0],
              embedder.load_file(DEMO_IMAGES / "right" / f"{b}.jpg")[0]) for a, b in names]
    exact = Explainer(embedder, args.cache_dir)
    if not args.no_deletion:
        faithfulness(exact, Explainer(embedder, args.cache_dir, occlusion=True), pairs, args)
    cost(embedder, exact, pairs, names, args)
    print(f"\nload after: {os.getloadavg()}")


def faithfulness(exact: Explainer, occlusion: Explainer, pairs: list, args: argparse.Namespace
                 ) -> None:
    explained = [exact.explain(a, b) for a, b in pairs]
    errors = [abs(e.total() - e.score) for e in explained]
    vectors = exact.embedder.embed_arrays(np.stack([image for pair in pairs for image in pair]))
    served = (vectors[0::2] * vectors[1::2]).sum(1)
    drift = max(abs(e.score - s) for e, s in zip(explained, served, strict=True))
    print(f"\nexact split ({exact.engine}): constant + maps = cosine on {len(pairs)} pairs, "
          f"largest error {max(errors):.1e}; largest difference from the "
          f"{exact.embedder.engine_name} engine's cosine {drift:.1e}")
    print(f"\ndeletion test: {args.top} of 49 regions masked per side, {args.draws} random "
          f"draws per pair; score drop (mean +- standard error)")
    print("| method | pairs | top regions | random regions | difference | top > random |")
    print("|---|---|---|---|---|---|")
    for name, explainer in (("exact", exact), ("occlusion", occlusion)):
        s = deletion_test(explainer, pairs, args.top, args.draws).summary()
        print(f"| {name} | {s['pairs']} | {s['top_drop']:.4f} +- {s['top_se']:.4f} | "
              f"{s['random_drop']:.4f} +- {s['random_se']:.4f} | {s['difference']:.4f} +- "
              f"{s['difference_se']:.4f} | {s['wins']:.0%} |")


def _median_ms(call, count: int) -> float:
    call()  # warm
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def cost(embedder, exact: Explainer, pairs: list, names: list, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="explain-bench-") as tmp:
        build_index(DEMO_IMAGES, Path(tmp) / "index", embedder, progress=False)
        settings = Settings(index=Path(tmp) / "index", cache_dir=args.cache_dir,
                            engine=args.engine)
        store = IndexStore.open(settings.index, model_fingerprint=embedder.fingerprint)
        state = ServiceState(settings=settings, embedder=embedder, store=store)
        upload = (DEMO_IMAGES / "left" / f"{names[0][0]}.jpg").read_bytes()
        key = f"right/{names[0][1]}"
        with TestClient(create_app(settings, state)) as client:
            def post(route: str, data: dict) -> None:
                response = client.post(route, files={"image" if route == "/match" else "image_a":
                                                     ("q.jpg", upload, "image/jpeg")}, data=data)
                response.raise_for_status()

            rows = {
                "/match (k=10)": _median_ms(lambda: post("/match", {"k": 10}), args.requests),
                "/explain (upload vs key, overlays)": _median_ms(
                    lambda: post("/explain", {"key_b": key}), args.requests),
                f"/match (k=10, explain=true: top {settings.explain_top})": _median_ms(
                    lambda: post("/match", {"k": 10, "explain": "true"}), args.requests),
            }
        store.close()
    a, b = pairs[0]
    both = np.stack([a, b])
    rows["offline: embed the two images"] = _median_ms(lambda: embedder.embed_arrays(both),
                                                       args.requests)
    rows["offline: Explainer.explain (the two images)"] = _median_ms(
        lambda: exact.explain(a, b), args.requests)
    base = rows["/match (k=10)"]
    print(f"\ncost (engine {args.engine}; explanations on {exact.engine}), median of "
          f"{args.requests}")
    print("| what | ms | vs plain /match |")
    print("|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
