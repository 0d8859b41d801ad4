"""POST /rank over a real model and store: keys, uploads, assignment, and every 4xx."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings


@pytest.fixture
def keys(client: TestClient) -> tuple[list[str], list[str]]:
    """(left keys, right keys) of the indexed small set, in pair order."""
    found = [item["key"] for item in client.get("/items", params={"limit": 100}).json()["items"]]
    return sorted(k for k in found if k.startswith("left/")), sorted(
        k for k in found if k.startswith("right/")
    )


def test_keys_only_json_batch(client: TestClient, settings: Settings, keys) -> None:
    lefts, rights = keys
    body = {
        "queries": [
            {"id": "first", "query": lefts[0], "candidates": rights[:6]},
            {"query": {"key": lefts[1]}, "candidates": [{"key": k} for k in rights[3:8]], "k": 2},
        ]
    }
    response = client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["id"] == "first" and first["query"] == {"key": lefts[0], "upload": None}
    assert len(first["ranked"]) == 6 and len(second["ranked"]) == 2
    assert [c["rank"] for c in first["ranked"]] == list(range(1, 7))
    store = IndexStore.open(settings.index)
    expected = store.vectors(rights[:6]) @ store.vectors([lefts[0]])[0]
    store.close()
    for candidate in first["ranked"]:
        assert rights[candidate["position"]] == candidate["key"]
        assert candidate["score"] == pytest.approx(expected[candidate["position"]], abs=1e-5)
    assert [c["position"] for c in first["ranked"]] == list(np.argsort(-expected, kind="stable"))
    assert response.json()["embedded"] == 0


def test_uploads_are_embedded_once_and_mix_with_keys(
    client: TestClient, query_jpeg: tuple[str, bytes], keys
) -> None:
    key, data = query_jpeg
    lefts, rights = keys
    spec = {
        "queries": [
            {"query": {"upload": "q"}, "candidates": [*rights[:4], key]},
            {"query": lefts[0], "candidates": [{"upload": "q"}, rights[5]]},
        ]
    }
    response = client.post(
        "/rank",
        data={"spec": json.dumps(spec)},
        files={"q": ("q.jpg", data, "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["embedded"] == 1
    best = body["results"][0]["ranked"][0]
    assert best["key"] == key and best["score"] == pytest.approx(1.0, abs=1e-3)
    uploaded = [c for c in body["results"][1]["ranked"] if c["upload"] == "q"]
    assert uploaded and uploaded[0]["position"] == 0


def test_assign_picks_one_candidate_per_query_one_to_one(client: TestClient, keys) -> None:
    lefts, rights = keys
    queries = [{"query": left, "candidates": rights[:4]} for left in lefts[:4]]
    plain = client.post("/rank", json={"queries": queries}).json()["results"]
    body = client.post("/rank", json={"queries": queries, "assign": True}).json()["results"]
    picks = [result["ranked"][0] for result in body]
    assert all(p["assigned"] for p in picks)
    assert len({p["key"] for p in picks}) == 4, "no candidate is assigned twice"
    assert sum(c["assigned"] for r in body for c in r["ranked"]) == 4
    for before, after in zip(plain, body, strict=True):
        scores = {c["key"]: c["score"] for c in before["ranked"]}
        assert all(c["score"] == pytest.approx(scores[c["key"]]) for c in after["ranked"])


@pytest.fixture
def tight_client(settings: Settings, embedder: Embedder) -> Iterator[TestClient]:
    tight = settings.model_copy(
        update={"max_rank_queries": 2, "max_candidates": 3, "max_rank_uploads": 2}
    )
    store = IndexStore.open(tight.index)
    with TestClient(create_app(tight, ServiceState(tight, embedder, store))) as test_client:
        yield test_client
    store.close()


def test_limits(tight_client: TestClient, keys) -> None:
    lefts, rights = keys
    three = {"queries": [{"query": q, "candidates": rights[:2]} for q in lefts[:3]]}
    response = tight_client.post("/rank", json=three)
    assert response.status_code == 422 and "3 queries; the limit is 2" in response.json()["detail"]
    many = {"queries": [{"query": lefts[0], "candidates": rights[:4]}]}
    response = tight_client.post("/rank", json=many)
    assert response.status_code == 422 and "query 0 has 4 candidates" in response.json()["detail"]
    files = {f"u{i}": (f"{i}.jpg", b"x", "image/jpeg") for i in range(3)}
    response = tight_client.post("/rank", data={"spec": "{}"}, files=files)
    assert response.status_code == 400 and "Too many files" in response.json()["detail"]


def test_unknown_keys_are_all_listed(client: TestClient, keys) -> None:
    lefts, rights = keys
    body = {"queries": [{"query": "left/nope", "candidates": [rights[0], "right/gone"]}]}
    response = client.post("/rank", json=body)
    assert response.status_code == 404
    assert (
        "'left/nope'" in response.json()["detail"] and "'right/gone'" in response.json()["detail"]
    )


@pytest.mark.parametrize(
    ("kwargs", "status", "text"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "json"),
        ({"json": {"queries": []}}, 422, "at least 1"),
        ({"json": {"queries": [{"query": "", "candidates": ["b"]}]}}, 422, "at least 1 character"),
        ({"json": {"queries": [{"query": "a", "candidates": []}]}}, 422, "at least 1"),
        (
            {"json": {"queries": [{"query": {"key": "a", "upload": "b"}, "candidates": ["c"]}]}},
            422,
            "exactly one of 'key' or 'upload'",
        ),
        ({"json": {"queries": [{"query": "a", "candidates": ["b"]}], "extra": 1}}, 422, "extra"),
        (
            {"content": b"queries", "headers": {"content-type": "text/plain"}},
            415,
            "application/json",
        ),
        (
            {"data": {"other": "x"}, "files": {"q": ("q.jpg", b"x", "image/jpeg")}},
            422,
            "unexpected text field 'other'",
        ),
        ({"data": {}, "files": {"q": ("q.jpg", b"x", "image/jpeg")}}, 422, "'spec' field"),
    ],
)
def test_malformed_requests(client: TestClient, kwargs: dict, status: int, text: str) -> None:
    response = client.post("/rank", **kwargs)
    assert response.status_code == status, response.text
    assert text in json.dumps(response.json()["detail"])


def _spec(query: dict, candidates: list) -> str:
    return json.dumps({"queries": [{"query": query, "candidates": candidates}]})


def test_upload_problems(client: TestClient, query_jpeg: tuple[str, bytes], keys) -> None:
    key, data = query_jpeg
    _, rights = keys
    jpeg = ("q.jpg", data, "image/jpeg")
    cases = [
        (_spec({"upload": "q"}, rights[:2]), {}, 422, "not sent: ['q']"),
        (_spec({"key": key}, rights[:2]), {"q": jpeg}, 422, "not named by the spec: ['q']"),
        (_spec({"upload": "q"}, rights[:2]), {"q": ("q.jpg", b"", "image/jpeg")}, 400, "empty"),
        (
            _spec({"upload": "q"}, rights[:2]),
            {"q": ("q.txt", b"hello", "text/plain")},
            415,
            "upload 'q': not an image",
        ),
        (
            _spec({"upload": "q"}, rights[:2]),
            {"q": ("q.jpg", data[:300], "image/jpeg")},
            422,
            "upload 'q'",
        ),
    ]
    for spec, files, status, text in cases:
        response = client.post("/rank", data={"spec": spec}, files=files or None)
        assert response.status_code == status, (text, response.text)
        assert text in response.json()["detail"]


def test_openapi_documents_both_body_shapes(client: TestClient) -> None:
    body = client.get("/openapi.json").json()["paths"]["/rank"]["post"]["requestBody"]
    assert set(body["content"]) == {"application/json", "multipart/form-data"}
    schema = body["content"]["application/json"]["schema"]
    assert "queries" in schema["properties"] and "$defs" not in json.dumps(schema)


def test_assign_without_scipy_is_a_clear_501(
    client: TestClient, keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slim serving image has no scipy: plain ranking works, assignment says why not."""
    lefts, rights = keys
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    queries = [{"query": left, "candidates": rights[:3]} for left in lefts[:2]]
    assert client.post("/rank", json={"queries": queries}).status_code == 200
    response = client.post("/rank", json={"queries": queries, "assign": True})
    assert response.status_code == 501 and "needs scipy" in response.json()["detail"]


def _upload_spec(demo_dir, demo_pairs, count: int) -> tuple[dict, dict, list]:
    lefts = [left for left, _ in demo_pairs[:count]]
    rights = [right for _, right in demo_pairs[:count]]
    files = {f"c{i}": (f"{r}.jpg", (demo_dir / "right" / f"{r}.jpg").read_bytes(), "image/jpeg")
             for i, r in enumerate(rights)}
    files["q"] = ("q.jpg", (demo_dir / "left" / f"{lefts[0]}.jpg").read_bytes(), "image/jpeg")
    spec = {"rerank": True, "queries": [
        {"query": {"upload": "q"}, "candidates": [{"upload": f"c{i}"} for i in range(count)]}]}
    paths = [demo_dir / "left" / f"{lefts[0]}.jpg", *(demo_dir / "right" / f"{r}.jpg"
                                                       for r in rights)]
    return spec, files, paths


def test_rerank_ranks_uploads_by_the_models_reranker(
    accurate_client: TestClient, demo_dir, demo_pairs, cache_dir
) -> None:
    """rerank=true: each candidate's rerank_score is the re-ranker's (computed here from the
    same files), they are ranked by it, and score is the cosine."""
    from lookalike.models.rerank import reranker_for
    from lookalike.models.resolve import resolve_model

    spec, files, paths = _upload_spec(demo_dir, demo_pairs, 5)
    response = accurate_client.post("/rank", data={"spec": json.dumps(spec)}, files=files)
    assert response.status_code == 200, response.text
    ranked = response.json()["results"][0]["ranked"]
    embedder = Embedder(resolve_model("accurate", cache_dir))
    reranker = reranker_for(embedder, cache_dir)
    described = reranker.describe(np.stack([embedder.load_file(p)[0] for p in paths]))
    expected = reranker.scores(described[0], described[1:])
    cosines = reranker.cosines(described[0], described[1:])
    assert [c["position"] for c in ranked] == list(np.argsort(-expected, kind="stable"))
    for candidate in ranked:
        assert candidate["rerank_score"] == pytest.approx(expected[candidate["position"]],
                                                          abs=1e-4)
        assert candidate["score"] == pytest.approx(cosines[candidate["position"]], abs=1e-4)


def test_rerank_refuses_keys_and_models_without_one(
    client: TestClient, accurate_client: TestClient, keys, demo_dir, demo_pairs
) -> None:
    lefts, rights = keys
    body = {"rerank": True, "queries": [{"query": lefts[0], "candidates": rights[:3]}]}
    response = accurate_client.post("/rank", json=body)
    assert response.status_code == 422 and "every query and candidate uploaded" in \
        response.json()["detail"]
    spec, files, _ = _upload_spec(demo_dir, demo_pairs, 2)
    response = client.post("/rank", data={"spec": json.dumps(spec)}, files=files)
    assert response.status_code == 422 and "no measured re-ranker" in response.json()["detail"]
