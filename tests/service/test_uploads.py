"""Uploads that are two things at once (polyglots), over HTTP.

The policy, end to end: the decoder trusts only the bytes it decodes — the format comes from
the magic bytes, never from the file name or the content type the client claims; an image
with a payload hidden after its end or in a comment is the same image (same embedding, same
matches); anything that is not an image of an allowed format is a 415; and nothing the client
sent is stored or served back raw: ``POST /items`` keeps a thumbnail re-encoded from the
decoded pixels and the upload's sha256, never the upload itself.
"""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
from fastapi.testclient import TestClient
from PIL import Image

PAYLOAD = b"<html><script>alert('polyglot')</script></html>"


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """``jpeg`` with a COM segment right after SOI: the same compressed pixels."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text + jpeg[2:]


def zip_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("index.html", PAYLOAD)
    return buffer.getvalue()


@pytest.fixture
def polyglot(query_jpeg: tuple[str, bytes]) -> bytes:
    """An indexed JPEG that is also a ZIP and an HTML page, with a script in its comment."""
    return with_comment(query_jpeg[1], PAYLOAD) + zip_archive() + PAYLOAD


def matches(client: TestClient, data: bytes) -> list[tuple[str, float]]:
    response = client.post("/match", files={"image": ("q.jpg", data, "image/jpeg")},
                           data={"k": "5"})
    assert response.status_code == 200, response.text
    return [(m["key"], m["score"]) for m in response.json()["matches"]]


def test_a_polyglot_matches_exactly_like_the_clean_image(
    client: TestClient, query_jpeg: tuple[str, bytes], polyglot: bytes
) -> None:
    assert zipfile.is_zipfile(io.BytesIO(polyglot))
    clean = matches(client, query_jpeg[1])
    assert clean[0][0] == query_jpeg[0]
    assert matches(client, polyglot) == clean


def test_items_keep_a_reencoded_thumbnail_never_the_upload(
    client: TestClient, polyglot: bytes
) -> None:
    response = client.post("/items", files={"image": ("evil.jpg", polyglot, "image/jpeg")},
                           data={"key": "poly", "metadata": '{"source": "test"}'})
    assert response.status_code == 201, response.text
    assert b"script" not in response.content

    thumbnail = client.get(response.json()["thumbnail_url"])
    assert thumbnail.status_code == 200
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.headers["x-content-type-options"] == "nosniff"
    served = thumbnail.content
    assert served.startswith(b"\xff\xd8") and served != polyglot
    assert b"script" not in served and b"PK\x03\x04" not in served
    with Image.open(io.BytesIO(served)) as image:
        assert image.format == "JPEG" and max(image.size) <= 192
        assert "comment" not in image.info


@pytest.mark.parametrize(
    ("name", "data", "claimed"),
    [
        ("cat.jpg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>', "image/jpeg"),
        ("cat.png", PAYLOAD, "image/png"),
        ("cat.jpg", b"%PDF-1.7\n%\xff\xd8\xff\xe0 a JPEG follows\n", "image/jpeg"),
        ("cat.gif", zip_archive(), "image/gif"),
    ],
    ids=["svg-as-jpeg", "html-as-png", "pdf-as-jpeg", "zip-as-gif"],
)
def test_non_images_with_image_names_and_types_are_415(
    client: TestClient, query_jpeg: tuple[str, bytes], name: str, data: bytes, claimed: str
) -> None:
    """The PDF case carries a whole JPEG after its header: still a PDF, still refused."""
    if data.startswith(b"%PDF"):
        data += query_jpeg[1]
    upload = {"image": (name, data, claimed)}
    for response in (
        client.post("/match", files=upload),
        client.post("/items", files=upload, data={"key": "nope"}),
    ):
        assert response.status_code == 415, response.text
        assert "supported format" in response.json()["detail"]
    assert client.get("/items/nope").status_code == 404
