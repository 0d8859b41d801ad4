"""POST /explain, /match explain=true and ``lookalike explain``: real model (torch engine, as
the other service tests), real store, real images."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import Result


def _check_exact(explanation: dict) -> None:
    assert explanation["method"] == "exact" and explanation["exact"] is True
    total = explanation["constant"] + sum(map(sum, explanation["query_map"])) + sum(
        map(sum, explanation["match_map"]))
    assert total == pytest.approx(explanation["score"], abs=1e-4)
    grid = explanation["grid"]
    assert len(explanation["query_map"]) == grid and len(explanation["match_map"][0]) == grid
    contributions = [pair["contribution"] for pair in explanation["pairs"]]
    assert contributions == sorted(contributions, reverse=True) and len(contributions) == 8


def _png(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix):])))


def test_explain_two_uploads_matches_compare(client: TestClient, small_image_dir: Path) -> None:
    a, b = (sorted((small_image_dir / side).glob("*.jpg"))[1] for side in ("left", "right"))
    files = {"image_a": ("a.jpg", a.read_bytes(), "image/jpeg"),
             "image_b": ("b.jpg", b.read_bytes(), "image/jpeg")}
    response = client.post("/explain", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    explanation = body["explanation"]
    _check_exact(explanation)
    assert explanation["engine"] == "torch" and body["model"]["engine"] == "torch"
    assert explanation["sources"] == {"query": "upload", "match": "upload"}
    compare = client.post("/compare", files=files).json()
    assert explanation["score"] == pytest.approx(compare["score"], abs=1e-4)
    overlay = _png(explanation["query_overlay"])
    assert overlay.mode == "RGBA" and overlay.size == (224, 224)


def test_explain_keys_and_errors(client: TestClient, query_jpeg: tuple[str, bytes]) -> None:
    key, data = query_jpeg
    other = client.get("/items", params={"limit": 2}).json()["items"][1]["key"]
    response = client.post("/explain", data={"key_a": key, "key_b": other, "overlays": "false"})
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    _check_exact(explanation)
    assert explanation["sources"] == {"query": "thumbnail", "match": "thumbnail"}
    assert explanation["query_overlay"] is None
    upload = {"image_a": ("q.jpg", data, "image/jpeg")}
    cases = [
        ({}, {"key_b": other}, 422),                                     # side a missing
        (upload, {"key_a": key, "key_b": other}, 422),                   # side a twice
        (upload, {"key_b": "no/such-key"}, 404),
        ({"image_a": ("e.jpg", b"", "image/jpeg")}, {"key_b": other}, 400),
        ({"image_a": ("t.png", b"just text", "image/png")}, {"key_b": other}, 415),
    ]
    for files, data_fields, status in cases:
        answer = client.post("/explain", files=files or None, data=data_fields)
        assert answer.status_code == status, (data_fields, answer.text)
        assert "detail" in answer.json()


def test_match_explains_the_top_matches(
    client: TestClient, query_jpeg: tuple[str, bytes]
) -> None:
    key, data = query_jpeg
    response = client.post("/match", files={"image": ("q.jpg", data, "image/jpeg")},
                           data={"k": 5, "explain": "true"})
    assert response.status_code == 200, response.text
    matches = response.json()["matches"]
    assert [m["explanation"] is not None for m in matches] == [True] * 3 + [False] * 2
    for match in matches[:3]:
        _check_exact(match["explanation"])
        assert match["explanation"]["sources"] == {"query": "upload", "match": "thumbnail"}
        # The match is explained from its thumbnail: close to, not exactly, the index's score.
        assert match["explanation"]["score"] == pytest.approx(match["score"], abs=0.05)
    plain = client.post("/match", data={"query_key": key, "k": 2}).json()["matches"]
    assert all(m["explanation"] is None for m in plain)


def test_key_without_thumbnail_is_a_clear_error(
    client: TestClient, small_image_dir: Path
) -> None:
    state = client.app.state.lookalike
    image = sorted((small_image_dir / "left").glob("*.jpg"))[3]
    state.store.add(["bare/one"], state.embedder.embed_bytes(image.read_bytes())[None])
    response = client.post("/explain", data={"key_a": "bare/one", "key_b": "bare/one"})
    assert response.status_code == 422 and "thumbnail" in response.json()["detail"]


def test_cli_explain_writes_a_picture(
    run: Callable[..., Result], small_image_dir: Path, tmp_path: Path
) -> None:
    a, b = (sorted((small_image_dir / side).glob("*.jpg"))[0] for side in ("left", "right"))
    out = tmp_path / "pair.png"
    result = run("explain", str(a), str(b), "--out", str(out), "--engine", "torch")
    assert result.exit_code == 0, result.output
    assert "exact" in result.output and "<->" in result.output
    picture = Image.open(out)
    assert picture.size[0] > 2 * picture.size[1] * 0.9
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    result = run("explain", str(bad), str(b), "--engine", "torch")
    assert result.exit_code == 2 and result.output.startswith("error:")
