"""Inference engines: every registered engine against the eager reference on real photos, the
engine setting through Embedder, create_app and the CLI, and the errors users see.

Conversions (ONNX export, int8 calibration) run once per session into the session's cache
directory and are shared by every test here.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from lookalike.models.bundle import ModelBundle, load_bundle, save_bundle
from lookalike.models.embedder import Embedder
from lookalike.models.engines import DEFAULT_ENGINE, ENGINES, EngineError
from lookalike.models.network import EmbeddingConfig, EmbeddingNet
from lookalike.service.app import create_app
from lookalike.service.cli import app as cli
from lookalike.service.settings import Settings

EngineFor = Callable[[str], Embedder]


@pytest.fixture(scope="session")
def photos(small_image_dir: Path) -> list[Path]:
    """12 real photos (look-alike pairs, 200x245 JPEGs)."""
    return sorted(small_image_dir.rglob("*.jpg"))[:12]


@pytest.fixture(scope="session")
def reference(embedder: Embedder, photos: list[Path]) -> np.ndarray:
    return np.concatenate([batch.vectors for batch in embedder.embed_files(photos, 8)])


@pytest.fixture(scope="session")
def engine_for(bundle: ModelBundle, cache_dir: Path) -> EngineFor:
    """``name -> Embedder`` for the default model, each built once per session."""
    made: dict[str, Embedder] = {}

    def get(name: str) -> Embedder:
        if name not in made:
            made[name] = Embedder(bundle, name, cache_dir=cache_dir)
        return made[name]

    return get


def embed(embedder: Embedder, paths: list[Path], batch_size: int = 5) -> np.ndarray:
    return np.concatenate([batch.vectors for batch in embedder.embed_files(paths, batch_size)])


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_engine_matches_the_reference_on_photos(
    name: str, engine_for: EngineFor, photos: list[Path], reference: np.ndarray
) -> None:
    vectors = embed(engine_for(name), photos)  # batches of 5: a ragged last batch too
    assert vectors.shape == reference.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    distance = 1.0 - (vectors * reference).sum(axis=1)
    assert distance.max() <= ENGINES[name].spec.tolerance, (name, distance.max())


@pytest.fixture(scope="session")
def headed_bundle(tmp_path_factory: pytest.TempPathFactory, bundle: ModelBundle) -> ModelBundle:
    """The default model's trunks under a fresh two-layer projection head (seeded), saved and
    loaded as a bundle: whatever the default model is, the export must carry a head."""
    torch.manual_seed(0)
    config = EmbeddingConfig(backbones=bundle.config.backbones, head=(256, 64))
    net = EmbeddingNet(config, pretrained=False)
    net.trunks.load_state_dict(bundle.net.trunks.state_dict())
    path = tmp_path_factory.mktemp("models") / "headed"
    save_bundle(net, path)
    return load_bundle(path)


def test_onnx_export_carries_the_projection_head(
    headed_bundle: ModelBundle, cache_dir: Path, photos: list[Path]
) -> None:
    expected = embed(Embedder(headed_bundle, "torch"), photos)
    vectors = embed(Embedder(headed_bundle, "onnx", cache_dir=cache_dir), photos)
    assert vectors.shape == (len(photos), 64)
    assert (1.0 - (vectors * expected).sum(axis=1)).max() <= ENGINES["onnx"].spec.tolerance


def test_conversion_is_cached_per_model(
    bundle: ModelBundle, cache_dir: Path, engine_for: EngineFor
) -> None:
    engine_for("onnx")
    files = {path: path.stat().st_mtime_ns for path in (cache_dir / "engines").iterdir()}
    assert cache_dir / "engines" / f"{bundle.fingerprint}.fp32.onnx" in files
    start = time.perf_counter()
    Embedder(bundle, "onnx", cache_dir=cache_dir)
    assert time.perf_counter() - start < 5.0  # loaded, not exported again
    assert {path: path.stat().st_mtime_ns for path in (cache_dir / "engines").iterdir()} == files


def test_unknown_engine_names_the_choices(bundle: ModelBundle) -> None:
    with pytest.raises(EngineError, match=r"unknown engine 'warp-drive'; choose one of .*onnx"):
        Embedder(bundle, "warp-drive")


@pytest.mark.parametrize("module", ["onnxruntime", "onnxscript"])
def test_missing_package_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, bundle: ModelBundle, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what a failed import looks like
    with pytest.raises(EngineError, match=f"engine 'onnx' needs .*pip install {module}"):
        Embedder(bundle, "onnx")


def test_settings_default_to_the_fast_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOKALIKE_ENGINE", raising=False)
    assert Settings().engine == DEFAULT_ENGINE
    monkeypatch.setenv("LOOKALIKE_ENGINE", "torch")
    assert Settings().engine == "torch"


def test_create_app_serves_with_the_chosen_engine(
    store_copy: Path, cache_dir: Path, engine_for: EngineFor, photos: list[Path]
) -> None:
    engine_for("onnx")  # exported once per session; the app only loads it
    settings = Settings(index=store_copy, cache_dir=cache_dir, engine="onnx")
    query = photos[0]
    with TestClient(create_app(settings)) as client:
        response = client.post("/match", files={"image": (query.name, query.read_bytes())})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["engine"] == "onnx"
    # The store holds torch vectors: the same photo through ONNX scores ~1 against itself.
    best = body["matches"][0]
    assert best["key"].endswith(query.stem) and best["score"] > 0.9999


def test_cli_honours_the_engine_option_and_default(
    monkeypatch: pytest.MonkeyPatch, small_image_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # any ONNX engine now fails loudly
    runner = CliRunner()
    env = {"LOOKALIKE_CACHE_DIR": str(cache_dir), "LOOKALIKE_ENGINE": None}

    def build(*extra: str, **more_env: str):
        args = ["index", "build", str(small_image_dir / "left"), "--out", str(tmp_path / "s")]
        return runner.invoke(cli, [*args, *extra], env={**env, **more_env})

    default = build()
    assert default.exit_code == 2
    assert default.output.strip().startswith(f"error: engine {DEFAULT_ENGINE!r} needs")
    chosen = build("--engine", "torch")
    assert chosen.exit_code == 0, chosen.output
    assert "12 added" in chosen.output
    from_env = build(LOOKALIKE_ENGINE="torch")
    assert from_env.exit_code == 0 and "12 unchanged" in from_env.output


def test_batched_files_match_single_uploads(embedder: Embedder, photos: list[Path]) -> None:
    """Files decode in a thread pool straight into a shared batch array; uploads one by one."""
    singles = np.stack([embedder.embed_bytes(path.read_bytes()) for path in photos[:6]])
    np.testing.assert_allclose(embed(embedder, photos[:6], batch_size=4), singles, atol=1e-5)


def test_a_bad_file_leaves_the_rest_of_its_batch_right(
    embedder: Embedder, photos: list[Path], reference: np.ndarray, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(photos[0].read_bytes()[:300])
    batches = list(embedder.embed_files([photos[0], bad, photos[1]], batch_size=3))
    assert len(batches) == 1 and batches[0].indices == [0, 2] and list(batches[0].errors) == [1]
    np.testing.assert_allclose(batches[0].vectors, reference[:2], atol=1e-5)


def test_preprocessing_is_the_textbook_normalisation(
    embedder: Embedder, photos: list[Path]
) -> None:
    """On an image already at the input size the resize is exact, which isolates the fast
    per-band normalisation: it must equal ``(x / 255 - mean) / std`` in CHW order."""
    pre = embedder.preprocessor
    image = Image.open(photos[0]).convert("RGB").crop((0, 0, pre.size, pre.size))
    expected = (np.asarray(image, np.float32) / 255.0 - np.array(pre.mean, np.float32)) / np.array(
        pre.std, np.float32
    )
    np.testing.assert_allclose(pre(image), expected.transpose(2, 0, 1), atol=1e-6)
    batch = pre.batch([image, image.convert("L")])  # other modes become RGB first
    assert batch.shape == (2, 3, pre.size, pre.size) and np.isfinite(batch).all()
