"""Hostile input over HTTP (issue 17): never a 500, never stored poison, keys that read back.

Every write here that is refused must leave the index as it was, and every item that is
stored must read back through every route that returns it.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings

from .conftest import serve_in_thread

POISON = {
    "lone surrogate": '{"a": "\\ud800"}',
    "NaN": '{"a": NaN}',
    "Infinity": '{"a": -Infinity}',
    "1e400": '{"a": 1e400}',
    "5,000-digit integer": '{"a": ' + "9" * 5000 + "}",
    "50,000 levels deep": '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "not an object": "[1, 2]",
}


def add(client: TestClient, key: str, data: bytes, metadata: str = "{}", **headers: str):
    return client.post(
        "/items",
        files={"image": ("x.jpg", data, "image/jpeg")},
        data={"key": key, "metadata": metadata},
        headers=headers,
    )


@pytest.mark.parametrize("name", POISON)
def test_poisoned_metadata_is_refused_and_stores_nothing(
    client: TestClient, query_jpeg: tuple[str, bytes], name: str
) -> None:
    response = add(client, "poison", query_jpeg[1], POISON[name])
    assert response.status_code == 422, response.text
    assert "metadata" in response.json()["detail"]
    assert client.get("/items/poison").status_code == 404
    assert client.get("/items", params={"limit": 1000}).json()["total"] == 24


def test_non_ascii_api_keys_are_a_401(
    settings: Settings, embedder: Embedder, query_jpeg: tuple[str, bytes]
) -> None:
    """Over a real socket, so the header's bytes arrive exactly as sent (the TestClient
    re-encodes them)."""
    guarded = settings.model_copy(update={"api_keys": ["s3cret", "clé"]})
    store = IndexStore.open(guarded.index, model_fingerprint=embedder.fingerprint)
    app = create_app(guarded, ServiceState(guarded, embedder, store))
    upload = {"image": ("x.jpg", query_jpeg[1], "image/jpeg")}
    with serve_in_thread(app, guarded) as url, httpx.Client(base_url=url, timeout=30) as http:
        for sent in (b"\xc3\xa9", b"\xff\xfe", "clé".encode("latin-1")):
            headers = {"X-API-Key": sent}
            added = http.post("/items", files=upload, data={"key": "k"}, headers=headers)
            removed = http.delete("/items/right/aer", headers=headers)
            assert (added.status_code, removed.status_code) == (401, 401), sent
        # A non-ASCII key that is configured works when sent as its UTF-8 bytes.
        accepted = http.post(
            "/items", files=upload, data={"key": "k"}, headers={"X-API-Key": "clé".encode()}
        )
        assert accepted.status_code == 201, accepted.text
    store.close()


@pytest.mark.parametrize("offset", [2**53, 2**63, 10**30])
def test_huge_offsets_are_a_422(client: TestClient, offset: int) -> None:
    response = client.get("/items", params={"offset": offset})
    assert response.status_code == 422
    assert client.get("/items", params={"offset": 2**53 - 1}).json()["items"] == []


@pytest.mark.parametrize("key", ["t/a/thumbnail", "thumbnail", "t/thumbnail/x", "a b/?#&"])
def test_keys_that_look_like_routes_read_back(
    client: TestClient, query_jpeg: tuple[str, bytes], key: str
) -> None:
    created = add(client, key, query_jpeg[1], '{"n": 1}')
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"] == key
    for path in (quote(key, safe="/"), quote(key, safe="")):  # slashes as they are, and %2F
        item = client.get(f"/items/{path}")
        assert item.status_code == 200, (path, item.text)
        assert item.json() == body
    thumbnail = client.get(body["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert client.delete(f"/items/{quote(key, safe='')}").json()["removed"] == key
    assert client.get(f"/items/{quote(key, safe='/')}").status_code == 404


# JSON as a client may write it: any value, text with lone surrogates, numbers out of range.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(st.characters(codec=None, exclude_categories=()), max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@given(value=st.dictionaries(st.text(max_size=6), json_values, max_size=4))
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_accepted_metadata_reads_back_through_every_route(
    client: TestClient, query_jpeg: tuple[str, bytes], value: dict
) -> None:
    text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    response = add(client, "h/item", query_jpeg[1], text)
    assert response.status_code in (201, 422), response.text
    if response.status_code == 422:
        assert client.get("/items/h/item").status_code == 404  # a refused write stores nothing
        return
    assert response.json()["metadata"] == value
    assert client.get("/items/h/item").json()["metadata"] == value
    page = client.get("/items", params={"offset": 24, "limit": 10}).json()["items"]
    assert [item["metadata"] for item in page if item["key"] == "h/item"] == [value]
    matches = client.post(
        "/match",
        files={"image": ("q.jpg", query_jpeg[1], "image/jpeg")},
        data={"candidates": ["h/item", query_jpeg[0]]},
    )
    assert matches.status_code == 200, matches.text
    assert [m["metadata"] for m in matches.json()["matches"] if m["key"] == "h/item"] == [value]
    assert client.delete("/items/h/item").status_code == 200
