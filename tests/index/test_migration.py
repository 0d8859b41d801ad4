"""Stores written in format 1 (every vector a SQLite BLOB, loaded by scanning them) open in
format 2: migrated in place, with a log line, keys, metadata, thumbnails and vectors intact."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from lookalike.index.store import IndexStore, ModelMismatchError, migrate, normalize_rows

DIM = 12
#: The format-1 schema exactly as the previous store wrote it.
FORMAT_1_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    path TEXT,
    sha256 TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    thumbnail BLOB,
    vector BLOB NOT NULL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def write_format_1_store(path: Path, n: int = 30) -> tuple[list[str], np.ndarray]:
    """A format-1 store as the old code left it, with a gap in the ids from a removal."""
    path.mkdir(parents=True)
    vectors = normalize_rows(np.random.default_rng(0).normal(size=(n + 1, DIM)))
    db = sqlite3.connect(path / "items.sqlite")
    db.executescript(FORMAT_1_SCHEMA)
    keys = [f"old-{i}" for i in range(n + 1)]
    with db:
        db.executemany(
            "INSERT INTO items (key, path, sha256, metadata, thumbnail, vector, added) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(key, f"/img/{key}.jpg", "ab" * 32, json.dumps({"i": i}),
              b"\xff\xd8thumb" if i == 2 else None, vectors[i].tobytes(), time.time())
             for i, key in enumerate(keys)],
        )
        db.execute("DELETE FROM items WHERE key = 'old-5'")
        db.execute("INSERT INTO meta VALUES ('generation', '3')")
        db.execute("INSERT INTO meta VALUES ('model_fingerprint', 'old-model')")
    db.close()
    kept = [i for i in range(n + 1) if i != 5]
    np.save(path / "vectors.npy", vectors[kept])
    index = faiss.IndexFlatIP(DIM)
    index.add(vectors[kept])
    faiss.write_index(index, str(path / "index.faiss"))
    manifest = {"format_version": 1, "model_fingerprint": "old-model", "model_name": "m",
                "dim": DIM, "metric": "cosine", "factory": "Flat", "pca_dim": None,
                "count": n, "generation": 3, "created": 0.0, "updated": 0.0, "files": {}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return [keys[i] for i in kept], vectors[kept]


def test_format_1_store_opens_migrated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys, vectors = write_format_1_store(tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="lookalike.index.store"):
        store = IndexStore.open(tmp_path / "old", model_fingerprint="old-model")
    assert "has format 1: migrating it to format 2" in caplog.text
    assert store.keys() == keys
    assert store.get("old-7").metadata == {"i": 7}
    assert store.thumbnail("old-2") == b"\xff\xd8thumb" and store.get("old-3").path == \
        "/img/old-3.jpg"
    np.testing.assert_allclose(store.vectors(keys), vectors, atol=1e-7)
    assert [m[0].key for m in store.search(vectors, k=1)] == keys
    assert not (tmp_path / "old" / "vectors.npy").exists()
    columns = {row[1] for row in sqlite3.connect(tmp_path / "old" / "items.sqlite").execute(
        "PRAGMA table_info(items)")}
    assert "vector" not in columns
    store.add(["new"], normalize_rows(np.ones((1, DIM))))
    store.close()
    reopened = IndexStore.open(tmp_path / "old")
    assert reopened.manifest["format_version"] == 2 and len(reopened) == len(keys) + 1
    reopened.close()


def test_migrate_is_one_call_and_resumes(tmp_path: Path) -> None:
    """``migrate`` is the one command; a crash after the table swap but before the manifest
    (simulated by putting the format-1 manifest back) is finished on the next call."""
    keys, vectors = write_format_1_store(tmp_path / "old")
    old_manifest = (tmp_path / "old" / "manifest.json").read_text()
    assert migrate(tmp_path / "old")["count"] == len(keys)
    (tmp_path / "old" / "manifest.json").write_text(old_manifest)
    assert migrate(tmp_path / "old")["format_version"] == 2
    store = IndexStore.open(tmp_path / "old")
    np.testing.assert_allclose(store.vectors(keys), vectors, atol=1e-7)
    store.close()


def test_another_models_store_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    write_format_1_store(tmp_path / "old")
    with pytest.raises(ModelMismatchError, match="built with model m .*not the model in use"):
        IndexStore.open(tmp_path / "old", model_fingerprint="new-model")
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["format_version"] == 1
