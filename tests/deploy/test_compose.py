"""The docker-compose deployment for real: build, start, index through the API, match,
restart with the index intact, tear down. Slow (builds an image): run with ``-m slow``.

Runs the README's commands with whichever compose is here: ``docker compose`` where a Docker
engine answers, else ``podman-compose`` (``../shared/containers/setup.sh`` installs podman).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PROJECT = "lookalike-test"
pytestmark = pytest.mark.slow


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(
        ["docker", "info"], capture_output=True, check=False
    ).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("podman-compose"):
        return ["podman-compose"]
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/ready", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"{url}/ready did not answer 200 within {timeout:.0f} s")


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[list[str], str, dict[str, str]]]:
    compose = compose_command()
    if compose is None:
        pytest.skip("no docker engine or podman-compose (run ../shared/containers/setup.sh)")
    port = free_port()
    env = dict(os.environ, LOOKALIKE_PUBLISH_PORT=str(port), LOOKALIKE_API_KEYS='["test-key"]')
    base = [*compose, "-p", PROJECT]
    subprocess.run([*base, "down", "-v"], cwd=REPO, env=env, capture_output=True, check=False)
    build = subprocess.run([*base, "up", "-d", "--build"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=False, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    try:
        yield base, f"http://127.0.0.1:{port}", env
    finally:
        subprocess.run([*base, "down", "-v"], cwd=REPO, env=env, capture_output=True,
                       check=False, timeout=300)


def test_compose_deployment_serves_and_survives_a_restart(deployment) -> None:
    base, url, env = deployment
    ready = wait_ready(url)
    assert ready["model"]["engine"] == "onnx-int8" and ready["items"] == 0

    images = sorted((REPO / "demo" / "tll" / "right").glob("*.jpg"))[:30]
    headers = {"X-API-Key": "test-key"}
    with httpx.Client(base_url=url, timeout=60) as client:
        denied = client.post("/items", files={"image": ("a.jpg", images[0].read_bytes())},
                             data={"key": "x"})
        assert denied.status_code == 401
        for path in images:
            response = client.post("/items", headers=headers, data={"key": path.stem},
                                   files={"image": (path.name, path.read_bytes(), "image/jpeg")})
            assert response.status_code == 201, response.text
        query = images[7]
        match = client.post("/match", files={"image": ("q.jpg", query.read_bytes())},
                            data={"k": "3"}).json()
        assert match["matches"][0]["key"] == query.stem
        assert match["matches"][0]["score"] > 0.999
        # The same photo enlarged past large_image_pixels: it decodes in the container's
        # decode worker process (the deadline's lane) and is found all the same.
        large = io.BytesIO()
        Image.open(query).resize((2400, 2400)).save(large, format="PNG")
        found = client.post("/match", files={"image": ("q.png", large.getvalue())},
                            data={"k": "1"})
        assert found.status_code == 200, found.text
        assert found.json()["matches"][0]["key"] == query.stem
        # The container's pair verdict is the hubness-corrected one: the export carries the
        # model's cohort and its calibration's hubness entry.
        verdict = client.post("/compare", data={"key_a": query.stem, "key_b": images[8].stem})
        assert verdict.status_code == 200, verdict.text
        body = verdict.json()
        assert body["calibration"]["k"] == 20 and body["verdict_score"] < body["score"]

    restart = subprocess.run([*base, "restart"], cwd=REPO, env=env, capture_output=True,
                             text=True, check=False, timeout=300)
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert wait_ready(url)["items"] == len(images)
    with httpx.Client(base_url=url, timeout=60) as client:
        again = client.post("/match", files={"image": ("q.jpg", images[3].read_bytes())},
                            data={"k": "1"}).json()
        assert again["matches"][0]["key"] == images[3].stem
        assert "lookalike_index_items 30.0" in client.get("/metrics").text
