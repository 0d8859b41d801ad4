"""The HTTP API over a real model and store: answers, and 4xx (never 5xx) for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.index.store import ModelMismatchError
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.settings import Settings

from .conftest import png_bytes


def test_health_ready_docs(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["items"] == 24
    assert ready["model"]["embedding_dim"] > 0 and len(ready["model"]["fingerprint"]) == 64
    assert client.get("/docs").status_code == 200
    assert "/match" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "lookalike" in page.text


def test_match_upload_finds_the_same_image_first(
    client: TestClient, query_jpeg: tuple[str, bytes]
) -> None:
    key, data = query_jpeg
    response = client.post(
        "/match", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "5"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [m["rank"] for m in body["matches"]] == [1, 2, 3, 4, 5]
    assert body["matches"][0]["key"] == key
    assert body["matches"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    scores = [m["score"] for m in body["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert body["took_ms"] > 0 and body["model"]["engine"]
    assert client.get(body["matches"][0]["thumbnail_url"]).headers["content-type"] == "image/jpeg"


def test_match_by_key_excludes_the_query(client: TestClient, query_jpeg: tuple[str, bytes]) -> None:
    key, _ = query_jpeg
    body = client.post("/match", data={"query_key": key, "k": "3"}).json()
    assert key not in [m["key"] for m in body["matches"]] and len(body["matches"]) == 3


def test_match_among_candidates(client: TestClient, query_jpeg: tuple[str, bytes]) -> None:
    key, data = query_jpeg
    others = [k for k in client.get("/items").json()["items"] if k["key"] != key][:4]
    candidates = [item["key"] for item in others] + [key]
    response = client.post(
        "/match",
        files={"image": ("q.jpg", data, "image/jpeg")},
        data={"candidates": candidates, "k": "10"},
    )
    body = response.json()
    assert sorted(m["key"] for m in body["matches"]) == sorted(candidates)
    assert body["matches"][0]["key"] == key


def test_items_listing_and_lookup(client: TestClient, query_jpeg: tuple[str, bytes]) -> None:
    page = client.get("/items", params={"offset": 20, "limit": 10}).json()
    assert page["total"] == 24 and len(page["items"]) == 4
    key, _ = query_jpeg
    assert client.get(f"/items/{key}").json()["key"] == key
    assert client.get("/items/right/nope").status_code == 404
    assert client.get("/thumbnails/right/nope").status_code == 404


@pytest.mark.parametrize(
    ("files", "data", "status", "message"),
    [
        (None, {"k": "3"}, 422, "exactly one"),
        ({"image": ("e.jpg", b"", "image/jpeg")}, {}, 400, "empty"),
        ({"image": ("t.txt", b"hello, world", "text/plain")}, {}, 415, "supported format"),
        ({"image": ("big.bin", b"\xff" * 2_000_001, "image/jpeg")}, {}, 413, "larger than"),
        (None, {"query_key": "right/none"}, 404, "unknown key"),
        (None, {"query_key": "x", "k": "0"}, 422, "k must be between"),
        (None, {"query_key": "x", "k": "101"}, 422, "k must be between"),
        (None, {"query_key": "x", "k": "ten"}, 422, "integer"),
    ],
)
def test_bad_match_requests(
    client: TestClient, files: dict | None, data: dict, status: int, message: str
) -> None:
    response = client.post("/match", files=files, data=data)
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"])


def test_truncated_bomb_and_unknown_candidates(
    client: TestClient, query_jpeg: tuple[str, bytes]
) -> None:
    key, data = query_jpeg
    cases = [
        (data[:400], 422, "truncated"),
        (png_bytes(Image.new("1", (7000, 7000))), 413, "pixels"),  # 49 Mpx > 40 Mpx
    ]
    for payload, status, message in cases:
        response = client.post("/match", files={"image": ("q", payload, "image/png")})
        assert response.status_code == status and message in response.json()["detail"].lower()
    response = client.post(
        "/match",
        files={"image": ("q.jpg", data, "image/jpeg")},
        data={"candidates": [key, "no/such/key"]},
    )
    assert response.status_code == 422 and "no/such/key" in response.json()["detail"]
    too_many = [f"k{i}" for i in range(51)]
    response = client.post("/match", data={"query_key": key, "candidates": too_many})
    assert response.status_code == 422 and "limit is 50" in response.json()["detail"]


def test_lifespan_loads_model_and_store(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").json()["items"] == 24


def test_lifespan_refuses_another_models_index(
    settings: Settings, tmp_path: Path, embedder: Embedder
) -> None:
    from lookalike.index.store import IndexStore

    IndexStore.create(tmp_path / "other", dim=embedder.dim, model_fingerprint="0" * 64).close()
    app = create_app(settings.model_copy(update={"index": tmp_path / "other"}))
    with pytest.raises(ModelMismatchError), TestClient(app):
        pass
