"""IndexStore: FAISS index + raw vectors + SQLite item table + manifest, in one directory.

Layout of a store directory::

    manifest.json   model fingerprint, dim, metric, factory string, count, generation, file hashes
    items.sqlite    the item table (key, path, sha256, metadata, thumbnail, vector): source of truth
    vectors.npy     raw L2-normalised vectors in item order (fast load, exact re-scoring)
    index.faiss     the FAISS index over those vectors (inner product = cosine)

Durability: every ``add``/``remove`` is one SQLite transaction, so an acknowledged write
survives a crash. ``vectors.npy`` and ``index.faiss`` are snapshots derived from SQLite,
written to temporary files and moved into place with ``os.replace``, the manifest last. On
open, a snapshot whose generation or hashes do not match the database is rebuilt from it,
so a crash at any point leaves a store that opens with every committed item.

One metric everywhere: vectors are L2-normalised, FAISS uses inner product, and ``score`` is
the cosine in [-1, 1]. With PCA the factory becomes ``PCA{d},L2norm,{factory}`` and results
are re-scored exactly on the raw vectors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

__all__ = [
    "IndexStore",
    "Item",
    "Match",
    "StoreError",
    "ModelMismatchError",
    "UnknownKeyError",
    "DuplicateKeyError",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "items.sqlite"
VECTORS = "vectors.npy"
INDEX = "index.faiss"

SCHEMA = """
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


class StoreError(ValueError):
    """A store that cannot be opened or an operation it cannot do."""


class ModelMismatchError(StoreError):
    """The store's vectors were made by another model than the one asked to use it."""


class UnknownKeyError(StoreError):
    """Keys that are not in the store; ``keys`` lists them."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        shown = ", ".join(repr(k) for k in self.keys[:10])
        more = f" and {len(self.keys) - 10} more" if len(self.keys) > 10 else ""
        super().__init__(f"unknown key(s): {shown}{more}")


class DuplicateKeyError(StoreError):
    """Keys that are already in the store (pass ``replace=True`` to overwrite)."""


@dataclass(frozen=True)
class Match:
    key: str
    score: float
    rank: int


@dataclass(frozen=True)
class Item:
    key: str
    path: str | None
    sha256: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    has_thumbnail: bool = False


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-length rows (zero rows stay zero)."""
    vectors = np.array(vectors, dtype=np.float32, ndmin=2)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class IndexStore:
    """A persistent, searchable set of image vectors keyed by string.

    Thread-safe: one lock guards the in-memory arrays and the SQLite connection, so the
    service can search from worker threads while an add is in flight.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection, manifest: dict[str, Any]):
        self.path = path
        self._db = connection
        self._manifest = manifest
        self._lock = threading.RLock()
        self._keys: list[str] = []
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, self.dim), np.float32)
        self._index: faiss.Index | None = None

    # -- opening and creating -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dim: int,
        model_fingerprint: str,
        model_name: str = "",
        factory: str = "Flat",
        pca_dim: int | None = None,
    ) -> IndexStore:
        """Create an empty store at ``path`` (which must not hold a store already)."""
        path = Path(path)
        if (path / MANIFEST).exists() or (path / DATABASE).exists():
            raise StoreError(f"{path} already holds an index store; open it or choose another path")
        if pca_dim is not None and not 0 < pca_dim < dim:
            raise StoreError(f"PCA dimension must be between 1 and {dim - 1}, got {pca_dim}")
        full_factory = f"PCA{pca_dim},L2norm,{factory}" if pca_dim else factory
        try:
            faiss.index_factory(dim, full_factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise StoreError(f"FAISS cannot build index {full_factory!r}: {exc}") from exc
        path.mkdir(parents=True, exist_ok=True)
        now = time.time()
        manifest = {
            "format_version": FORMAT_VERSION,
            "model_fingerprint": model_fingerprint,
            "model_name": model_name,
            "dim": dim,
            "metric": "cosine",
            "factory": factory,
            "pca_dim": pca_dim,
            "count": 0,
            "generation": 0,
            "created": now,
            "updated": now,
            "files": {},
        }
        store = cls(path, _connect(path / DATABASE), manifest)
        with store._db:
            store._db.execute("INSERT OR REPLACE INTO meta VALUES ('generation', '0')")
            store._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('model_fingerprint', ?)", (model_fingerprint,)
            )
        store.save()
        return store

    @classmethod
    def open(cls, path: str | Path, *, model_fingerprint: str | None = None) -> IndexStore:
        """Open the store at ``path``; with ``model_fingerprint``, refuse another model's store."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError as exc:
            raise StoreError(
                f"no index store at {path}: build one with 'lookalike index build'"
            ) from exc
        except json.JSONDecodeError as exc:
            raise StoreError(f"the manifest of {path} is damaged: {exc}") from exc
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format {manifest.get('format_version')}, "
                f"this lookalike reads format {FORMAT_VERSION}"
            )
        if model_fingerprint is not None and manifest["model_fingerprint"] != model_fingerprint:
            raise ModelMismatchError(
                f"the index at {path} was built with model {manifest.get('model_name') or '?'} "
                f"({manifest['model_fingerprint'][:12]}), not the model in use "
                f"({model_fingerprint[:12]}); rebuild the index with this model or serve it with "
                "the model that built it"
            )
        if not (path / DATABASE).is_file():
            raise StoreError(f"the index store at {path} has no {DATABASE}")
        store = cls(path, _connect(path / DATABASE), manifest)
        store._load()
        return store

    def _load(self) -> None:
        generation = self._db_generation()
        files = self._manifest.get("files", {})
        snapshot_ok = (
            self._manifest.get("generation") == generation
            and set(files) == {VECTORS, INDEX}
            and all(
                (self.path / name).is_file() and _file_sha256(self.path / name) == digest
                for name, digest in files.items()
            )
        )
        rows = self._db.execute("SELECT key FROM items ORDER BY id").fetchall()
        self._keys = [key for (key,) in rows]
        self._rows = {key: row for row, key in enumerate(self._keys)}
        if snapshot_ok:
            self._vectors = np.load(self.path / VECTORS)
            self._index = faiss.read_index(str(self.path / INDEX))
        else:
            log.warning(
                "index snapshot of %s is stale or damaged; rebuilding from the database", self.path
            )
            blobs = self._db.execute("SELECT vector FROM items ORDER BY id").fetchall()
            self._vectors = (
                np.stack([np.frombuffer(blob, np.float32) for (blob,) in blobs])
                if blobs
                else np.zeros((0, self.dim), np.float32)
            )
            self._index = None
            self._ensure_index()
            self.save()

    # -- facts ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def model_fingerprint(self) -> str:
        return str(self._manifest["model_fingerprint"])

    @property
    def factory(self) -> str:
        pca = self._manifest.get("pca_dim")
        return f"PCA{pca},L2norm,{self._manifest['factory']}" if pca else self._manifest["factory"]

    @property
    def manifest(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._manifest, count=len(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    # -- writing -------------------------------------------------------------------------

    def add(
        self,
        keys: Sequence[str],
        vectors: np.ndarray,
        *,
        paths: Sequence[str | None] | None = None,
        sha256: Sequence[str | None] | None = None,
        metadata: Sequence[dict[str, Any]] | None = None,
        thumbnails: Sequence[bytes | None] | None = None,
        replace: bool = False,
    ) -> None:
        """Add items in one transaction; with ``replace=True`` existing keys are overwritten."""
        vectors = normalize_rows(vectors)
        count = len(keys)
        if vectors.shape != (count, self.dim):
            raise StoreError(
                f"expected {count} vectors of dimension {self.dim}, got shape {vectors.shape}"
            )
        if len(set(keys)) != count:
            raise DuplicateKeyError("the same key appears twice in one add")
        if any(not isinstance(key, str) or not key for key in keys):
            raise StoreError("keys must be non-empty strings")
        paths = paths or [None] * count
        sha256 = sha256 or [None] * count
        metadata = metadata or [{} for _ in range(count)]
        thumbnails = thumbnails or [None] * count
        with self._lock:
            existing = [key for key in keys if key in self._rows]
            if existing and not replace:
                raise DuplicateKeyError(
                    f"{len(existing)} key(s) already in the store, e.g. {existing[0]!r}; "
                    "remove them first or add with replace"
                )
            if existing:
                self.remove(existing)
            combined = np.concatenate([self._vectors, vectors])
            index = self._index
            grow = index is not None and index.is_trained and index.ntotal == len(self._keys)
            if not grow:
                index = self._build_index(combined)  # trains first, so a failure writes nothing
            now = time.time()
            with self._db:
                self._db.executemany(
                    "INSERT INTO items (key, path, sha256, metadata, thumbnail, vector, added) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            key,
                            path,
                            digest,
                            json.dumps(meta, sort_keys=True),
                            thumb,
                            vector.tobytes(),
                            now,
                        )
                        for key, path, digest, meta, thumb, vector in zip(
                            keys, paths, sha256, metadata, thumbnails, vectors, strict=True
                        )
                    ],
                )
                self._bump_generation()
            start = len(self._keys)
            self._keys.extend(keys)
            self._rows.update({key: start + offset for offset, key in enumerate(keys)})
            self._vectors = combined
            if grow:
                index.add(vectors)
            self._index = index

    def remove(self, keys: Iterable[str]) -> int:
        """Remove items by key in one transaction; unknown keys raise :class:`UnknownKeyError`."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            missing = [key for key in keys if key not in self._rows]
            if missing:
                raise UnknownKeyError(missing)
            if not keys:
                return 0
            with self._db:
                self._db.executemany("DELETE FROM items WHERE key = ?", [(k,) for k in keys])
                self._bump_generation()
            drop = np.array([self._rows[key] for key in keys])
            keep = np.setdiff1d(np.arange(len(self._keys)), drop)
            self._keys = [self._keys[row] for row in keep]
            self._rows = {key: row for row, key in enumerate(self._keys)}
            self._vectors = self._vectors[keep]
            self._index = None
            self._ensure_index()
            return len(keys)

    def save(self) -> None:
        """Write the vectors/index snapshot and the manifest, each by atomic rename."""
        with self._lock:
            self._ensure_index()
            _write_atomic(self.path / VECTORS, lambda tmp: _save_npy(tmp, self._vectors))
            index = self._index if self._index is not None else self._new_index()
            _write_atomic(self.path / INDEX, lambda tmp: faiss.write_index(index, str(tmp)))
            self._manifest.update(
                count=len(self._keys),
                generation=self._db_generation(),
                updated=time.time(),
                files={name: _file_sha256(self.path / name) for name in (VECTORS, INDEX)},
            )
            manifest = json.dumps(self._manifest, indent=2, sort_keys=True)
            _write_atomic(self.path / MANIFEST, lambda tmp: tmp.write_text(manifest))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reading -------------------------------------------------------------------------

    def get(self, key: str) -> Item:
        with self._lock:
            row = self._db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            raise UnknownKeyError([key])
        return _item(row)

    def get_many(self, keys: Sequence[str]) -> dict[str, Item]:
        """Items for the known ``keys`` in one query (unknown keys are left out)."""
        found: dict[str, Item] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                rows = self._db.execute(
                    f"SELECT {ITEM_COLUMNS} FROM items WHERE key IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).fetchall()
                found.update((row[0], _item(row)) for row in rows)
        return found

    def items(self, offset: int = 0, limit: int = 100) -> list[Item]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items ORDER BY id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [_item(row) for row in rows]

    def thumbnail(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT thumbnail FROM items WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise UnknownKeyError([key])
        return row[0]

    def digests(self) -> dict[str, str | None]:
        """``key -> sha256`` of the source file, to skip unchanged images on rebuild."""
        with self._lock:
            return dict(self._db.execute("SELECT key, sha256 FROM items").fetchall())

    def vectors(self, keys: Sequence[str]) -> np.ndarray:
        """Raw vectors ``(len(keys), dim)`` for ``keys``; unknown keys raise."""
        with self._lock:
            missing = [key for key in keys if key not in self._rows]
            if missing:
                raise UnknownKeyError(missing)
            return self._vectors[[self._rows[key] for key in keys]]

    def search(
        self, queries: np.ndarray, k: int = 10, exclude: Iterable[str] = ()
    ) -> list[list[Match]]:
        """Top-``k`` items for each query ``(Q, dim)``, scored exactly by cosine."""
        queries = normalize_rows(queries)
        self._check_dim(queries)
        exclude = set(exclude)
        with self._lock:
            count = len(self._keys)
            if count == 0 or k <= 0:
                return [[] for _ in queries]
            self._ensure_index()
            fetch = min(count, k + len(exclude))
            _, ids = self._index.search(queries, fetch)
            results = []
            for query, row_ids in zip(queries, ids, strict=True):
                rows = [int(r) for r in row_ids if r >= 0 and self._keys[r] not in exclude]
                scores = self._vectors[rows] @ query
                order = np.argsort(-scores, kind="stable")[:k]
                results.append(_matches([self._keys[rows[i]] for i in order], scores[order]))
            return results

    def rank(self, query: np.ndarray, candidates: Sequence[str]) -> list[Match]:
        """All ``candidates`` sorted by exact cosine to ``query`` ``(dim,)``."""
        query = normalize_rows(query)
        self._check_dim(query)
        candidate_vectors = self.vectors(candidates)
        scores = candidate_vectors @ query[0]
        order = np.argsort(-scores, kind="stable")
        return _matches([candidates[i] for i in order], scores[order])

    # -- internals -----------------------------------------------------------------------

    def _check_dim(self, queries: np.ndarray) -> None:
        if queries.shape[1] != self.dim:
            raise ModelMismatchError(
                f"query vectors have dimension {queries.shape[1]}, the index holds {self.dim}"
            )

    def _new_index(self) -> faiss.Index:
        return faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)

    def _ensure_index(self) -> None:
        if self._index is None or self._index.ntotal != len(self._keys):
            self._index = self._build_index(self._vectors)

    def _build_index(self, vectors: np.ndarray) -> faiss.Index:
        """A FAISS index over ``vectors``, trained on them first where the type needs it."""
        index = self._new_index()
        if len(vectors) and not index.is_trained:
            try:
                index.train(vectors)
            except RuntimeError as exc:
                raise StoreError(
                    f"cannot train FAISS index {self.factory!r} on {len(vectors)} vectors "
                    f"(add more items or choose another factory): {exc}"
                ) from exc
        if index.is_trained and len(vectors):
            index.add(vectors)
        return index

    def _db_generation(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _bump_generation(self) -> None:
        self._db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'generation'"
        )


ITEM_COLUMNS = "key, path, sha256, metadata, thumbnail IS NOT NULL"


def _item(row: tuple[Any, ...]) -> Item:
    return Item(row[0], row[1], row[2], json.loads(row[3]), bool(row[4]))


def _matches(keys: Sequence[str], scores: np.ndarray) -> list[Match]:
    clipped = np.clip(scores, -1.0, 1.0)
    return [
        Match(key, float(score), rank)
        for rank, (key, score) in enumerate(zip(keys, clipped, strict=True), start=1)
    ]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.executescript(SCHEMA)
    connection.isolation_level = "DEFERRED"
    return connection
