"""A real app over a real store and model, shared by the service tests."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
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
