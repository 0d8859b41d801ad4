"""Keys to files, and embedding each unique file once; missing or broken images are named."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lookalike.evaluation.errors import EvaluationError
from lookalike.evaluation.images import (
    ImageFolder,
    MissingImagesError,
    UnreadableImagesError,
    embed_unique,
)
from lookalike.models.embedder import Embedder


def test_keys_are_file_names_without_extension(small_image_dir: Path) -> None:
    folder = ImageFolder(small_image_dir / "left")
    key = sorted(small_image_dir.glob("left/*.jpg"))[0].stem
    assert folder.paths([key, key]) == {key: small_image_dir / "left" / f"{key}.jpg"}


def test_missing_images_are_named(small_image_dir: Path) -> None:
    folder = ImageFolder(small_image_dir / "left")
    with pytest.raises(MissingImagesError, match="2 image\\(s\\) not found.*'nope1', 'nope2'"):
        folder.paths(["nope1", "nope2"])
    with pytest.raises(EvaluationError, match="does not exist"):
        ImageFolder(small_image_dir / "no-such-folder")


def test_two_files_for_one_key_is_an_error(tmp_path: Path, small_image_dir: Path) -> None:
    source = sorted(small_image_dir.glob("left/*.jpg"))[0]
    shutil.copy(source, tmp_path / "x.jpg")
    shutil.copy(source, tmp_path / "x.png")
    with pytest.raises(EvaluationError, match="more than one file"):
        ImageFolder(tmp_path).paths(["x"])


def test_each_unique_file_is_embedded_once(small_image_dir: Path, embedder: Embedder) -> None:
    paths = sorted(small_image_dir.glob("right/*.jpg"))[:3]
    vectors = embed_unique(embedder, [*paths, *paths, paths[0]], batch_size=2, progress=False)
    assert list(vectors) == paths
    for path in paths:
        np.testing.assert_allclose(
            vectors[path], embedder.embed_bytes(path.read_bytes()), atol=1e-4
        )


def test_unreadable_images_are_named(
    tmp_path: Path, small_image_dir: Path, embedder: Embedder
) -> None:
    good = sorted(small_image_dir.glob("right/*.jpg"))[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is no jpeg")
    with pytest.raises(UnreadableImagesError, match="1 image\\(s\\) could not be read.*broken.jpg"):
        embed_unique(embedder, [good, bad], progress=False)
