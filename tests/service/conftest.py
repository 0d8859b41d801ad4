"""A real app over a real store and model, shared by the service tests."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner, Result

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.cli import app as cli_app
from lookalike.service.deps import ServiceState
from lookalike.service.serve import server_config
from lookalike.service.settings import Settings


@pytest.fixture
def settings(store_copy: Path, cache_dir: Path) -> Settings:
    return Settings(
        index=store_copy, cache_dir=cache_dir, max_upload_bytes=2_000_000, max_candidates=50
    )


@pytest.fixture
def client(settings: Settings, embedder: Embedder) -> Iterator[TestClient]:
    store = IndexStore.open(settings.index, model_fingerprint=embedder.fingerprint)
    state = ServiceState(settings=settings, embedder=embedder, store=store)
    with TestClient(create_app(settings, state)) as test_client:
        yield test_client
    store.close()


@pytest.fixture(scope="session")
def query_jpeg(small_image_dir: Path) -> tuple[str, bytes]:
    """An indexed image's key and bytes."""
    path = sorted((small_image_dir / "right").glob("*.jpg"))[0]
    return f"right/{path.stem}", path.read_bytes()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def serve_in_thread(app: FastAPI, settings: Settings | None = None) -> Iterator[str]:
    """Run ``app`` under a real uvicorn server on a free loopback port, configured as in
    production (:func:`server_config`, from ``settings``); yield its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = server_config(
        app, settings or Settings(), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def server(settings: Settings, embedder: Embedder) -> Iterator[str]:
    """A real server over a copy of the small store."""
    store = IndexStore.open(settings.index, model_fingerprint=embedder.fingerprint)
    app = create_app(settings, ServiceState(settings, embedder, store))
    with serve_in_thread(app, settings) as url:
        yield url
    store.close()


@pytest.fixture
def run(cache_dir: Path) -> Callable[..., Result]:
    """Invoke the ``lookalike`` CLI in-process with the test's model cache."""
    runner = CliRunner()

    def invoke(*args: object) -> Result:
        env = {"LOOKALIKE_CACHE_DIR": str(cache_dir), "COLUMNS": "250"}
        return runner.invoke(cli_app, [str(a) for a in args], env=env)

    return invoke


@pytest.fixture(scope="session")
def accurate_client(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
                    ) -> Iterator[TestClient]:
    """The app serving --model accurate (it has a measured re-ranker) over an empty store."""
    from lookalike.models.resolve import resolve_model

    embedder = Embedder(resolve_model("accurate", cache_dir))
    path = tmp_path_factory.mktemp("accurate-store") / "index"
    IndexStore.create(path, dim=embedder.dim, model_fingerprint=embedder.fingerprint).close()
    settings = Settings(index=path, cache_dir=cache_dir)
    store = IndexStore.open(path, model_fingerprint=embedder.fingerprint)
    with TestClient(create_app(settings, ServiceState(settings, embedder, store))) as client:
        yield client
    store.close()
