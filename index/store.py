"""IndexStore: item table + append-only vectors + a FAISS index generation, in one directory.

Layout of a store directory (format 2)::

    manifest.json        model fingerprint, dim, factory asked for, the serving index's
                         choice, knobs and measured recall, count, file hashes
    items.sqlite         items (int64 id, key, path, sha256, metadata, thumbnail) and the
                         tombstones of removed ids: the source of truth
    vectors.f32 (.f16)   row ``id`` = the L2-normalised vector of item ``id``, append-only,
                         memory-mapped (see :mod:`.vectors`)
    index-G-S.faiss      the saved FAISS index of generation ``G`` (labels are item ids)

Writes cost O(batch): an ``add`` appends its rows to the vector file (fsynced) and commits
their SQLite rows in one transaction; a ``remove`` deletes rows and clears the ids' live
bits. Neither touches the FAISS index. Searches use the serving generation for ids it covers
and an exact scan of the vector file for the rows added since, skipping ids that are not
live, then re-rank the shortlist exactly. A background thread merges new rows into the
index in small chunks, applies removals (IVF) or rebuilds when tombstones pile up (HNSW),
and builds a new generation beside the serving one when ``auto`` would choose another
index; ``save`` does all of that now and writes the index file and manifest by atomic
rename. Readers take no lock that a writer holds longer than one merge chunk.

An acknowledged write survives ``kill -9``: its vectors are on disk before its SQLite
commit, and the index is derived data: on open, a missing or mismatched index file is not
loaded (it is rebuilt in the background) and rows past its coverage are scanned exactly.

One metric everywhere: vectors are L2-normalised, FAISS uses inner product, and ``score`` is
the cosine in [-1, 1]. With PCA the factory becomes ``PCA{d},L2norm,{factory}`` and results
are re-scored exactly on the raw vectors.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lookalike.core.errors import ConflictError, InvalidInputError, LookalikeError, NotFoundError
from lookalike.core.files import atomic_write, file_sha256
from lookalike.core.metadata import check_metadata

from .database import connect, has_vector_column, migrate_vectors_out
from .exact import exact_search, exact_search_ids, merge_top, rescore
from .filters import Filter
from .generations import (
    MERGE_CHUNK,
    Generation,
    NotTrainableError,
    build_generation,
    index_ids,
    new_faiss_index,
    same_structure,
)
from .liveness import AliveBitmap
from .tuning import (
    AUTO,
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_TARGET_RECALL,
    FILTER_EXACT_MAX,
    FILTER_INDEX_MIN_FRACTION,
    FLAT_MAX_WORK,
    RERANK_FACTOR,
    TuneReport,
    choose_factory,
    knob_grid,
    tune,
)
from .vectors import VECTOR_DTYPES, VectorFile, vector_file_name

__all__ = [
    "IndexBuilder",
    "IndexStore",
    "Item",
    "Match",
    "StoreError",
    "ModelMismatchError",
    "UnknownKeyError",
    "DuplicateKeyError",
    "normalize_rows",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DATABASE = "items.sqlite"
#: Rows waiting outside a non-IVF index (HNSW, other) before the background thread merges
#: them; an IVF store's writer merges its own rows.
MERGE_MIN_ROWS = 1024
#: Share of an HNSW index that may be tombstones before it is rebuilt without them.
REBUILD_DEAD_FRACTION = 0.2
#: Queries used to measure recall when a generation is tuned.
TUNE_SAMPLE = 200
MAINTENANCE_INTERVAL_S = 2.0
#: Ids read per query when a store opens (see ``_live_bitmap``).
LOAD_RANGE = 1 << 20
#: Selected ids kept for repeated filters, all filters together (8 bytes each).
FILTER_CACHE_IDS = 4_000_000
#: FAISS threads of the background thread: one, so merges and rebuilds leave the other core
#: to searches (OpenMP thread counts are per calling thread; ``save`` and ``maintain`` run in
#: the caller's thread with the caller's setting).
MAINTENANCE_THREADS = 1


#: Builds an index outside the store: ``(factory, live_ids, take) -> index`` (see
#: :meth:`IndexStore.adopt_index`); ``take(ids)`` reads those items' float32 vectors.
IndexBuilder = Callable[[str, np.ndarray, Callable[[np.ndarray], np.ndarray]],
                        "faiss.Index | None"]


class StoreError(LookalikeError):
    """A store that cannot be opened or an operation it cannot do (the root of store errors)."""


class StoreInputError(StoreError, InvalidInputError):
    """Input the store cannot use: wrong shape, bad key, bad metadata, unknown factory."""


class ModelMismatchError(StoreError, InvalidInputError):
    """The store's vectors were made by another model than the one asked to use it."""


class UnknownKeyError(NotFoundError, StoreError):
    """Keys that are not in the store; ``keys`` lists them."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        shown = ", ".join(repr(k) for k in self.keys[:10])
        more = f" and {len(self.keys) - 10} more" if len(self.keys) > 10 else ""
        super().__init__(f"unknown key(s): {shown}{more}")


class DuplicateKeyError(ConflictError, StoreError):
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


@dataclass(frozen=True)
class _View:
    """What a reader needs, swapped as one reference: ids below ``next_id`` are committed."""

    generation: Generation | None
    next_id: int
    alive: AliveBitmap
    array: np.ndarray


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-length rows (zero rows stay zero)."""
    vectors = np.array(vectors, dtype=np.float32, ndmin=2)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class IndexStore:
    """A persistent, searchable set of image vectors keyed by string.

    Thread-safe: writes are serialised by one lock; searches and reads never wait for it
    (SQLite WAL readers, an immutable snapshot of the id arrays, the generation's
    readers-writer lock held by writers for one chunk at a time).
    """

    def __init__(
        self,
        path: Path,
        connection: sqlite3.Connection,
        manifest: dict[str, Any],
        vectors: VectorFile,
        view: _View,
        *,
        background: bool = True,
    ) -> None:
        self.path = path
        self._db = connection
        self._manifest = manifest
        self._vectors = vectors
        self._view = view
        self._write_lock = threading.RLock()
        self._maintenance_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._filter_cache: OrderedDict[Filter, tuple[int, np.ndarray]] = OrderedDict()
        self._filter_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=_maintenance_loop, args=(weakref.ref(self), self._wake),
                name=f"index-maintenance:{path.name}", daemon=True,
            )
            self._thread.start()
            self._wake.set()

    # -- opening and creating -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        dim: int,
        model_fingerprint: str,
        model_name: str = "",
        factory: str = AUTO,
        pca_dim: int | None = None,
        vector_dtype: str = "float32",
        target_recall: float = DEFAULT_TARGET_RECALL,
        search_params: dict[str, int] | None = None,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        background: bool = True,
    ) -> IndexStore:
        """Create an empty store at ``path`` (which must not hold a store already).

        ``factory`` is ``"auto"`` (choose and re-choose by size) or a FAISS factory string;
        ``search_params`` (``nprobe``, ``efSearch``) fix the knobs instead of tuning them to
        ``target_recall``.
        """
        path = Path(path)
        if (path / MANIFEST).exists() or (path / DATABASE).exists():
            raise StoreError(f"{path} already holds an index store; open it or choose another path")
        if pca_dim is not None and not 0 < pca_dim < dim:
            raise StoreInputError(f"PCA dimension must be between 1 and {dim - 1}, got {pca_dim}")
        if vector_dtype not in VECTOR_DTYPES:
            raise StoreInputError(f"vector_dtype must be one of {sorted(VECTOR_DTYPES)}")
        if not 0 < target_recall <= 1:
            raise StoreInputError(f"target recall must be in (0, 1], got {target_recall}")
        if factory != AUTO:
            full = f"PCA{pca_dim},L2norm,{factory}" if pca_dim else factory
            try:
                new_faiss_index(dim, full)
            except RuntimeError as exc:
                raise StoreInputError(f"FAISS cannot build index {full!r}: {exc}") from exc
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
            "vector_dtype": vector_dtype,
            "target_recall": target_recall,
            "search_params": dict(search_params or {}),
            "memory_budget": memory_budget,
            "count": 0,
            "generation": 0,
            "created": now,
            "updated": now,
            "index": None,
            "files": {},
        }
        connection = connect(path / DATABASE)
        with connection:
            connection.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("generation", "0"), ("next_id", "0"), ("format_version", str(FORMAT_VERSION)),
                 ("model_fingerprint", model_fingerprint)],
            )
        vectors = VectorFile(path / vector_file_name(vector_dtype), dim, vector_dtype)
        view = _View(None, 0, AliveBitmap(), vectors.array)
        store = cls(path, connection, manifest, vectors, view, background=background)
        store.save()
        return store

    @classmethod
    def open(
        cls, path: str | Path, *, model_fingerprint: str | None = None, background: bool = True
    ) -> IndexStore:
        """Open the store at ``path``; with ``model_fingerprint``, refuse another model's store.

        A format-1 store (vectors as SQLite BLOBs) is migrated in place first, with a log line.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        if model_fingerprint is not None and manifest["model_fingerprint"] != model_fingerprint:
            raise ModelMismatchError(
                f"the index at {path} was built with model {manifest.get('model_name') or '?'} "
                f"({manifest['model_fingerprint'][:12]}), not the model in use "
                f"({model_fingerprint[:12]}); rebuild the index with this model or serve it with "
                "the model that built it"
            )
        if manifest.get("format_version") == 1:
            manifest = migrate(path)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has store format {manifest.get('format_version')}, "
                f"this lookalike reads format {FORMAT_VERSION}"
            )
        if not (path / DATABASE).is_file():
            raise StoreError(f"the index store at {path} has no {DATABASE}")
        connection = connect(path / DATABASE)
        next_id = int(_meta(connection, "next_id", "0"))
        alive = _live_bitmap(connection, next_id)
        dtype = manifest.get("vector_dtype", "float32")
        vectors = VectorFile(path / vector_file_name(dtype), int(manifest["dim"]), dtype)
        generation = _load_generation(path, manifest, connection, next_id)
        view = _View(generation, next_id, alive, vectors.array)
        return cls(path, connection, manifest, vectors, view, background=background)

    # -- facts ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self._manifest["dim"])

    @property
    def model_fingerprint(self) -> str:
        return str(self._manifest["model_fingerprint"])

    @property
    def factory(self) -> str:
        """The factory asked for (``auto`` or a FAISS string), with the PCA prefix."""
        pca = self._manifest.get("pca_dim")
        return f"PCA{pca},L2norm,{self._manifest['factory']}" if pca else self._manifest["factory"]

    @property
    def manifest(self) -> dict[str, Any]:
        """The saved manifest with the live count and the serving index as they are now
        (lock-free: writers replace the manifest dict, never change it in place)."""
        return dict(self._manifest, count=len(self), index=self._index_info())

    def __len__(self) -> int:
        return self._view.alive.count

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self._reader().execute("SELECT 1 FROM items WHERE key = ?", (key,)).fetchone() \
            is not None

    def keys(self) -> list[str]:
        return [key for (key,) in self._reader().execute("SELECT key FROM items ORDER BY id")]

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
        """Add items in one transaction; with ``replace=True`` existing keys are overwritten.

        Everything is checked (shapes, keys, every metadata object) before anything is
        written, so a failed add stores nothing.
        """
        keys = list(keys)
        vectors = normalize_rows(vectors)
        count = len(keys)
        if vectors.shape != (count, self.dim):
            raise StoreInputError(
                f"expected {count} vectors of dimension {self.dim}, got shape {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise StoreInputError("vectors must be finite (no NaN or infinity)")
        if len(set(keys)) != count:
            raise DuplicateKeyError("the same key appears twice in one add")
        if any(not isinstance(key, str) or not key for key in keys):
            raise StoreInputError("keys must be non-empty strings")
        paths = list(paths) if paths is not None else [None] * count
        sha256 = list(sha256) if sha256 is not None else [None] * count
        thumbnails = list(thumbnails) if thumbnails is not None else [None] * count
        texts = [check_metadata(meta) for meta in metadata] if metadata is not None \
            else ["{}"] * count
        if not count:
            return
        with self._write_lock:
            self._check_open()
            existing = self._ids_of(keys, self._db)
            if existing and not replace:
                raise DuplicateKeyError(
                    f"{len(existing)} key(s) already in the store, e.g. {next(iter(existing))!r}; "
                    "remove them first or add with replace"
                )
            view = self._view
            start = view.next_id
            self._vectors.write(start, vectors)
            now = time.time()
            with self._db:
                if existing:
                    self._delete_rows(existing)
                self._db.executemany(
                    "INSERT INTO items (id, key, path, sha256, metadata, thumbnail, added) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (item_id, key, path, digest, text, thumb, now)
                        for item_id, key, path, digest, text, thumb in zip(
                            range(start, start + count), keys, paths, sha256, texts, thumbnails,
                            strict=True
                        )
                    ],
                )
                self._db.execute(
                    "UPDATE meta SET value = ? WHERE name = 'next_id'", (str(start + count),)
                )
                self._bump_generation()
            alive = view.alive.grown(start + count)
            alive.set_range(start, start + count)
            self._forget(alive, view.generation, existing)
            self._view = _View(view.generation, start + count, alive, self._vectors.array)
        generation = view.generation
        if generation is not None and generation.family == "ivf":
            # IVF appends are cheap (encode the batch, copy codes into the lists), so the
            # writer merges its own rows: searches then never scan an unmerged tail, and no
            # background pass wakes to compete with them for the GIL
            try:
                self._merge(generation)
            except Exception:  # noqa: BLE001 - the add is committed; its rows stay searchable
                log.exception("merging %d added rows into the index failed; the background "
                              "pass will retry", count)
                self._wake.set()
        elif generation is None or start + count - generation.covered >= MERGE_MIN_ROWS:
            # not on every small add: a pass with nothing to merge still competes with
            # searches for the GIL (the periodic pass re-checks everything else)
            self._wake.set()

    def remove(self, keys: Iterable[str]) -> int:
        """Remove items by key in one transaction; unknown keys raise :class:`UnknownKeyError`."""
        keys = list(dict.fromkeys(keys))
        with self._write_lock:
            self._check_open()
            found = self._ids_of(keys, self._db)
            missing = [key for key in keys if key not in found]
            if missing:
                raise UnknownKeyError(missing)
            if not keys:
                return 0
            with self._db:
                self._delete_rows(found)
                self._bump_generation()
            view = self._view
            self._forget(view.alive, view.generation, found)
        self._wake.set()
        return len(keys)

    def maintain(self) -> None:
        """Bring the index up to date now: build or re-choose a generation if one is due,
        merge every row added since, apply removals. The background thread does the same
        in small steps; this is for ``save``, tests and tools that want it done."""
        with self._maintenance_lock:
            self._maintain(force=True)

    def tune(self, target_recall: float | None = None, sample: int = TUNE_SAMPLE) -> TuneReport:
        """Re-measure recall@10 of the serving index against exact search and re-pick its
        knobs (``nprobe``/``efSearch``) for ``target_recall`` (default: the store's)."""
        if target_recall is not None:
            if not 0 < target_recall <= 1:
                raise StoreInputError(f"target recall must be in (0, 1], got {target_recall}")
            with self._write_lock:
                self._manifest = dict(self._manifest, target_recall=target_recall)
        self.maintain()
        with self._maintenance_lock:
            generation = self._view.generation
            if generation is None:
                return TuneReport("Flat", self._manifest["target_recall"], 0, {}, 1.0, True,
                                  [{"params": {}, "recall": 1.0, "exact": True}])
            return self._tune(generation, sample)

    def adopt_index(self, build: IndexBuilder) -> dict[str, Any] | None:
        """Serve an index built outside the store (e.g. per shard on a cluster, then merged
        with FAISS's own tools) as a new generation over the store's current live items.

        ``build(factory, live_ids, take)`` gets the factory the store would build now, the
        live ids (int64, sorted) and a function reading their vectors, and returns the
        filled index, labels = the ids, or ``None`` when it cannot build that type (the
        store then builds it itself, as always). Before anything changes the index is
        checked: its dimension, its structure against ``factory``, and that its ids are
        exactly ``live_ids``; a mismatch raises :class:`StoreInputError` and the serving
        generation stays as it was. Then, as for a generation the store builds, rows added
        meanwhile are merged, removals marked, knobs tuned for the target recall, the view
        swapped in one step, and the index file and manifest written. Returns the new
        generation's manifest entry (``None`` when ``build`` declined).
        """
        with self._maintenance_lock:
            self._check_open()
            view = self._view
            plan = self._planned_factory(view.alive.count)
            live = np.flatnonzero(view.alive.range(0, view.next_id)).astype(np.int64)
            index = build(plan, live, self._vectors.take)
            if index is None:
                return None
            self._check_adoptable(index, plan, live)
            previous = view.generation
            number = (previous.number + 1) if previous else int(
                (self._manifest.get("index") or {}).get("generation", 0)) + 1
            generation = Generation(number, plan, index, covered=view.next_id,
                                    built_count=len(live))
            self._swap_in(generation, live, view.next_id)
            with self._write_lock:
                self._write_snapshot()
            return self._index_info()

    def _check_adoptable(self, index: faiss.Index, plan: str, live: np.ndarray) -> None:
        if index.d != self.dim:
            raise StoreInputError(
                f"the index to adopt has dimension {index.d}, the store holds {self.dim}")
        if not index.is_trained or not same_structure(index, plan):
            raise StoreInputError(
                f"the index to adopt is not a trained {plan} index (what the store plans)")
        try:
            held = index_ids(index)
        except ValueError as exc:
            raise StoreInputError(f"the index to adopt: {exc}") from exc
        if not np.array_equal(held, live):
            wrong = {"missing": np.setdiff1d(live, held), "not live": np.setdiff1d(held, live),
                     "repeated": np.unique(held[1:][held[1:] == held[:-1]])}
            raise StoreInputError(
                f"the index to adopt holds {len(held)} ids, the store has {len(live)} live "
                "items: " + ", ".join(f"{len(ids)} {what} (e.g. {ids[:3].tolist()})"
                                      for what, ids in wrong.items() if len(ids)))

    def save(self) -> None:
        """Bring the index up to date, write its file and the manifest, each by atomic rename."""
        with self._maintenance_lock:
            self._check_open()
            self._maintain(force=True)
            with self._write_lock:
                self._write_snapshot()

    def close(self) -> None:
        """Stop the background thread and close the files (unsaved index work is redone)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)
        with self._write_lock:
            with self._readers_lock:
                for reader in self._readers:
                    reader.close()
                self._readers.clear()
            self._db.close()
            self._vectors.close()

    # -- reading -------------------------------------------------------------------------

    def get(self, key: str) -> Item:
        row = self._reader().execute(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            raise UnknownKeyError([key])
        return _item(row)

    def get_many(self, keys: Sequence[str]) -> dict[str, Item]:
        """Items for the known ``keys`` in one query (unknown keys are left out)."""
        rows = _select_in(self._reader(), f"SELECT {ITEM_COLUMNS} FROM items WHERE key IN",
                          list(keys))
        return {row[0]: _item(row) for row in rows}

    def items(self, offset: int = 0, limit: int = 100) -> list[Item]:
        rows = self._reader().execute(
            f"SELECT {ITEM_COLUMNS} FROM items ORDER BY id LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()
        return [_item(row) for row in rows]

    def thumbnail(self, key: str) -> bytes | None:
        row = self._reader().execute(
            "SELECT thumbnail FROM items WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            raise UnknownKeyError([key])
        return row[0]

    def with_thumbnails(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` have a stored thumbnail (without reading the thumbnails)."""
        return {key for (key,) in _select_in(
            self._reader(), "SELECT key FROM items WHERE length(thumbnail) > 0 AND key IN",
            list(keys))}

    def digests(self) -> dict[str, str | None]:
        """``key -> sha256`` of the source file, to skip unchanged images on rebuild."""
        return dict(self._reader().execute("SELECT key, sha256 FROM items").fetchall())

    def vectors(self, keys: Sequence[str]) -> np.ndarray:
        """Raw vectors ``(len(keys), dim)`` for ``keys``; unknown keys raise."""
        found = self._ids_of(keys, self._reader())
        missing = [key for key in keys if key not in found]
        if missing:
            raise UnknownKeyError(missing)
        view = self._view
        ids = np.array([found[key] for key in keys], np.int64)
        return np.asarray(view.array[ids], np.float32).reshape(len(keys), self.dim)

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        exclude: Iterable[str] = (),
        *,
        where: Filter | Mapping[str, Any] | str | None = None,
        min_score: float | None = None,
    ) -> list[list[Match]]:
        """Top-``k`` live items for each query ``(Q, dim)``, scored exactly by cosine.

        ``where`` (a :class:`~.filters.Filter` or its JSON form) keeps only the items it
        matches, and the search still returns ``k`` of them when ``k`` exist: the ids come
        from SQLite first, then a selective filter is searched exactly over its vectors and a
        broad one through the index with an id selector. ``min_score`` drops matches scoring
        below it (so fewer than ``k`` may come back).
        """
        queries = normalize_rows(queries)
        self._check_dim(queries)
        spec = Filter.parse(where)
        if min_score is not None and not -1.0 <= min_score <= 1.0:
            raise StoreInputError(f"min_score is a cosine between -1 and 1, got {min_score}")
        view = self._view
        if k <= 0 or view.alive.count == 0:
            return [[] for _ in queries]
        excluded = set(self._ids_of(list(exclude), self._reader()).values())
        if spec:
            results = self._filtered_search(queries, k, excluded, spec, view)
        else:
            want = k + len(excluded) + 2  # +2: room for an id removed while this search runs
            for _ in range(3):  # an HNSW walk through tombstones, or a race, can fall short
                results = self._keyed(*self._search_ids(queries, want, view), k, excluded)
                if all(len(r) >= min(k, len(self) - len(excluded)) for r in results):
                    break
                view, want = self._view, want * 4
        if min_score is not None:
            results = [[m for m in row if m.score >= min_score] for row in results]
        return results

    def matching(self, keys: Sequence[str], where: Filter | Mapping[str, Any] | str | None
                 ) -> list[str]:
        """The ``keys`` (in their order) whose items pass ``where``; unknown keys raise."""
        spec = Filter.parse(where)
        found = self._ids_of(keys, self._reader())
        missing = [key for key in keys if key not in found]
        if missing:
            raise UnknownKeyError(missing)
        if not spec:
            return list(keys)
        condition, params = spec.sql()
        passed = {key for (key,) in _select_in(
            self._reader(), f"SELECT key FROM items WHERE ({condition}) AND key IN",
            list(keys), params)}
        return [key for key in keys if key in passed]

    def _keyed(
        self, scores: np.ndarray, ids: np.ndarray, k: int, excluded: set[int]
    ) -> list[list[Match]]:
        """The first ``k`` ids of each row that still have a key and are not excluded."""
        names = self._keys_of(np.unique(ids[ids >= 0]))
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            chosen = [
                (names[int(i)], s) for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0 and int(i) in names and int(i) not in excluded
            ][:k]
            results.append(_matches([key for key, _ in chosen],
                                    np.array([s for _, s in chosen], np.float32)))
        return results

    def _filtered_search(
        self, queries: np.ndarray, k: int, excluded: set[int], spec: Filter, view: _View
    ) -> list[list[Match]]:
        """Top-``k`` among the live ids ``spec`` selects (less ``excluded``), never fewer than
        ``k`` when ``k`` of them exist."""
        ids = self._selected(spec, view)
        if excluded:
            ids = ids[~np.isin(ids, np.fromiter(excluded, np.int64))]
        if not len(ids):
            return [[] for _ in queries]
        fraction = len(ids) / max(1, view.alive.count)
        if len(ids) > FILTER_EXACT_MAX and fraction >= FILTER_INDEX_MIN_FRACTION:
            # ids are live and unique: as many as the live set means they are the live set
            allowed = view.alive if len(ids) == view.alive.count else view.alive.subset(ids)
            scores, found = self._search_ids(
                queries, k + 2, view, _widened(view.generation, fraction), allowed=allowed)
            results = self._keyed(scores, found, k, excluded)
            if all(len(r) >= min(k, len(ids)) for r in results):
                return results
        scores, found = exact_search_ids(self._vectors, queries, ids, k + 2, view.array)
        return self._keyed(scores, found, k, excluded)

    def _selected(self, spec: Filter, view: _View) -> np.ndarray:
        """The live ids below ``view.next_id`` that ``spec`` selects, sorted.

        Ids never change their item (a replaced key gets a new id), so the ids a filter
        selected below some ``next_id`` stay right: later calls ask SQLite only about the
        ids added since, and removals are masked by the live bitmap.
        """
        with self._filter_lock:
            upto, ids = self._filter_cache.pop(spec, (0, np.zeros(0, np.int64)))
        if upto < view.next_id:
            condition, params = spec.sql()
            new = np.fromiter(
                (i for (i,) in self._reader().execute(
                    f"SELECT id FROM items WHERE id >= ? AND id < ? AND ({condition}) "
                    "ORDER BY id", [upto, view.next_id, *params])),
                np.int64)
            ids, upto = np.concatenate([ids, new]), view.next_id
        with self._filter_lock:
            self._filter_cache[spec] = (upto, ids)
            while (len(self._filter_cache) > 1 and sum(
                    len(v[1]) for v in self._filter_cache.values()) > FILTER_CACHE_IDS):
                self._filter_cache.popitem(last=False)
        ids = ids[: np.searchsorted(ids, view.next_id)]
        return ids[view.alive.contains(ids)]

    def rank(self, query: np.ndarray, candidates: Sequence[str]) -> list[Match]:
        """All ``candidates`` sorted by exact cosine to ``query`` ``(dim,)``."""
        query = normalize_rows(query)
        self._check_dim(query)
        candidate_vectors = self.vectors(candidates)
        scores = candidate_vectors @ query[0]
        order = np.argsort(-scores, kind="stable")
        return _matches([candidates[i] for i in order], scores[order])

    # -- search internals ----------------------------------------------------------------

    def _search_ids(
        self, queries: np.ndarray, want: int, view: _View, knobs: dict[str, int] | None = None,
        generation: Generation | None = None, end: int | None = None,
        allowed: AliveBitmap | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exactly scored top-``want`` live ids (among ``allowed``, a subset of the live ids,
        when given): the generation's re-ranked shortlist for the ids it covers, an exact
        scan for the rows after them."""
        generation = generation if generation is not None else view.generation
        found_scores, found_ids = [], []
        covered = 0
        if generation is not None:
            fixed = self._manifest.get("search_params") or {}
            with generation.lock.read():
                covered = generation.covered
                shortlist = generation.search(
                    queries, want * RERANK_FACTOR, allowed or view.alive,
                    {**(knobs or {}), **fixed}
                )
            view = self._view  # at least as new as the rows the generation covered
            keep = view.alive.contains(shortlist)
            if allowed is not None:
                keep &= allowed.contains(shortlist)
            shortlist = np.where(keep, shortlist, -1)
            found_scores.append(rescore(self._vectors, queries, shortlist, view.array))
            found_ids.append(shortlist)
        end = view.next_id if end is None else end
        if covered < end:
            scores, ids = exact_search(
                self._vectors, allowed or view.alive, queries, want, covered, end, view.array
            )
            found_scores.append(scores)
            found_ids.append(ids)
        return merge_top(found_scores, found_ids, want)

    def _check_dim(self, queries: np.ndarray) -> None:
        if queries.shape[1] != self.dim:
            raise ModelMismatchError(
                f"query vectors have dimension {queries.shape[1]}, the index holds {self.dim}"
            )

    # -- maintenance internals -----------------------------------------------------------

    def _planned_factory(self, count: int) -> str:
        requested = self._manifest["factory"]
        pca = self._manifest.get("pca_dim")
        base = (
            choose_factory(count, pca or self.dim, self._manifest.get("memory_budget",
                                                                      DEFAULT_MEMORY_BUDGET))
            if requested == AUTO else requested
        )
        return f"PCA{pca},L2norm,{base}" if pca else base

    def _rebuild_due(self, generation: Generation | None, plan: str, count: int) -> bool:
        if generation is None:
            return plan != "Flat"
        if not generation.removable and generation.dead_fraction > REBUILD_DEAD_FRACTION:
            return True
        if plan == generation.factory:
            return False
        if self._manifest["factory"] != AUTO:
            return True
        if plan == "Flat":  # hysteresis: back to exact only well below the threshold
            return count * self.dim < FLAT_MAX_WORK // 2
        return not generation.built_count / 2 <= count <= 2 * generation.built_count

    def _maintain(self, force: bool) -> None:
        """One maintenance pass; the caller holds the maintenance lock."""
        if self._closed:
            return
        view = self._view
        count = view.alive.count
        plan = self._planned_factory(count)
        generation = view.generation
        if self._rebuild_due(generation, plan, count):
            if plan == "Flat":
                with self._write_lock:
                    self._view = _View(None, self._view.next_id, self._view.alive,
                                       self._view.array)
                log.info("serving exact search over %d vectors", count)
                return
            try:
                self._rebuild(plan, generation)
            except NotTrainableError as exc:
                log.debug("not building %s yet: %s", plan, exc)
            generation = self._view.generation
        if generation is None:
            return
        while generation.dead and generation.removable and not self._closed:
            with self._write_lock:
                generation.apply_removals(limit=4096)
        if force or self._view.next_id - generation.covered >= MERGE_MIN_ROWS:
            self._merge(generation)

    def _merge(self, generation: Generation) -> None:
        """Add the rows after ``generation.covered`` to its index, one chunk per lock hold."""
        chunk = MERGE_CHUNK[generation.family]
        while not self._closed:
            with self._write_lock:
                view = self._view
                start = generation.covered
                end = min(view.next_id, start + chunk)
                if start >= end:
                    return
                ids = start + np.flatnonzero(view.alive.range(start, end)).astype(np.int64)
                generation.add(ids, self._vectors.take(ids), covered=end)

    def _rebuild(self, plan: str, previous: Generation | None) -> None:
        """Build a generation for ``plan`` beside the serving one, catch it up, swap it in."""
        view = self._view
        number = (previous.number + 1) if previous else int(
            (self._manifest.get("index") or {}).get("generation", 0)) + 1
        generation, held = build_generation(
            number, plan, self._vectors, view.alive, view.next_id, lambda: self._closed
        )
        self._swap_in(generation, held, view.next_id)

    def _swap_in(self, generation: Generation, held: np.ndarray, end: int) -> None:
        """Catch ``generation`` (holding ``held``, built over ids ``0..end``) up with the
        writes made since, tune it, and serve it by replacing the view in one step."""
        self._merge(generation)
        self._tune(generation, TUNE_SAMPLE)
        with self._write_lock:
            self._merge(generation)
            alive = self._view.alive
            merged = np.concatenate([held, np.arange(end, generation.covered)])
            generation.dead = set(merged[~alive.contains(merged)].tolist())
            self._view = _View(generation, self._view.next_id, alive, self._view.array)
        log.info(
            "serving index generation %d: %s over %d vectors, recall@10 %.3f with %s",
            generation.number, generation.factory, generation.built_count,
            generation.recall or 0.0, generation.params,
        )

    def _tune(self, generation: Generation, sample: int) -> TuneReport:
        """Measure and set ``generation``'s knobs for the store's target recall."""
        view = self._view
        covered = generation.covered
        live = np.flatnonzero(view.alive.range(0, covered)).astype(np.int64)
        rng = np.random.default_rng(0)
        query_ids = np.sort(rng.choice(live, size=min(sample, len(live)), replace=False))
        queries = self._vectors.take(query_ids)
        _, truth = exact_search(self._vectors, view.alive, queries, 11, 0, covered, view.array)
        fixed = self._manifest.get("search_params") or {}
        family = generation.family
        nlist = faiss.extract_index_ivf(generation.index).nlist if family == "ivf" else 0
        grid = [fixed] if fixed else knob_grid(family, nlist)

        def search(batch: np.ndarray, k: int, knobs: dict[str, int]) -> np.ndarray:
            return self._search_ids(batch, k, view, knobs, generation, end=covered)[1]

        report = tune(generation.factory, grid,
                      search, truth, queries, query_ids,
                      target_recall=float(self._manifest["target_recall"]))
        generation.params = dict(report.chosen)
        generation.recall = report.recall
        generation.recall_sample = report.sample
        generation.dirty = True
        if not report.reached:
            log.warning("index %s reached recall@10 %.3f, below the target %.3f",
                        generation.factory, report.recall, report.target_recall)
        return report

    def _write_snapshot(self) -> None:
        """Write the serving generation's index file (if changed) and the manifest."""
        generation = self._view.generation
        files = dict(self._manifest.get("files", {}))
        db_generation = int(_meta(self._db, "generation", "0"))
        if generation is None:
            files = {}
        elif generation.dirty or not files:
            name = f"index-{generation.number:06d}-{db_generation:08d}.faiss"
            with generation.lock.read():
                atomic_write(self.path / name, lambda tmp: faiss.write_index(
                    generation.index, str(tmp)))
            generation.dirty = False
            files = {name: file_sha256(self.path / name)}
        self._manifest = dict(
            self._manifest,
            count=len(self),
            next_id=self._view.next_id,
            generation=db_generation,
            updated=time.time(),
            index=self._index_info(),
            files=files,
        )
        atomic_write(self.path / MANIFEST, json.dumps(self._manifest, indent=2, sort_keys=True))
        with self._db:  # the saved file holds exactly these removed ids
            self._db.execute("DELETE FROM tombstones")
            if generation is not None and generation.dead:
                self._db.executemany("INSERT INTO tombstones VALUES (?)",
                                     [(i,) for i in sorted(generation.dead)])
        for old in self.path.glob("index-*.faiss"):
            if old.name not in files:
                old.unlink(missing_ok=True)

    def _index_info(self) -> dict[str, Any]:
        generation = self._view.generation
        if generation is None:
            return {"factory": "Flat", "family": "exact", "recall_at_10": 1.0,
                    "pending": self._planned_factory(len(self))
                    if self._planned_factory(len(self)) != "Flat" else None}
        info = generation.info()
        info["unmerged"] = self._view.next_id - generation.covered
        return info

    # -- database internals --------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """This thread's read connection (WAL: it never waits for the writer)."""
        reader = getattr(self._local, "db", None)
        if reader is None:
            self._check_open()
            reader = connect(self.path / DATABASE, schema=False)
            self._local.db = reader
            with self._readers_lock:
                self._readers.append(reader)
        return reader

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the index store at {self.path} is closed")

    @staticmethod
    def _ids_of(keys: Sequence[str], connection: sqlite3.Connection) -> dict[str, int]:
        return dict(_select_in(connection, "SELECT key, id FROM items WHERE key IN", list(keys)))

    def _keys_of(self, ids: np.ndarray) -> dict[int, str]:
        """Keys of ``ids``, as one JSON row per query: each fetched row is a step into SQLite
        that gives up the GIL, and a search waits to get it back while a writer runs."""
        keys: dict[int, str] = {}
        for (pairs,) in _select_in(
                self._reader(), "SELECT json_group_array(json_array(id, key)) FROM items "
                "WHERE id IN", [int(i) for i in ids]):
            keys.update(json.loads(pairs))
        return keys

    def _delete_rows(self, found: dict[str, int]) -> None:
        """Delete items and tombstone their ids (inside the caller's transaction)."""
        self._db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in found.values()])
        generation = self._view.generation
        if generation is not None:
            self._db.executemany(
                "INSERT OR IGNORE INTO tombstones VALUES (?)",
                [(i,) for i in found.values() if i < generation.covered],
            )

    def _forget(
        self, alive: AliveBitmap, generation: Generation | None, found: dict[str, int]
    ) -> None:
        """Clear removed ids from the live set and mark those the index holds as dead."""
        if not found:
            return
        ids = np.fromiter(found.values(), np.int64)
        alive.clear(ids)
        if generation is not None:
            generation.dead.update(int(i) for i in ids if i < generation.covered)

    def _bump_generation(self) -> None:
        self._db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'generation'"
        )


def migrate(path: str | Path) -> dict[str, Any]:
    """Migrate a format-1 store (vectors as SQLite BLOBs) to format 2 in place; returns the
    new manifest. Safe to re-run after a crash: each step is atomic and idempotent."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest.get("format_version") == FORMAT_VERSION:
        return manifest
    started = time.perf_counter()
    log.warning("index store %s has format %s: migrating it to format %d (vectors move out of "
                "SQLite into %s)", path, manifest.get("format_version"), FORMAT_VERSION,
                vector_file_name("float32"))
    connection = connect(path / DATABASE, schema=False)
    vectors = VectorFile(path / vector_file_name("float32"), int(manifest["dim"]))
    try:
        if has_vector_column(connection):
            migrate_vectors_out(connection, vectors)
        count = connection.execute("SELECT count(*) FROM items").fetchone()[0]
        new = {
            **{name: manifest.get(name) for name in
               ("model_fingerprint", "model_name", "dim", "metric", "factory", "pca_dim",
                "created")},
            "format_version": FORMAT_VERSION,
            "vector_dtype": "float32",
            "target_recall": DEFAULT_TARGET_RECALL,
            "search_params": {},
            "memory_budget": DEFAULT_MEMORY_BUDGET,
            "count": count,
            "generation": int(_meta(connection, "generation", "0")),
            "updated": time.time(),
            "index": None,
            "files": {},
        }
        atomic_write(path / MANIFEST, json.dumps(new, indent=2, sort_keys=True))
    finally:
        connection.close()
        vectors.close()
    for old in ("vectors.npy", "index.faiss"):
        (path / old).unlink(missing_ok=True)
    log.warning("migrated %s: %d items in %.1f s", path, count, time.perf_counter() - started)
    return new


ITEM_COLUMNS = "key, path, sha256, metadata, thumbnail IS NOT NULL"


def _item(row: tuple[Any, ...]) -> Item:
    return Item(row[0], row[1], row[2], json.loads(row[3]), bool(row[4]))


def _matches(keys: Sequence[str], scores: np.ndarray) -> list[Match]:
    clipped = np.clip(scores, -1.0, 1.0)
    return [
        Match(key, float(score), rank)
        for rank, (key, score) in enumerate(zip(keys, clipped, strict=True), start=1)
    ]


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise StoreError(
            f"no index store at {path}: build one with 'lookalike index build'"
        ) from exc
    except json.JSONDecodeError as exc:
        raise StoreError(f"the manifest of {path} is damaged: {exc}") from exc


def _meta(connection: sqlite3.Connection, name: str, default: str) -> str:
    row = connection.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return row[0] if row else default


def _load_generation(
    path: Path, manifest: dict[str, Any], connection: sqlite3.Connection, next_id: int
) -> Generation | None:
    """The saved generation, if its file is there and is the one the manifest hashed."""
    info = manifest.get("index") or {}
    files = manifest.get("files") or {}
    if "covered" not in info:
        return None
    if len(files) != 1:
        log.warning("%s names no index file; serving exact search until one is rebuilt", path)
        return None
    ((name, digest),) = files.items()
    file = path / name
    if not file.is_file() or file_sha256(file) != digest or info["covered"] > next_id:
        log.warning("the index file of %s is missing or not the one its manifest hashed; "
                    "serving exact search until a new one is built", path)
        return None
    index = faiss.read_index(str(file))
    dead = {i for (i,) in connection.execute(
        "SELECT id FROM tombstones WHERE id < ?", (info["covered"],))}
    return Generation(
        number=int(info["generation"]), factory=info["factory"], index=index,
        covered=int(info["covered"]), built_count=int(info["built_count"]),
        params=dict(info.get("params") or {}), recall=info.get("recall_at_10"),
        recall_sample=int(info.get("recall_sample", 0)), dead=dead, dirty=False,
    )


def _live_bitmap(connection: sqlite3.Connection, next_id: int) -> AliveBitmap:
    """The live ids below ``next_id``, read ``LOAD_RANGE`` ids at a time: a range with no
    removals is one count, any other one JSON row (a Python tuple per id took ~8 s at 10M)."""
    alive = AliveBitmap(next_id)
    for start in range(0, next_id, LOAD_RANGE):
        stop = min(next_id, start + LOAD_RANGE)
        bounds = (start, stop)
        (count,) = connection.execute(
            "SELECT count(*) FROM items WHERE id >= ? AND id < ?", bounds).fetchone()
        if count == stop - start:
            alive.set_range(start, stop)
        elif count:
            (ids,) = connection.execute(
                "SELECT json_group_array(id) FROM items WHERE id >= ? AND id < ?", bounds
            ).fetchone()
            alive.set(np.array(json.loads(ids), np.int64))
    return alive


def _select_in(
    connection: sqlite3.Connection, select: str, values: list[Any], before: Sequence[Any] = ()
) -> Iterator[Any]:
    """The rows of ``select (values...)``, 500 values a query (under SQLite's limit on bound
    parameters); ``before`` binds the placeholders ``select`` itself holds."""
    for start in range(0, len(values), 500):
        chunk = values[start : start + 500]
        yield from connection.execute(f"{select} ({','.join('?' * len(chunk))})",
                                      [*before, *chunk])


def _widened(generation: Generation | None, fraction: float) -> dict[str, int]:
    """Knobs for a search where only ``fraction`` of the ids pass a filter: ``nprobe`` or
    ``efSearch`` grown by ``1 / fraction``, so about as many passing candidates are seen as
    an unfiltered search sees."""
    if generation is None or fraction >= 1:
        return {}
    widened = {}
    for name, value in generation.params.items():
        grown = int(np.ceil(value / max(fraction, 1e-6)))
        if name == "nprobe":
            grown = min(grown, faiss.extract_index_ivf(generation.index).nlist)
        widened[name] = min(grown, 4096)
    return widened


def _maintenance_loop(ref: weakref.ref[IndexStore], wake: threading.Event) -> None:
    """The background thread: merge, compact and rebuild when woken or every few seconds.

    It holds the store only weakly between passes, so a store that is dropped is collected.
    """
    faiss.omp_set_num_threads(MAINTENANCE_THREADS)
    while True:
        wake.wait(MAINTENANCE_INTERVAL_S)
        wake.clear()
        store = ref()
        if store is None or store._closed:
            return
        try:
            if store._maintenance_lock.acquire(timeout=1):
                try:
                    store._maintain(force=False)
                finally:
                    store._maintenance_lock.release()
        except Exception:  # noqa: BLE001 - the thread must survive to try again
            if not store._closed:
                log.exception("background index maintenance of %s failed", store.path)
        del store
