"""Issue 17's probe families against a running ``lookalike serve`` (default settings plus an API
key), as an attacker would send them; prints one table row per probe with what came back.

    LOOKALIKE_API_KEYS='["probe-key"]' LOOKALIKE_CREATE_INDEX=true \\
        lookalike serve --index /tmp/probe-index --port 8100 &
    python benchmarks/probes.py --url http://127.0.0.1:8100 --api-key probe-key

It indexes 10 demo images through the API first (an empty index is fine), and removes what it
added at the end. Only 127.0.0.1 is probed.
"""

from __future__ import annotations

import argparse
import io
import os
import select
import socket
import statistics
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
POISON = {
    "lone surrogate": '{"a": "\\ud800"}',
    "NaN": '{"a": NaN}',
    "-Infinity": '{"a": -Infinity}',
    "1e400": '{"a": 1e400}',
    "5,000-digit integer": '{"a": ' + "9" * 5000 + "}",
    "50,000 levels deep": '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}",
}


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def short_png(width: int = 200, height: int = 245, rows: int = 122) -> bytes:
    """A PNG whose header says ``width x height`` but whose compressed data holds ``rows``."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    raw = b"".join(b"\0" + bytes(range(256)) * (width * 3 // 256) + b"\0" * (width * 3 % 256)
                   for _ in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def many_scan_jpeg(photo: bytes, repeats: int) -> bytes:
    """A progressive JPEG whose last scan header repeats ``repeats`` times, one byte each."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).resize((2000, 2000)).save(
        buffer, format="JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    last = data.rindex(b"\xff\xda")
    (length,) = struct.unpack_from(">H", data, last + 2)
    return data[:-2] + (data[last : last + 2 + length] + b"\0") * repeats + b"\xff\xd9"


class Prober:
    def __init__(self, url: str, api_key: str) -> None:
        self.url, self.key = url, api_key
        self.http = httpx.Client(base_url=url, timeout=120)
        self.rows: list[tuple[str, str, str, bool]] = []
        self.photo = sorted((REPO / "demo/tll/left").glob("*.jpg"))[0].read_bytes()

    def record(self, probe: str, expected: str, got: str, ok: bool) -> None:
        self.rows.append((probe, expected, got, ok))
        print(f"{'ok ' if ok else 'BAD'} {probe}: {got}", flush=True)

    def add(self, key: str, metadata: str = "{}", **headers) -> httpx.Response:
        return self.http.post("/items", files={"image": ("x.jpg", self.photo, "image/jpeg")},
                              data={"key": key, "metadata": metadata},
                              headers={"X-API-Key": self.key, **headers})

    def match(self, data: bytes, name: str = "q.jpg") -> httpx.Response:
        return self.http.post("/match", files={"image": (name, data, "application/octet-stream")})

    def total(self) -> int:
        return self.http.get("/items", params={"limit": 1}).json()["total"]

    def connect(self) -> socket.socket:
        parts = urlsplit(self.url)
        return socket.create_connection((parts.hostname, parts.port), timeout=30)

    def timed(self, fn: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
        started = time.perf_counter()
        response = fn()
        return response, time.perf_counter() - started


def run(p: Prober) -> None:
    for n, path in enumerate(sorted((REPO / "demo/tll/right").glob("*.jpg"))[:10]):
        p.http.post("/items", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                    data={"key": f"probe/{n}"}, headers={"X-API-Key": p.key})
    before = p.total()

    for raw in (b"\xc3\xa9", b"\xff\xfe", "clé".encode("latin-1")):
        codes = [
            p.http.post("/items", files={"image": ("x.jpg", p.photo, "image/jpeg")},
                        data={"key": "k"}, headers=[(b"X-API-Key", raw)]).status_code,
            p.http.delete("/items/probe/0", headers=[(b"X-API-Key", raw)]).status_code,
        ]
        p.record(f"X-API-Key {raw!r} on POST and DELETE", "401, 401", str(codes),
                 codes == [401, 401])

    for name, metadata in POISON.items():
        response = p.add("poison", metadata)
        stored = p.http.get("/items/poison").status_code
        p.record(f"metadata {name}", "422, nothing stored",
                 f"{response.status_code}, GET -> {stored}, total {p.total() - before:+d}",
                 response.status_code == 422 and stored == 404 and p.total() == before)

    for offset in (2**53, 2**63, 10**30):
        code = p.http.get("/items", params={"offset": offset}).status_code
        p.record(f"GET /items?offset={offset}", "422 or empty 200", str(code), code in (200, 422))

    for key in ("t/a/thumbnail", "thumbnail", "t/thumbnail/x"):
        added = p.add(key).status_code
        plain = p.http.get(f"/items/{key}").status_code
        escaped = p.http.get(f"/items/{quote(key, safe='')}").status_code
        thumb = p.http.get(f"/thumbnails/{key}").status_code
        p.http.delete(f"/items/{key}", headers={"X-API-Key": p.key})
        p.record(f"key {key!r}: add, GET (plain, %2F), thumbnail", "201, 200, 200, 200",
                 f"{added}, {plain}, {escaped}, {thumb}", [added, plain, escaped, thumb]
                 == [201, 200, 200, 200])

    # A chunked /match body with no Content-Length, ready to send 1.5 GB.
    boundary = b"xyz"
    head = (b"POST /match HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n")
    part = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; '
            b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n')
    chunk, sent, answer = b"\0" * 2**20, 0, None
    started = time.perf_counter()
    with p.connect() as sock:
        sock.sendall(head + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        while sent < 1536 * 2**20 and answer is None:
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
            except OSError:
                break
            readable, _, _ = select.select([sock], [], [], 0)
            answer = sock.recv(4096) if readable else None
        if answer is None:
            readable, _, _ = select.select([sock], [], [], 10)
            answer = sock.recv(4096) if readable else b""
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    p.record("chunked /match body, up to 1.5 GB", "413 while streaming",
             f"{status} after {sent / 2**20:,.0f} MB, {time.perf_counter() - started:.1f} s",
             b" 413 " in answer[:20])

    parts = [("image", (f"{n}.jpg", p.photo, "image/jpeg")) for n in range(200)]
    response = p.http.post("/match", files=parts)
    p.record("200 file parts on /match", "400 while parsing",
             f"{response.status_code} {response.json()['detail'][:60]}",
             response.status_code == 400)

    with p.connect() as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        started = time.perf_counter()
        readable, _, _ = select.select([sock], [], [], 30)
        reply = sock.recv(4096) if readable else b"(nothing in 30 s)"
        first_line = reply.split(b"\r\n", 1)[0].decode()
        p.record("half a header, then silence", "408 and closed within header_timeout_s (10 s)",
                 f"{first_line} after "
                 f"{time.perf_counter() - started:.1f} s", reply.startswith(b"HTTP/1.1 408"))

    response = p.match(short_png(), "short.png")
    p.record("PNG 200x245 holding 122 rows", "422", f"{response.status_code} "
             f"{response.json()['detail'][:70]}", response.status_code == 422)

    response, seconds = p.timed(lambda: p.match(many_scan_jpeg(p.photo, 20_000), "scans.jpg"))
    p.record("progressive JPEG, 20,010 scans (2000x2000)", "422 before decoding",
             f"{response.status_code} in {seconds:.2f} s", response.status_code == 422)

    big = png(6000, 6000)
    response, seconds = p.timed(lambda: p.match(big, "big.png"))
    p.record("6000x6000 PNG (costly lane, worker process, deadline 10 s)", "200",
             f"{response.status_code} in {seconds:.2f} s", response.status_code == 200)

    # Four clients looping the 6000x6000 PNG while a fifth sends normal /match requests.
    quiet = [p.timed(lambda: p.match(p.photo))[1] for _ in range(10)]
    stop, busy = threading.Event(), []

    def hammer() -> None:
        with httpx.Client(base_url=p.url, timeout=120) as http:
            while not stop.is_set():
                busy.append(http.post("/match", files={"image": ("b.png", big)}).status_code)

    senders = [threading.Thread(target=hammer) for _ in range(4)]
    for sender in senders:
        sender.start()
    time.sleep(1)
    loaded = [p.timed(lambda: p.match(p.photo))[1] for _ in range(10)]
    health = [p.timed(lambda: p.http.get("/health"))[1] for _ in range(10)]
    stop.set()
    for sender in senders:
        sender.join()
    p.record("normal /match while 4 clients loop the 6000x6000 PNG", "median within 1 s",
             f"median {statistics.median(loaded):.3f} s (alone {statistics.median(quiet):.3f} s),"
             f" worst /health {max(health):.3f} s; PNG answers {sorted(set(busy))} x{len(busy)}",
             statistics.median(loaded) < 1.0)

    keys = [item["key"] for item in p.http.get("/items", params={"limit": 100}).json()["items"]]
    spec = {"queries": [{"query": keys[q % len(keys)], "candidates": [
        keys[c % len(keys)] for c in range(1000)]} for q in range(100)]}
    ranks: list[int] = []
    sender = threading.Thread(target=lambda: ranks.append(
        httpx.post(f"{p.url}/rank", json=spec, timeout=120).status_code))
    sender.start()
    time.sleep(0.2)
    health = []
    while sender.is_alive():
        health.append(p.timed(lambda: p.http.get("/health"))[1])
        time.sleep(0.05)
    p.record("/health while a /rank of 100 x 1,000 runs", "no stall",
             f"worst /health {max(health, default=0):.3f} s over {len(health)}; /rank {ranks}",
             max(health, default=0) < 1.0)

    for n in range(10):
        p.http.delete(f"/items/probe/{n}", headers={"X-API-Key": p.key})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8100")
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    if urlsplit(args.url).hostname != "127.0.0.1":
        raise SystemExit("probes go to 127.0.0.1 only")
    prober = Prober(args.url, args.api_key)
    print(f"load average at start {os.getloadavg()[0]:.1f}")
    run(prober)
    print(f"load average at end {os.getloadavg()[0]:.1f}\n")
    print("| probe | expected | got | |\n|---|---|---|---|")
    for probe, expected, got, ok in prober.rows:
        print(f"| {probe} | {expected} | {got} | {'ok' if ok else '**not ok**'} |")


if __name__ == "__main__":
    main()
