"""Ray against one process, in one run on the same images: build images/s, then /match
requests/s and latency of ``lookalike serve --ray`` against ``lookalike serve``.

    python benchmarks/ray_bench.py                          # 300 TLL images from ../shared/tll
    python benchmarks/ray_bench.py --source demo/tll --images 200 --seconds 10

Build: the single-process build (``build_index``) and the Ray build (``build_index_on_ray`` on
a local Ray with 2 CPUs, two actors of one thread) run in this process on the same images
into new stores, model loading included; Ray's start-up is timed apart, so the table shows
where the Ray build's time goes. Serving: both servers run as the real command on 127.0.0.1
(ports 8530/8531), serve the single-process store, and get the same bounded load from
``benchmarks/load.py``'s raw-HTTP client at each concurrency level. The CPU model and the load
average are printed with the figures: other jobs share this machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from build import pick_images
from load import LevelResult, match_request, measure_level, run, run_level, start_server

from lookalike.core.machine import cpu_description
from lookalike.index.build import build_index
from lookalike.index.ray_build import RayOptions, build_index_on_ray, ray_session
from lookalike.models.resolve import ModelOptions, create_embedder

REPO = Path(__file__).resolve().parents[1]


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def single_build(images: Path, store: Path, options: ModelOptions) -> float:
    started = time.perf_counter()
    build_index(images, store, create_embedder(options), progress=False)
    return time.perf_counter() - started


def ray_build(images: Path, store: Path, options: ModelOptions, shard_size: int
              ) -> tuple[float, float]:
    """(seconds to start Ray, seconds of the build on it)."""
    started = time.perf_counter()
    with ray_session(RayOptions(num_cpus=2)):
        ready = time.perf_counter()
        build_index_on_ray(images, store, options, RayOptions(shard_size=shard_size),
                           progress=False)
        done = time.perf_counter()
    return ready - started, done - ready


def start_ray_server(index: Path, port: int, shards: int, replicas: int, engine: str
                     ) -> subprocess.Popen:
    command = [sys.executable, "-m", "lookalike.service.cli", "serve", "--index", str(index),
               "--port", str(port), "--engine", engine, "--ray", "--shards", str(shards),
               "--replicas", str(replicas)]
    env = dict(os.environ, LOOKALIKE_REQUEST_TIMEOUT_S="120")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("the Ray server exited during start-up")
        time.sleep(1)
    stop(process)
    raise RuntimeError("the Ray server did not become ready in 300 s")


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C, so that `serve --ray` shuts Serve and its local Ray down."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def levels(port: int, images: list[Path], args: argparse.Namespace, mode: str,
           pid: int | None) -> list[LevelResult]:
    requests = [match_request(port, path.read_bytes()) for path in images]
    run(run_level(port, requests, 2, 20, 30, mode))  # warm-up
    return [measure_level(pid, port, requests, c, args.requests, args.seconds, mode)
            for c in args.concurrency]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "tll")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--engine", default="onnx-int8")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=400, help="Most requests per level.")
    parser.add_argument("--seconds", type=float, default=15, help="Most seconds per level.")
    parser.add_argument("--port", type=int, default=8530, help="This port and the next.")
    args = parser.parse_args()

    print(f"CPU: {cpu_description()}; load average at start {load_average()}")
    options = ModelOptions(engine=args.engine)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = pick_images(args.source, args.images, root / "images")
        single_s = single_build(images, root / "single", options)
        ray_start_s, ray_s = ray_build(images, root / "ray", options, args.shard_size)
        n = args.images
        print(f"\nbuild of {n} images (engine {args.engine}), load average now {load_average()}")
        print(f"{'build':<34} {'seconds':>8} {'images/s':>9} {'x single':>9}")
        print(f"{'single process':<34} {single_s:>8.1f} {n / single_s:>9.1f} {1.0:>9.2f}")
        print(f"{'Ray, 2 actors (build only)':<34} {ray_s:>8.1f} {n / ray_s:>9.1f} "
              f"{single_s / ray_s:>9.2f}")
        total = ray_start_s + ray_s
        print(f"{'Ray, with starting Ray':<34} {total:>8.1f} {n / total:>9.1f} "
              f"{single_s / total:>9.2f}")
        print(f"{'  of which: starting local Ray':<34} {ray_start_s:>8.1f}")

        files = sorted(images.iterdir())[:200]
        results: list[LevelResult] = []
        server = start_server(root / "single", args.port, True, args.engine)
        try:
            results += levels(args.port, files, args, "lookalike serve", server.pid)
        finally:
            server.terminate()
            server.wait(30)
        started = time.perf_counter()
        ray_server = start_ray_server(root / "single", args.port + 1, args.shards,
                                      args.replicas, args.engine)
        ray_ready_s = time.perf_counter() - started
        try:
            results += levels(args.port + 1, files, args,
                              f"Ray {args.shards}x{args.replicas}", None)
        finally:
            stop(ray_server)

    base = {r.concurrency: r.rate for r in results if r.mode == "lookalike serve"}
    print(f"\n/match, k=10, {n} indexed images; Ray Serve: {args.shards} shards x "
          f"{args.replicas} replicas, 1 embedding replica (ready in {ray_ready_s:.0f} s); "
          f"load average at the end {load_average()}")
    print(f"{'server':<16} {'clients':>7} {'requests':>8} {'req/s':>7} {'x single':>8} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    for r in results:
        print(f"{r.mode:<16} {r.concurrency:>7} {r.requests:>8} {r.rate:>7.1f} "
              f"{r.rate / base[r.concurrency]:>8.2f} {r.percentile(50):>7.1f} "
              f"{r.percentile(99):>7.1f} {r.errors:>6}")


if __name__ == "__main__":
    main()
