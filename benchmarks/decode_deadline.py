"""What the decode deadline costs (issue 17): the normal path before/after, and the costly lane
in a thread against the killable worker process, all in one run.

    python benchmarks/decode_deadline.py [--repeats 200]

- routing: the header check that picks a lane, before (pixels from the header) and after
  (``declared_work``: pixels x JPEG scans beyond 10), per demo JPEG;
- normal upload: a demo JPEG through the micro-batcher (decode, forward, no search), with the
  deadline off (``decode_timeout_s=None``: the costly lane decodes in its thread) and on: normal
  uploads never reach the process, so the two should match;
- costly upload: a 6000 x 6000 PNG through the large-image lane, in its thread and in the
  worker process (the price of the deadline: copying the bytes in and the array out).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import time
from pathlib import Path

from PIL import Image

from lookalike.core.machine import cpu_description
from lookalike.models.preprocess import _open_header, declared_work
from lookalike.models.resolve import ModelOptions, create_embedder
from lookalike.service.batching import MicroBatcher
from lookalike.service.metrics import ServiceMetrics

REPO = Path(__file__).resolve().parents[1]


def per_call_us(fn, items: list[bytes], repeats: int) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        for data in items:
            fn(data)
    return (time.perf_counter() - started) / (repeats * len(items)) * 1e6


def embed_latencies(embedder, uploads: list[bytes], timeout_s: float | None,
                    repeats: int) -> list[float]:
    """Seconds per ``embed`` of each upload in turn, one at a time, through a fresh batcher."""

    async def run() -> list[float]:
        batcher = MicroBatcher(embedder.embed_arrays, ServiceMetrics(), embedder.preprocessor,
                               decode_timeout_s=timeout_s)
        await batcher.start()
        if batcher.decode_process is not None:  # wait out the worker's start-up
            while batcher.decode_process.pid is None:
                await asyncio.sleep(0.05)
        try:
            await batcher.embed([uploads[0]])  # warm-up
            times = []
            for n in range(repeats):
                started = time.perf_counter()
                await batcher.embed([uploads[n % len(uploads)]])
                times.append(time.perf_counter() - started)
            return times
        finally:
            await batcher.stop()

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    jpegs = [p.read_bytes() for p in sorted((REPO / "demo/tll/left").glob("*.jpg"))[:20]]
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), "white").save(buffer, format="PNG")
    costly = buffer.getvalue()
    embedder = create_embedder(ModelOptions())
    print(f"CPU: {cpu_description()}; load average {os.getloadavg()[0]:.1f} at start")

    def pixels_before(data: bytes) -> int:
        width, height = _open_header(data).size
        return width * height

    route_before = per_call_us(pixels_before, jpegs, args.repeats)
    route_after = per_call_us(declared_work, jpegs, args.repeats)
    normal_off = embed_latencies(embedder, jpegs, None, args.repeats)
    normal_on = embed_latencies(embedder, jpegs, 10.0, args.repeats)
    costly_thread = embed_latencies(embedder, [costly], None, 5)
    costly_process = embed_latencies(embedder, [costly], 10.0, 5)
    rows = [
        ("routing check per JPEG (us)", route_before, route_after),
        ("normal JPEG /match-like embed, median (ms)",
         statistics.median(normal_off) * 1e3, statistics.median(normal_on) * 1e3),
        ("normal JPEG, p90 (ms)", statistics.quantiles(normal_off, n=10)[-1] * 1e3,
         statistics.quantiles(normal_on, n=10)[-1] * 1e3),
        ("6000x6000 PNG on the large lane, median (ms)",
         statistics.median(costly_thread) * 1e3, statistics.median(costly_process) * 1e3),
    ]
    print("\n| measure | deadline off / before | deadline on / after | ratio |\n|---|---|---|---|")
    for name, before, after in rows:
        print(f"| {name} | {before:.2f} | {after:.2f} | {after / before:.2f}x |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
