"""Building a store from real images: incremental, resumable, tolerant of bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.index.build import SourceError, build_index, discover_images
from lookalike.index.store import IndexStore, ModelMismatchError
from lookalike.models.bundle import ModelBundle
from lookalike.models.embedder import Embedder


def test_keys_and_thumbnails(small_store_path: Path) -> None:
    store = IndexStore.open(small_store_path)
    assert len(store) == 24
    assert all(key.startswith(("left/", "right/")) for key in store.keys())
    key = store.keys()[0]
    assert store.thumbnail(key)[:2] == b"\xff\xd8"  # a JPEG
    assert store.get(key).has_thumbnail


def test_an_indexed_image_finds_itself(
    small_store_path: Path, small_image_dir: Path, embedder: Embedder
) -> None:
    store = IndexStore.open(small_store_path, model_fingerprint=embedder.fingerprint)
    query = next((small_image_dir / "right").glob("*.jpg"))
    (matches,) = store.search(embedder.embed_bytes(query.read_bytes())[None], k=3)
    assert matches[0].key == f"right/{query.stem}"
    assert matches[0].score == pytest.approx(1.0, abs=1e-3)


def test_rebuild_skips_unchanged_and_updates_changed(
    small_image_dir: Path, embedder: Embedder, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    shutil.copytree(small_image_dir, images)
    store_path = tmp_path / "store"
    first = build_index(images, store_path, embedder, progress=False)
    assert (first.added, first.unchanged) == (24, 0)
    second = build_index(images, store_path, embedder, progress=False)
    assert (second.added, second.updated, second.unchanged) == (0, 0, 24)
    left = sorted((images / "left").glob("*.jpg"))
    shutil.copy(left[1], left[0])  # same key, new bytes
    left[2].unlink()
    third = build_index(images, store_path, embedder, progress=False, prune=True)
    assert (third.added, third.updated, third.unchanged, third.removed) == (0, 1, 22, 1)
    assert third.total == 23


def test_bad_images_are_skipped_and_reported(
    small_image_dir: Path, embedder: Embedder, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(small_image_dir.rglob("*.jpg"))[:3]:
        shutil.copy(path, images)
    (images / "notes.png").write_text("not a picture")
    report = build_index(images, tmp_path / "store", embedder, progress=False)
    assert report.added == 3 and list(report.failed) == ["notes"]
    assert "supported format" in report.failed["notes"]


def test_csv_source_with_metadata(
    small_image_dir: Path, embedder: Embedder, tmp_path: Path
) -> None:
    rows = ["path,key,caption"]
    for index, path in enumerate(sorted((small_image_dir / "left").glob("*.jpg"))[:3]):
        rows.append(f"{path},face-{index},photo {index}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    build_index(tmp_path / "list.csv", tmp_path / "store", embedder, progress=False)
    store = IndexStore.open(tmp_path / "store")
    assert store.keys() == ["face-0", "face-1", "face-2"]
    assert store.get("face-1").metadata == {"caption": "photo 1"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,key\na.jpg,a\n", "needs a 'path' column"),
        ("path,key\na.jpg,a,extra\n", "wrong number of fields"),
        ("path\n", "no images found"),
        (b"path\n\xff\xfe\x00bad", "not a UTF-8 CSV"),
    ],
)
def test_malformed_csv(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "list.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(SourceError, match=message):
        discover_images(path)


def test_duplicate_keys_and_missing_source(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "x.png").write_bytes(b"2")
    with pytest.raises(SourceError, match="two images have the key 'x'"):
        discover_images(tmp_path / "a")
    with pytest.raises(SourceError, match="neither a folder nor a CSV"):
        discover_images(tmp_path / "nothing")


def test_store_of_another_model_is_not_extended(
    store_copy: Path, small_image_dir: Path, embedder: Embedder
) -> None:
    manifest = json.loads((store_copy / "manifest.json").read_text())
    (store_copy / "manifest.json").write_text(
        json.dumps(dict(manifest, model_fingerprint="0" * 64))
    )
    with pytest.raises(ModelMismatchError):
        build_index(small_image_dir, store_copy, embedder, progress=False)


def _without_read_permission() -> list[str]:
    """A command prefix that runs a program unable to bypass file permissions: nothing for
    a normal user; for root, ``setpriv`` dropping the capabilities that let root read any
    folder (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: root can read any folder")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search", "--"]


def test_an_unreadable_folder_is_reported_as_unreadable_files_are(
    small_image_dir: Path, bundle: ModelBundle, cache_dir: Path, tmp_path: Path
) -> None:
    """``lookalike index build`` names a folder it cannot list (before, rglob skipped it
    silently) and still indexes the rest; run as a real command, as a user would."""
    Embedder(bundle, "onnx-int8", cache_dir=cache_dir)  # the cached conversion the command uses
    source = tmp_path / "images"
    (source / "open").mkdir(parents=True)
    (source / "closed").mkdir()
    for path in sorted(small_image_dir.rglob("*.jpg"))[:2]:
        shutil.copy(path, source / "open")
    shutil.copy(sorted(small_image_dir.rglob("*.jpg"))[2], source / "closed")
    (source / "closed").chmod(0)
    try:
        done = subprocess.run(
            [*_without_read_permission(), sys.executable, "-m", "lookalike.service.cli",
             "index", "build", str(source), "--out", str(tmp_path / "store"),
             "--engine", "onnx-int8"],
            capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "LOOKALIKE_CACHE_DIR": str(cache_dir)},
        )
    finally:
        (source / "closed").chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert "skipped closed/: cannot read folder" in done.stderr
    assert "Permission denied" in done.stderr
    assert "2 added" in done.stdout and "1 failed" in done.stdout
