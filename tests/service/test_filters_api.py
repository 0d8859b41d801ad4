"""Filters, min_score and exclude through POST /match, POST /rank and ``lookalike search``:
the answers pass the filter and still hold k matches, and bad filters are a 422 / exit 2 with
the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings


def _tag(path: Path, fingerprint: str) -> list[str]:
    """Give the store's items metadata: side (left/right) and n (0.. in key order)."""
    store = IndexStore.open(path, model_fingerprint=fingerprint, background=False)
    keys = sorted(store.keys())
    store.add(keys, store.vectors(keys), replace=True,
              thumbnails=[store.thumbnail(key) for key in keys],
              metadata=[{"side": key.split("/")[0], "n": i} for i, key in enumerate(keys)])
    store.save()
    store.close()
    return keys


@pytest.fixture
def tagged(settings: Settings, embedder: Embedder) -> Iterator[tuple[TestClient, list[str]]]:
    keys = _tag(settings.index, embedder.fingerprint)
    store = IndexStore.open(settings.index, model_fingerprint=embedder.fingerprint)
    with TestClient(create_app(settings, ServiceState(settings, embedder, store))) as client:
        yield client, keys
    store.close()


def test_match_filter_returns_k_passing_items(tagged) -> None:
    client, keys = tagged
    where = json.dumps({"side": "right", "n": {"gte": 14}})
    response = client.post("/match", data={"query_key": "left/" + keys[0].split("/")[1],
                                           "k": 5, "where": where})
    assert response.status_code == 200, response.text
    matches = response.json()["matches"]
    assert len(matches) == 5  # 10 items pass (n 14..23 are all right/): k of them come back
    assert all(m["metadata"]["side"] == "right" and m["metadata"]["n"] >= 14 for m in matches)
    assert [m["rank"] for m in matches] == [1, 2, 3, 4, 5]


def test_match_min_score_and_exclude(tagged, query_jpeg: tuple[str, bytes]) -> None:
    client, _ = tagged
    key, data = query_jpeg
    plain = client.post("/match", files={"image": ("q.jpg", data)}, data={"k": 10}).json()
    floor = plain["matches"][3]["score"]
    kept = client.post("/match", files={"image": ("q.jpg", data)},
                       data={"k": 10, "min_score": floor, "exclude": [key]}).json()["matches"]
    assert [m["key"] for m in kept] == [m["key"] for m in plain["matches"][:4] if m["key"] != key]
    assert all(m["score"] >= floor for m in kept)


def test_match_filter_applies_to_candidates(tagged) -> None:
    client, keys = tagged
    candidates = keys[:4] + keys[-4:]  # four left/, four right/
    response = client.post("/match", data={"query_key": keys[0], "candidates": candidates,
                                           "where": '{"side": "right"}'})
    assert response.status_code == 200, response.text
    assert sorted(m["key"] for m in response.json()["matches"]) == sorted(keys[-4:])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"where": "{side: right}"}, "not valid JSON"),
        ({"where": '{"n": {"gte": "ten"}}'}, "compares numbers"),
        ({"where": '{"n": {"near": 3}}'}, "unknown operator"),
        ({"where": '{"added": {"gte": "yesterday"}}'}, "ISO date"),
        ({"min_score": "1.5"}, "less than or equal to 1"),
    ],
)
def test_match_bad_filters_are_422(tagged, data: dict, message: str) -> None:
    client, keys = tagged
    response = client.post("/match", data={"query_key": keys[0], **data})
    assert response.status_code == 422
    assert message in json.dumps(response.json()["detail"])


def test_rank_filter_and_min_score(tagged) -> None:
    client, keys = tagged
    candidates = keys[:3] + keys[-3:]
    body = {"queries": [
        {"id": "f", "query": keys[0], "candidates": candidates, "where": {"side": "right"}},
        {"id": "m", "query": keys[0], "candidates": candidates, "min_score": 0.99},
    ]}
    response = client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    filtered, floored = response.json()["results"]
    assert sorted(c["key"] for c in filtered["ranked"]) == sorted(keys[-3:])
    assert {c["position"] for c in filtered["ranked"]} == {3, 4, 5}  # positions in the request
    assert [c["key"] for c in floored["ranked"]] == [keys[0]]  # only itself scores >= 0.99


def test_rank_bad_filter_is_422(tagged) -> None:
    client, keys = tagged
    body = {"queries": [{"query": keys[0], "candidates": keys[1:3], "where": {"n": {"lt": []}}}]}
    response = client.post("/rank", json=body)
    assert response.status_code == 422
    assert "compares numbers" in json.dumps(response.json()["detail"])


def test_cli_search_where_min_score_exclude(run, store_copy: Path, embedder: Embedder,
                                            small_image_dir: Path) -> None:
    keys = _tag(store_copy, embedder.fingerprint)
    query = sorted((small_image_dir / "left").glob("*.jpg"))[0]
    result = run("search", query, "--index", store_copy, "-k", "4", "--json",
                 "--where", "side=right", "--where", "n>=16")
    assert result.exit_code == 0, result.output
    found = [m["key"] for m in json.loads(result.output)]
    assert len(found) == 4 and set(found) <= set(keys[16:])
    plain = json.loads(run("search", query, "--index", store_copy, "-k", "3", "--json").output)
    floor = (plain[0]["score"] + plain[1]["score"]) / 2  # between the best and the second
    result = run("search", query, "--index", store_copy, "-k", "3", "--json",
                 "--min-score", floor)
    assert [m["key"] for m in json.loads(result.output)] == [plain[0]["key"]]
    result = run("search", query, "--index", store_copy, "-k", "3", "--json",
                 "--min-score", floor, "--exclude", plain[0]["key"])
    assert json.loads(result.output) == []


@pytest.mark.parametrize(
    ("where", "message"),
    [("side", "error: --where 'side': expected FIELD=VALUE"),
     ("n>=ten", "error: filter 'n': 'gte' compares numbers")],
)
def test_cli_bad_where_is_one_line_exit_2(run, small_store_path: Path, small_image_dir: Path,
                                          where: str, message: str) -> None:
    query = sorted((small_image_dir / "left").glob("*.jpg"))[0]
    result = run("search", query, "--index", small_store_path, "--where", where)
    assert result.exit_code == 2
    assert result.output.startswith(message) and result.output.count("\n") == 1
