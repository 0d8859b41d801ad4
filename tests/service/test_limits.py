"""Limits that must hold against a real server (issue 17): the body limit while a chunked
body streams in, file parts counted while parsing, forwarded headers believed from nobody by
default, header and keep-alive timeouts, and no exposed server with open write routes."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.serve import open_write_refusal
from lookalike.service.settings import Settings

from .conftest import serve_in_thread


@contextmanager
def served(settings: Settings, embedder: Embedder) -> Iterator[str]:
    store = IndexStore.open(settings.index, model_fingerprint=embedder.fingerprint)
    try:
        with serve_in_thread(create_app(settings, ServiceState(settings, embedder, store)),
                             settings) as url:
            yield url
    finally:
        store.close()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def answer_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server has sent (b"" if it closed) once it is readable within ``seconds``."""
    readable, _, _ = select.select([sock], [], [], seconds)
    return sock.recv(65536) if readable else None


def stream_until_refused(url: str, most: int) -> tuple[int, bytes | None]:
    """Send a chunked multipart /match upload with no Content-Length, 64 kB a chunk, until the
    server answers or ``most`` bytes are sent: (bytes sent, the answer's first bytes)."""
    boundary = b"xyz"
    head = (
        b"POST /match HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n"
    )
    part = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; '
            b'filename="a.png"\r\nContent-Type: image/png\r\n\r\n')
    chunk = b"\0" * 65536
    with connect(url) as sock:
        sock.sendall(head + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        sent, answer = len(part), None
        while sent < most and answer is None:
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                answer = answer_within(sock, 5) or b""
                break
            sent += len(chunk)
            answer = answer_within(sock, 0.02)
    return sent, answer


def test_a_chunked_body_is_refused_while_it_streams(settings: Settings, embedder: Embedder):
    """A chunked upload with no Content-Length: the 413 comes once the limit (here about
    66 kB) is passed, long before the 64 MB the client would send."""
    small = settings.model_copy(update={"max_upload_bytes": 1000, "max_files_per_request": 2})
    with served(small, embedder) as url:
        sent, answer = stream_until_refused(url, 64 * 2**20)
    assert answer is not None and answer.startswith(b"HTTP/1.1 413"), (sent, answer)
    assert b"over the limit" in answer
    assert sent < 2 * 2**20  # refused after about 66 kB, not at the end of 64 MB


def test_a_match_body_is_limited_to_one_upload(settings: Settings, embedder: Embedder):
    """/match takes one image: its body is refused once it passes about one upload and its
    form fields, not the 64 uploads of ``max_files_per_request`` (at the defaults, 1.3 GB read
    and spooled to disk before the 413)."""
    roomy = settings.model_copy(update={"max_upload_bytes": 100_000})
    assert roomy.max_body_bytes > 6_000_000  # 64 uploads of 100 kB
    assert roomy.max_body_bytes_for("/match") < 500_000
    with served(roomy, embedder) as url:
        sent, answer = stream_until_refused(url, 16 * 2**20)
    assert answer is not None and answer.startswith(b"HTTP/1.1 413"), (sent, answer)
    assert sent < 2**20, sent


def test_file_parts_are_counted_while_parsing(client: TestClient, settings: Settings) -> None:
    files = [("image", (f"{n}.png", b"x", "image/png")) for n in range(200)]
    response = client.post("/match", files=files)
    assert response.status_code == 400, response.text
    assert "files" in response.json()["detail"].lower()
    assert settings.max_files_per_request == 64


def test_a_spoofed_forwarded_for_gets_no_bucket_of_its_own(
    settings: Settings, embedder: Embedder
) -> None:
    limited = settings.model_copy(update={"rate_limit_per_s": 0.01, "rate_limit_burst": 10})
    with served(limited, embedder) as url, httpx.Client(base_url=url) as http:
        codes = [
            http.get("/health", headers={"X-Forwarded-For": f"10.0.0.{n}"}).status_code
            for n in range(15)
        ]
    assert codes == [200] * 10 + [429] * 5


def test_a_configured_proxy_is_believed(settings: Settings, embedder: Embedder) -> None:
    behind = settings.model_copy(
        update={"rate_limit_per_s": 0.01, "rate_limit_burst": 1, "forwarded_allow_ips": ["*"]}
    )
    with served(behind, embedder) as url, httpx.Client(base_url=url) as http:
        codes = [
            http.get("/health", headers={"X-Forwarded-For": f"10.0.0.{n}"}).status_code
            for n in (1, 2, 2)
        ]
    assert codes == [200, 200, 429]  # one bucket per client behind the proxy


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: t\r\n"])
def test_headers_that_never_finish_are_timed_out(
    settings: Settings, embedder: Embedder, sent: bytes
) -> None:
    hurried = settings.model_copy(update={"header_timeout_s": 0.5})
    with served(hurried, embedder) as url, connect(url) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        answer = answer_within(sock, 5)
        assert answer is not None, "the half-open connection was never closed"
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3
        assert answer_within(sock, 5) == b""  # and closed


def test_a_slow_but_complete_request_and_keep_alive(settings: Settings, embedder: Embedder):
    """Headers in time are served; the connection then closes after the keep-alive time."""
    quick = settings.model_copy(update={"header_timeout_s": 2, "keep_alive_timeout_s": 1})
    with served(quick, embedder) as url, connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        time.sleep(0.5)
        sock.sendall(b"Host: t\r\n\r\n")
        answer = answer_within(sock, 5) or b""
        assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        # The body may arrive in a segment of its own (seen on a loaded machine); then EOF.
        while (more := answer_within(sock, 5)):
            answer += more
        assert more == b"" and time.monotonic() - started < 3
        assert answer.endswith(b'{"status":"ok"}')


def test_exposed_open_writes_are_refused() -> None:
    assert open_write_refusal(Settings(host="127.0.0.1")) is None  # the local demo
    assert open_write_refusal(Settings(host="::1")) is None
    assert "LOOKALIKE_API_KEYS" in open_write_refusal(Settings(host="0.0.0.0"))
    assert open_write_refusal(Settings(host="0.0.0.0", api_keys=["k"])) is None
    assert open_write_refusal(Settings(host="0.0.0.0", allow_open_writes=True)) is None


def test_the_container_entry_point_refuses_open_writes(tmp_path: Path) -> None:
    """As the container runs it (0.0.0.0, no key): one error line, exit 2, before anything
    is loaded or bound (the index here does not even exist)."""
    env = dict(os.environ, LOOKALIKE_HOST="0.0.0.0", LOOKALIKE_INDEX=str(tmp_path / "none"),
               LOOKALIKE_API_KEYS="[]")
    env.pop("LOOKALIKE_ALLOW_OPEN_WRITES", None)
    done = subprocess.run([sys.executable, "-m", "lookalike.service.serve"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: refusing to serve on 0.0.0.0")
