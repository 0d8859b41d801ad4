"""Load benchmark: POST /match at several concurrency levels, with and without micro-batching.

    python benchmarks/load.py                       # demo index, concurrency 1/4/16/64
    python benchmarks/load.py --requests 100 --seconds 20 --concurrency 1 16
    python benchmarks/load.py --port 8000 --api-key KEY   # a running deployment (compose)

For each mode it starts a real server (``lookalike serve``) on 127.0.0.1 in a subprocess,
sends a bounded number of requests (and for a bounded time) per level with an async client,
and prints requests/s, latency percentiles, error counts, the server's CPU time per request
and its mean forward batch. The offline batch embedding rate of the same model and engine,
measured in the same run, is the baseline: the ratio says how much of the model's speed
survives HTTP, decoding and concurrency. The client runs on the same machine and takes its
share of the cores (reported in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lookalike.demo import DEMO_IMAGES
from lookalike.index.build import build_index
from lookalike.models.embedder import Embedder
from lookalike.models.resolve import create_embedder
from lookalike.service.settings import Settings

try:
    from uvloop import run  # the server runs on uvloop too (uvicorn picks it when installed)
except ImportError:
    from asyncio import run


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    server_cpu_ms: float = float("nan")
    """Server process CPU time (all threads) per request."""
    mean_batch: float = float("nan")
    """Images per forward pass during this level (from the server's /metrics)."""

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


def offline_rate(embedder: Embedder, images: list[Path], batch_size: int, runs: int) -> float:
    """Images/s for decode + preprocess + forward in batches, no HTTP: the best of ``runs``
    passes, so that a noisy pass cannot make the service look better than it is."""
    list(embedder.embed_files(images[:batch_size], batch_size))  # warm-up
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        count = sum(len(b.indices) for b in embedder.embed_files(images, batch_size))
        rates.append(count / (time.perf_counter() - started))
    return max(rates)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads (Linux; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_totals(port: int) -> tuple[float, float]:
    """(forward passes, images embedded) so far, from the server's Prometheus metrics."""
    totals = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("lookalike_embed_batch_size_count", "lookalike_embed_batch_size_sum"):
            totals[name] = float(value)
    return totals["lookalike_embed_batch_size_count"], totals["lookalike_embed_batch_size_sum"]


def measure_level(
    pid: int | None, port: int, requests: list[bytes], concurrency: int,
    max_requests: int, max_seconds: float, mode: str,
) -> LevelResult:
    """One level, with the server's CPU time (when its process is ours to see) and mean
    batch size over it."""
    passes, images = batch_totals(port)
    cpu = process_cpu_seconds(pid) if pid else float("nan")
    result = run(run_level(port, requests, concurrency, max_requests, max_seconds, mode))
    if pid:
        result.server_cpu_ms = (process_cpu_seconds(pid) - cpu) / result.requests * 1000
    passes_after, images_after = batch_totals(port)
    result.mean_batch = (images_after - images) / max(passes_after - passes, 1)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, port: int, micro_batching: bool, engine: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        LOOKALIKE_MICRO_BATCHING=str(micro_batching).lower(),
        LOOKALIKE_REQUEST_TIMEOUT_S="120",
    )
    command = [
        sys.executable,
        "-m",
        "lookalike.service.cli",
        "serve",
        "--index",
        str(index),
        "--port",
        str(port),
        "--engine",
        engine,
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("the server did not become ready in 120 s")


BOUNDARY = "lookalike-load-benchmark"


def match_request(port: int, image: bytes, k: int = 10) -> bytes:
    """A complete ``POST /match`` multipart request, as a browser or ``curl -F`` sends it."""
    body = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (
        f"POST /match HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def send_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection -> (status, body)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    return status, await reader.readexactly(length)


async def run_level(
    port: int,
    requests: list[bytes],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    mode: str,
) -> LevelResult:
    """``concurrency`` clients, each on its own keep-alive connection, send requests back to
    back until ``max_requests`` are sent or ``max_seconds`` have passed.

    The client is raw HTTP/1.1 on asyncio streams with the requests built in advance: it shares
    the machine's cores with the server, so it must cost as little as possible (an httpx client
    took 2.3 ms of CPU per request here, a third of the server's whole budget).
    """
    latencies: list[float] = []
    errors = 0
    issued = 0
    started = time.perf_counter()

    async def client() -> None:
        nonlocal issued, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while issued < max_requests and time.perf_counter() - started < max_seconds:
                request = requests[issued % len(requests)]
                issued += 1
                sent = time.perf_counter()
                try:
                    status, body = await send_request(reader, writer, request)
                except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
                    errors += 1
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status == 200 and body.startswith(b'{"matches":[{'):
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return LevelResult(mode, concurrency, len(latencies) + errors, elapsed, latencies, errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("data/demo-index"))
    parser.add_argument("--engine", default=Settings().engine)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=1000, help="Most requests per level.")
    parser.add_argument("--seconds", type=float, default=30, help="Most seconds per level.")
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[8, 16],
        help="Offline baseline batch sizes; the fastest counts.",
    )
    parser.add_argument("--baseline-runs", type=int, default=3, help="Offline passes per size.")
    parser.add_argument(
        "--plot", type=Path, default=Path("benchmarks/figures/load.png"),
        help="Where to draw requests/s and p99 latency against clients.",
    )
    parser.add_argument(
        "--port", type=int,
        help="Measure the server already running on 127.0.0.1:PORT (say, the compose "
        "deployment) instead of starting one per mode.",
    )
    parser.add_argument(
        "--api-key", help="With --port: index the demo images through POST /items first, "
        "when the served index does not hold them yet.",
    )
    args = parser.parse_args()

    settings = Settings(engine=args.engine)
    embedder = create_embedder(settings.model_options())
    build_index(DEMO_IMAGES, args.index, embedder, progress=False)
    images = sorted(DEMO_IMAGES.rglob("*.jpg"))
    offline = {size: offline_rate(embedder, images, size, args.baseline_runs)
               for size in args.batch_size}
    best_size = max(offline, key=offline.__getitem__)
    baseline = offline[best_size]
    del embedder

    results: list[LevelResult] = []
    if args.port is not None:
        if args.api_key:
            index_through_api(args.port, images, args.api_key)
        results += measure_levels(None, args.port, images, args, "as deployed")
    else:
        for micro_batching in (True, False):
            mode = "micro-batching" if micro_batching else "per-request"
            port = free_port()
            server = start_server(args.index, port, micro_batching, args.engine)
            try:
                results += measure_levels(server.pid, port, images, args, mode)
            finally:
                server.terminate()
                server.wait(30)

    rates = ", ".join(f"batch {size}: {rate:.1f}" for size, rate in offline.items())
    print(
        f"engine {args.engine}; offline embedding rate (decode + preprocess + forward, best of "
        f"{args.baseline_runs} passes, same run): {rates} images/s; baseline = batch {best_size}"
    )
    print(
        f"{'mode':<15} {'clients':>7} {'requests':>8} {'req/s':>7} {'x offline':>9} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'errors':>6} {'cpu ms/req':>10} "
        f"{'batch':>5}"
    )
    for r in results:
        print(
            f"{r.mode:<15} {r.concurrency:>7} {r.requests:>8} {r.rate:>7.1f} "
            f"{r.rate / baseline:>9.2f} {r.percentile(50):>7.1f} {r.percentile(95):>7.1f} "
            f"{r.percentile(99):>7.1f} {r.errors:>6} {r.server_cpu_ms:>10.2f} "
            f"{r.mean_batch:>5.1f}"
        )
    print(f"plot: {plot(results, baseline, args.engine, args.plot)}")


def measure_levels(
    pid: int | None, port: int, images: list[Path], args: argparse.Namespace, mode: str
) -> list[LevelResult]:
    requests = [match_request(port, path.read_bytes()) for path in images]
    run(run_level(port, requests, 2, 20, 30, mode))  # warm-up
    return [
        measure_level(pid, port, requests, concurrency, args.requests, args.seconds, mode)
        for concurrency in args.concurrency
    ]


def index_through_api(port: int, images: list[Path], api_key: str) -> None:
    """Add the demo images a running server lacks through ``POST /items`` (keys as in the
    demo index)."""
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60) as client:
        for path in images:
            key = path.relative_to(DEMO_IMAGES).with_suffix("").as_posix()
            response = client.post(
                "/items", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                data={"key": key},
            )
            if response.status_code not in (201, 409):  # 409: already there
                raise RuntimeError(f"POST /items {key}: {response.status_code} {response.text}")


def plot(results: list[LevelResult], baseline: float, engine: str, path: Path) -> Path:
    """Requests/s (against the offline rate and the 0.9x target) and p99 latency, per mode."""
    figure = Figure(figsize=(9, 3.8), dpi=110)
    FigureCanvasAgg(figure)
    rate_axes, latency_axes = figure.subplots(1, 2)
    for mode in dict.fromkeys(r.mode for r in results):
        levels = [r for r in results if r.mode == mode]
        clients = [r.concurrency for r in levels]
        rate_axes.plot(clients, [r.rate for r in levels], marker="o", label=mode)
        latency_axes.plot(clients, [r.percentile(99) for r in levels], marker="o", label=mode)
    rate_axes.axhline(baseline, color="black", linestyle="--", label="offline rate")
    rate_axes.axhline(0.9 * baseline, color="grey", linestyle=":", label="0.9x offline")
    rate_axes.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s",
                  title=f"POST /match throughput ({engine})")
    latency_axes.set(xscale="log", yscale="log", xlabel="concurrent clients",
                     ylabel="p99 latency (ms)", title="tail latency")
    for axes in (rate_axes, latency_axes):
        axes.set_xticks([r.concurrency for r in results], [str(r.concurrency) for r in results])
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


if __name__ == "__main__":
    main()
