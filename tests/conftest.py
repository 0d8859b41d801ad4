"""Shared fixtures: the real default model, the bundled demo images, small real stores.

Everything here is real (offline ImageNet weights, FAISS, SQLite) and built once per session.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from lookalike.demo import DEMO_IMAGES
from lookalike.index.build import build_index
from lookalike.models.bundle import ModelBundle
from lookalike.models.embedder import Embedder
from lookalike.models.resolve import resolve_model

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO_IMAGES


@pytest.fixture(scope="session")
def demo_pairs(demo_dir: Path) -> list[tuple[str, str]]:
    with open(demo_dir / "pairs.csv", newline="") as handle:
        return [(row["left"], row["right"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory: pytest.TempPathFactory, demo_pairs: list[tuple[str, str]]) -> Path:
    """A pairs CSV of 30 real demo pairs (for training: 24 train, 6 held out)."""
    path = tmp_path_factory.mktemp("pairs-data") / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["left", "right"])
        writer.writerows(demo_pairs[:30])
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lookalike-cache")


@pytest.fixture(scope="session")
def bundle(cache_dir: Path) -> ModelBundle:
    return resolve_model(None, cache_dir)


@pytest.fixture(scope="session")
def embedder(bundle: ModelBundle) -> Embedder:
    return Embedder(bundle)


@pytest.fixture(scope="session")
def small_image_dir(
    tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> Path:
    """12 real look-alike pairs (24 images) in ``left/`` and ``right/``."""
    root = tmp_path_factory.mktemp("images")
    for side in ("left", "right"):
        (root / side).mkdir()
    for left, right in demo_pairs[:12]:
        shutil.copy(demo_dir / "left" / f"{left}.jpg", root / "left")
        shutil.copy(demo_dir / "right" / f"{right}.jpg", root / "right")
    return root


@pytest.fixture(scope="session")
def small_store_path(
    tmp_path_factory: pytest.TempPathFactory, small_image_dir: Path, embedder: Embedder
) -> Path:
    """A store of the 24 small images; tests that change a store copy it first."""
    path = tmp_path_factory.mktemp("stores") / "small"
    build_index(small_image_dir, path, embedder, progress=False)
    return path


@pytest.fixture
def store_copy(small_store_path: Path, tmp_path: Path) -> Path:
    target = tmp_path / "store"
    shutil.copytree(small_store_path, target)
    return target


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def planted_set(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path):  # noqa: ANN201
    """Near-duplicate test data: 8 demo originals with 2 edited copies each, their TLL
    look-alike partners and 4 unrelated images (36 images, generated from seed 0)."""
    from lookalike.evaluation.dedup_set import make_dedup_set

    return make_dedup_set(demo_dir / "pairs.csv", tmp_path_factory.mktemp("planted"), 8,
                          others=4, seed=0)


@pytest.fixture(scope="session")
def planted_store_path(
    tmp_path_factory: pytest.TempPathFactory, planted_set, embedder: Embedder  # noqa: ANN001
) -> Path:
    path = tmp_path_factory.mktemp("stores") / "planted"
    build_index(planted_set.folder, path, embedder, progress=False)
    return path
