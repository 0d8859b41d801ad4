"""POST /compare: a score and a verdict, at the model's calibrated threshold when it has one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from lookalike.evaluation.verification import calibrate, write_calibration
from lookalike.index.store import IndexStore
from lookalike.models.bundle import ModelBundle, load_bundle, save_bundle
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings


@pytest.fixture
def uncalibrated(bundle: ModelBundle, tmp_path: Path) -> ModelBundle:
    """A copy of the default model without calibration.json (even if the shipped one has one)."""
    save_bundle(bundle.net, tmp_path / "model")
    return load_bundle(tmp_path / "model")


@pytest.fixture
def calibrated(uncalibrated: ModelBundle) -> ModelBundle:
    """The copy with a calibration.json written by the evaluation code, loaded back from disk."""
    rng = np.random.default_rng(0)
    calibration = calibrate(
        rng.normal(0.7, 0.1, 100),
        rng.normal(0.3, 0.1, 10_000),
        0.01,
        uncalibrated,
        {"split": "val"},
    )
    write_calibration(uncalibrated, calibration)
    return load_bundle(uncalibrated.path)


def _client(settings: Settings, model: ModelBundle) -> Iterator[TestClient]:
    store = IndexStore.open(settings.index)
    state = ServiceState(settings, Embedder(model), store)
    with TestClient(create_app(settings, state)) as test_client:
        yield test_client
    store.close()


@pytest.fixture
def uncalibrated_client(settings: Settings, uncalibrated: ModelBundle) -> Iterator[TestClient]:
    yield from _client(settings, uncalibrated)


@pytest.fixture
def calibrated_client(settings: Settings, calibrated: ModelBundle) -> Iterator[TestClient]:
    yield from _client(settings, calibrated)


def test_an_uncalibrated_model_uses_the_flagged_default(
    uncalibrated_client: TestClient, settings: Settings, query_jpeg: tuple[str, bytes]
) -> None:
    _, data = query_jpeg
    response = uncalibrated_client.post(
        "/compare",
        files={"image_a": ("a.jpg", data, "image/jpeg"), "image_b": ("b.jpg", data, "image/jpeg")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["score"] == pytest.approx(1.0, abs=1e-4) and body["same"] is True
    assert body["calibrated"] is False and body["calibration"] is None
    assert body["threshold"] == settings.compare_threshold and body["target_far"] is None
    assert body["model"]["fingerprint"] and body["took_ms"] > 0


def test_keys_and_a_mix_of_key_and_upload(
    client: TestClient, settings: Settings, query_jpeg: tuple[str, bytes]
) -> None:
    key, data = query_jpeg
    other = next(item["key"] for item in client.get("/items").json()["items"] if item["key"] != key)
    store = IndexStore.open(settings.index)
    expected = float(store.vectors([key])[0] @ store.vectors([other])[0])
    store.close()
    by_keys = client.post("/compare", data={"key_a": key, "key_b": other}).json()
    assert by_keys["score"] == pytest.approx(expected, abs=1e-5)
    assert by_keys["same"] is (by_keys["verdict_score"] >= by_keys["threshold"])
    mixed = client.post(
        "/compare", data={"key_b": other}, files={"image_a": ("a.jpg", data, "image/jpeg")}
    ).json()
    assert mixed["score"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize(
    ("data", "files", "status", "text"),
    [
        ({}, {}, 422, "exactly one of 'image_a' or 'key_a'"),
        ({"key_a": "left/x"}, {}, 422, "exactly one of 'image_b' or 'key_b'"),
        ({"key_a": "left/nope", "key_b": "right/gone"}, {}, 404, "'left/nope'"),
        ({"key_b": "x"}, {"image_a": ("a.jpg", b"", "image/jpeg")}, 400, "empty"),
    ],
)
def test_bad_requests(client: TestClient, data: dict, files: dict, status: int, text: str) -> None:
    response = client.post("/compare", data=data, files=files or None)
    assert response.status_code == status, response.text
    assert text in response.json()["detail"]


def test_bad_uploads_name_the_field(client: TestClient, query_jpeg: tuple[str, bytes]) -> None:
    key, data = query_jpeg
    for name, body, status in [("text.txt", b"hello", 415), ("cut.jpg", data[:300], 422)]:
        response = client.post(
            "/compare", data={"key_a": key}, files={"image_b": (name, body, "image/jpeg")}
        )
        assert response.status_code == status, response.text
        assert response.json()["detail"].startswith("upload 'image_b': ")


def test_a_calibrated_model_uses_its_threshold(
    calibrated_client: TestClient, calibrated: ModelBundle, query_jpeg: tuple[str, bytes]
) -> None:
    key, _ = query_jpeg
    body = calibrated_client.post("/compare", data={"key_a": key, "key_b": key}).json()
    assert body["calibrated"] is True and body["target_far"] == 0.01
    assert body["threshold"] == pytest.approx(calibrated.calibration["threshold"])
    assert 0.4 < body["threshold"] < 0.7
    assert body["calibration"]["measured_on"]["split"] == "val"


def _pair_files(demo_dir: Path, demo_pairs: list[tuple[str, str]]) -> tuple[list[Path], dict]:
    left, right = demo_pairs[0]
    paths = [demo_dir / "left" / f"{left}.jpg", demo_dir / "right" / f"{right}.jpg"]
    return paths, {f"image_{side}": (path.name, path.read_bytes(), "image/jpeg")
                   for side, path in zip("ab", paths, strict=True)}


def test_a_hubness_entry_judges_the_corrected_cosine(
    accurate_client: TestClient, demo_dir: Path, demo_pairs: list[tuple[str, str]],
    cache_dir: Path
) -> None:
    """The accurate model's calibration corrects hubness: verdict_score is the cosine minus
    half of each image's mean cosine to its k nearest cohort vectors (computed here from the
    cohort file), judged at the entry's own threshold; score stays the cosine."""
    from lookalike.models.cohort import Cohort
    from lookalike.models.resolve import resolve_model

    paths, files = _pair_files(demo_dir, demo_pairs)
    body = accurate_client.post("/compare", files=files).json()
    model = resolve_model("accurate", cache_dir)
    embedder = Embedder(model)
    a, b = embedder.embed_arrays(np.stack([embedder.load_file(p)[0] for p in paths]))
    entry = model.calibration["hubness"]
    cohort = Cohort.load(model.path, model.fingerprint, embedder.dim).vectors
    hubs = [np.sort(cohort @ v)[-entry["k"]:].mean() for v in (a, b)]
    assert body["score"] == pytest.approx(float(a @ b), abs=1e-4)
    assert body["verdict_score"] == pytest.approx(float(a @ b) - 0.5 * sum(hubs), abs=1e-4)
    assert body["threshold"] == entry["threshold"] != model.calibration["threshold"]
    assert body["same"] is (body["verdict_score"] >= body["threshold"])
    assert body["calibration"]["k"] == entry["k"] and body["calibration"]["auc_gain"] > 0


def test_rerank_judges_the_calibrated_pair_score(
    accurate_client: TestClient, demo_dir: Path, demo_pairs: list[tuple[str, str]],
    cache_dir: Path
) -> None:
    """rerank=true: rerank_score is the re-ranker's pair score of the two files (computed here),
    score their cosine, and the verdict is the pair score against its own threshold."""
    from lookalike.models.rerank import reranker_for
    from lookalike.models.resolve import resolve_model

    paths, files = _pair_files(demo_dir, demo_pairs)
    response = accurate_client.post("/compare", data={"rerank": "true"}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    embedder = Embedder(resolve_model("accurate", cache_dir))
    reranker = reranker_for(embedder, cache_dir)
    a, b = reranker.describe(np.stack([embedder.load_file(p)[0] for p in paths]))
    expected, verification = reranker.pair_score(a, b)
    assert body["rerank_score"] == pytest.approx(expected, abs=1e-4)
    assert body["score"] == pytest.approx(float(a[:embedder.dim] @ b[:embedder.dim]), abs=1e-4)
    assert body["threshold"] == verification.threshold != embedder.bundle.calibration["threshold"]
    assert body["same"] == (expected >= verification.threshold) and body["calibrated"]
    assert body["verdict_score"] == body["rerank_score"]
    assert body["calibration"]["auc_gain"] > 0
    plain = accurate_client.post("/compare", files=files).json()
    assert plain["rerank_score"] is None and plain["score"] == pytest.approx(body["score"],
                                                                             abs=0.05)


def test_rerank_refuses_keys_and_models_without_one(
    client: TestClient, accurate_client: TestClient, demo_dir: Path,
    demo_pairs: list[tuple[str, str]]
) -> None:
    _, files = _pair_files(demo_dir, demo_pairs)
    response = accurate_client.post("/compare", data={"rerank": "true", "key_b": "x"},
                                    files={"image_a": files["image_a"]})
    assert response.status_code == 422 and "both images uploaded" in response.json()["detail"]
    response = client.post("/compare", data={"rerank": "true"}, files=files)
    assert response.status_code == 422 and "no measured re-ranker" in response.json()["detail"]
