"""GET /duplicates: groups of planted near-duplicates, paged by a cursor that stays stable
while images are added."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings

API_KEY = "dup-test-key"


@pytest.fixture
def dup_settings(planted_store_path: Path, tmp_path: Path, cache_dir: Path) -> Settings:
    target = tmp_path / "planted"
    shutil.copytree(planted_store_path, target)
    return Settings(index=target, cache_dir=cache_dir, api_keys=[API_KEY])


@pytest.fixture
def dup_client(dup_settings: Settings, embedder: Embedder) -> Iterator[TestClient]:
    store = IndexStore.open(dup_settings.index, model_fingerprint=embedder.fingerprint)
    with TestClient(create_app(dup_settings, ServiceState(dup_settings, embedder, store))) as c:
        yield c
    store.close()


def walk(client: TestClient, limit: int, between=None) -> list[dict]:  # noqa: ANN001
    groups, after, pages = [], None, 0
    while True:
        params = {"limit": limit, **({"after": after} if after else {})}
        response = client.get("/duplicates", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        groups += page["groups"]
        after, pages = page["next_after"], pages + 1
        if after is None:
            return groups
        if between is not None:
            between(pages)


def mirrored(path: Path) -> bytes:
    buffer = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def test_groups_hold_the_planted_copies(dup_client: TestClient, planted_set) -> None:
    page = dup_client.get("/duplicates", params={"limit": 200}).json()
    assert page["next_after"] is None and len(page["groups"]) >= 7
    for group in page["groups"]:
        keys = [item["key"] for item in group["items"]]
        assert group["anchor"] == keys[0]
        assert len({planted_set.groups[k] for k in keys}) == 1, keys  # one family per group
        assert all(k.startswith(("orig/", "copy/")) for k in keys)
        assert all(item["thumbnail_url"].startswith("/thumbnails/") for item in group["items"])
        assert group["score"] == min(pair["score"] for pair in group["pairs"])
    assert page["threshold"] > 0


def test_pages_cover_every_group_once(dup_client: TestClient) -> None:
    whole = dup_client.get("/duplicates", params={"limit": 200}).json()["groups"]
    assert [g["anchor"] for g in walk(dup_client, 3)] == [g["anchor"] for g in whole]


def test_pages_are_stable_while_images_are_added(
    dup_client: TestClient, planted_set, demo_dir: Path
) -> None:
    """Between pages, add a copy of an image in a group already shown and one in a group not
    yet shown, and a new original with its copy: every group that existed is seen once, the
    joined images appear in their groups, and the new group comes after all of them."""
    before = dup_client.get("/duplicates", params={"limit": 200}).json()["groups"]
    shown_first, later = before[0]["anchor"], before[-1]["anchor"]
    fresh = sorted((demo_dir / "right").glob("*.jpg"))
    fresh = next(p for p in fresh if f"partner/{p.stem}" not in planted_set.groups)
    additions = [
        ("added/early-copy", mirrored(planted_set.folder / f"{shown_first}.jpg")),
        ("added/late-copy", mirrored(planted_set.folder / f"{later}.jpg")),
        ("added/new", fresh.read_bytes()),
        ("added/new-copy", mirrored(fresh)),
    ]

    def add(pages: int) -> None:
        if pages == 1:
            for key, data in additions:
                response = dup_client.post("/items", data={"key": key},
                                           files={"image": (f"{key}.jpg", data, "image/jpeg")},
                                           headers={"X-API-Key": API_KEY})
                assert response.status_code in (200, 201), response.text

    seen = walk(dup_client, 2, between=add)
    anchors = [g["anchor"] for g in seen]
    assert len(anchors) == len(set(anchors))  # nothing repeated
    assert anchors[:len(before)] == [g["anchor"] for g in before]  # nothing skipped or moved
    members = {g["anchor"]: [i["key"] for i in g["items"]] for g in seen}
    assert "added/late-copy" in members[later]
    assert anchors[-1] == "added/new" and members["added/new"] == ["added/new", "added/new-copy"]


def test_removed_cursor_and_bad_threshold_are_clear_422(dup_client: TestClient) -> None:
    first = dup_client.get("/duplicates", params={"limit": 1}).json()
    cursor = first["next_after"]
    removed = dup_client.delete(f"/items/{cursor}", headers={"X-API-Key": API_KEY})
    assert removed.status_code == 200
    response = dup_client.get("/duplicates", params={"after": cursor})
    assert response.status_code == 422 and "first page" in response.json()["detail"]
    response = dup_client.get("/duplicates", params={"threshold": 2})
    assert response.status_code == 422 and "detail" in response.json()
    assert dup_client.get("/duplicates", params={"limit": 0}).status_code == 422


def test_a_stricter_threshold_finds_fewer_pairs(dup_client: TestClient) -> None:
    def pairs(threshold: float) -> int:
        page = dup_client.get("/duplicates", params={"limit": 200, "threshold": threshold})
        return sum(len(g["pairs"]) for g in page.json()["groups"])

    assert pairs(0.9) < pairs(0.2)
