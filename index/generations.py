"""Index generations: a FAISS index over the store's ids, built beside the serving one.

A :class:`Generation` is derived data: a FAISS index whose labels are the store's int64 ids,
covering ids ``0..covered`` (the live ones when they were merged), plus the search knobs
tuned for it and the recall they measured. The store serves one generation; a new one
(retrained as the store grew, re-chosen by ``auto``, compacted after many removals, or built
from another model's vectors) is built from the vector file without any lock, caught up
with the writes that happened meanwhile, and swapped in by replacing one reference. Readers
that started on the old generation finish on it; nothing mutates it after the swap.

Within a generation, index changes (merging newly added rows, applying removals) take the
generation's write lock for one chunk at a time; searches take its read lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from .liveness import AliveBitmap
from .locks import ReadWriteLock
from .vectors import VectorFile

__all__ = [
    "Generation",
    "NotTrainableError",
    "build_generation",
    "describe_family",
    "index_ids",
    "new_faiss_index",
    "same_structure",
    "trained_index",
    "training_minimum",
]

log = logging.getLogger(__name__)

#: Rows added to a FAISS index per write-lock hold while merging; HNSW inserts are slow
#: (each walks the graph), so they go in smaller steps to keep reader waits short.
MERGE_CHUNK = {"hnsw": 8, "ivf": 4096, "other": 4096}
#: Encoded IVF rows appended per write-lock hold (a memcpy into the lists: ~0.1 ms).
COMMIT_ROWS = 1024
#: Spare room given to each inverted list (and HNSW array) when a generation starts serving:
#: 1 / this.
LIST_HEADROOM = 4
_BUILD_CHUNK = 1 << 15
_TRAIN_SAMPLE_PER_LIST = 64


class NotTrainableError(Exception):
    """Too few live vectors to train this index type yet; the store stays exact until then."""


def new_faiss_index(dim: int, factory: str) -> faiss.Index:
    """``index_factory`` with inner product, wrapped in ``IndexIDMap2`` unless it takes ids."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    return index if _ivf(index) is not None else faiss.IndexIDMap2(index)


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index: faiss.Index) -> Any:
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap2):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def describe_family(index: faiss.Index) -> str:
    """``ivf``, ``hnsw`` or ``other``: what decides how removals and knobs work."""
    if _ivf(index) is not None:
        return "ivf"
    return "hnsw" if _hnsw(index) is not None else "other"


def training_minimum(dim: int, factory: str) -> int:
    """Live vectors needed before ``factory`` can be trained (FAISS's own rules of thumb)."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    need = 1
    ivf = _ivf(index)
    if ivf is not None:
        need = max(need, 39 * ivf.nlist)
    if "PQ" in factory:
        need = max(need, 256)
    if factory.startswith("PCA"):
        need = max(need, dim)
    return need


@dataclass
class Generation:
    """One FAISS index over store ids ``0..covered``, with its tuned knobs and measured recall."""

    number: int
    factory: str
    index: faiss.Index
    covered: int
    built_count: int
    params: dict[str, int] = field(default_factory=dict)
    recall: float | None = None
    recall_sample: int = 0
    dead: set[int] = field(default_factory=set)
    """Ids in the index that are no longer live (tombstones not yet removed from it)."""
    dirty: bool = True
    lock: ReadWriteLock = field(default_factory=ReadWriteLock)

    def __post_init__(self) -> None:
        self.family = describe_family(self.index)  # asked on every search: computed once
        self.ivf = _ivf(self.index)  # the IVF inside (or None); downcasting costs a SWIG call
        self._reserve_headroom()

    def _reserve_headroom(self) -> None:
        """Give the index's growing arrays spare capacity before the generation serves.

        Why: an index read from disk has every array sized exactly to its content, so the
        first merge after ``open`` makes them all reallocate and copy themselves inside one
        write-lock hold, every search waiting (measured: 32 ms at 300k IVF items, ~100 ms at
        1M; 83 ms for the first 8 HNSW inserts at 100k, 2 ms after). Growing each array by a
        quarter and shrinking it back keeps the capacity (``std::vector``), so later appends
        are plain copies and IVF lists outgrow their room at different times. Costs ~16 ms
        per 300k IVF items, ~100 ms per 100k HNSW items, once, before any reader sees it."""
        if self.ivf is not None:
            lists = self.ivf.invlists
            for number in range(self.ivf.nlist):
                size = lists.list_size(number)
                lists.resize(number, size + size // LIST_HEADROOM + 16)
                lists.resize(number, size)
            return
        hnsw = _hnsw(self.index)
        if hnsw is None:
            return
        arrays = [hnsw.hnsw.neighbors, hnsw.hnsw.levels, hnsw.hnsw.offsets]
        storage = faiss.downcast_index(hnsw.storage)
        if hasattr(storage, "codes"):
            arrays.append(storage.codes)
        top = faiss.downcast_index(self.index)
        if isinstance(top, faiss.IndexIDMap2):
            arrays.append(top.id_map)
        for array in arrays:
            if getattr(array, "is_owned", True):  # a view of a mapped file cannot grow
                size = array.size()
                array.resize(size + size // LIST_HEADROOM + 16)
                array.resize(size)

    @property
    def removable(self) -> bool:
        """Whether removals can be applied in place (IVF) rather than by a rebuild (HNSW)."""
        return self.family != "hnsw"

    @property
    def dead_fraction(self) -> float:
        return len(self.dead) / max(1, self.index.ntotal)

    def search(
        self,
        queries: np.ndarray,
        fetch: int,
        alive: AliveBitmap,
        params: dict[str, int] | None = None,
    ) -> np.ndarray:
        """Candidate ids ``(Q, fetch)`` among live ids; the caller holds ``lock.read()``."""
        knobs = {**self.params, **(params or {})}
        search_params = self._search_parameters(alive, knobs)
        over = 0 if search_params is not None else len(self.dead)
        _, ids = self.index.search(queries, min(fetch + over, max(1, self.index.ntotal)),
                                   params=search_params)
        return ids

    def _search_parameters(self, alive: AliveBitmap, knobs: dict[str, int]) -> Any:
        """FAISS search parameters that skip removed ids; ``None`` where the type has none."""
        family = self.family
        if family == "ivf":
            ivf_params = faiss.SearchParametersIVF(
                sel=alive.selector, nprobe=knobs.get("nprobe", 1)
            )
            if isinstance(faiss.downcast_index(self.index), faiss.IndexPreTransform):
                return faiss.SearchParametersPreTransform(index_params=ivf_params)
            return ivf_params
        if family == "hnsw":
            return faiss.SearchParametersHNSW(
                sel=alive.selector, efSearch=knobs.get("efSearch", 16)
            )
        inner = faiss.downcast_index(self.index)
        if isinstance(inner, faiss.IndexIDMap2) and not isinstance(
            faiss.downcast_index(inner.index), faiss.IndexPreTransform
        ):
            return faiss.SearchParameters(sel=alive.selector)
        return None

    def add(self, ids: np.ndarray, vectors: np.ndarray, covered: int | None = None) -> None:
        """Add rows in ascending id order, moving ``covered`` with them.

        For IVF types the expensive part (list assignment and encoding, ``sa_encode``) runs
        before any lock; the write lock is then held only to append ready codes to the
        lists, ``COMMIT_ROWS`` at a time (well under a millisecond each), so a search never
        waits for more than that. ``covered`` moves in the same lock hold as the rows, so a
        reader never sees a row both in the index and in the unmerged tail.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ivf = self.ivf if len(ids) else None
        if ivf is None:
            with self.lock.write():
                if len(ids):
                    self.index.add_with_ids(vectors, ids)
                if covered is not None:
                    self.covered = covered
            self.dirty = True
            return
        codes = self.index.sa_encode(vectors)  # through any pre-transform (PCA) too
        for start in range(0, len(ids), COMMIT_ROWS):
            stop = min(start + COMMIT_ROWS, len(ids))
            with self.lock.write():
                ivf.add_sa_codes(codes[start:stop], ids[start:stop])
                self.index.ntotal = ivf.ntotal  # a pre-transform wrapper counts its IVF's rows
                if covered is not None:
                    self.covered = covered if stop == len(ids) else int(ids[stop - 1]) + 1
        self.dirty = True

    def apply_removals(self, limit: int = 1 << 16) -> int:
        """Remove up to ``limit`` dead ids from a removable index; returns how many."""
        if not self.dead or not self.removable:
            return 0
        batch = np.fromiter(list(self.dead)[:limit], np.int64)
        with self.lock.write():
            self.index.remove_ids(faiss.IDSelectorBatch(batch))
        self.dead.difference_update(batch.tolist())
        self.dirty = True
        return len(batch)

    def info(self) -> dict[str, Any]:
        """What the manifest records about this generation."""
        return {
            "generation": self.number,
            "factory": self.factory,
            "family": self.family,
            "covered": self.covered,
            "indexed": int(self.index.ntotal),
            "built_count": self.built_count,
            "params": dict(self.params),
            "recall_at_10": self.recall,
            "recall_sample": self.recall_sample,
            "tombstones": len(self.dead),
        }


def trained_index(
    factory: str, dim: int, live_ids: np.ndarray, take: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
) -> faiss.Index:
    """An empty ``factory`` index trained on a sample of ``live_ids`` (``take`` reads their
    vectors). Every generation is trained here, whether the store fills it or a cluster
    fills copies of it shard by shard (:meth:`~.store.IndexStore.adopt_index`), so both
    get the same centroids from the same sample. Raises :class:`NotTrainableError` when
    there are too few vectors for ``factory``."""
    need = training_minimum(dim, factory)
    if len(live_ids) < need:
        raise NotTrainableError(f"{factory} needs {need} vectors to train, the store has "
                                f"{len(live_ids)}")
    index = new_faiss_index(dim, factory)
    if not index.is_trained:
        ivf = _ivf(index)
        sample_size = len(live_ids)
        if ivf is not None:
            sample_size = min(sample_size, max(need, _TRAIN_SAMPLE_PER_LIST * ivf.nlist))
            ivf.cp.max_points_per_centroid = max(1, sample_size // ivf.nlist + 1)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(live_ids, size=min(sample_size, len(live_ids)), replace=False))
        index.train(take(sample))
    return index


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index holds (sorted), read from its inverted lists or its id map; what
    :meth:`~.store.IndexStore.adopt_index` checks against the store's live ids."""
    ivf = _ivf(index)
    if ivf is not None:
        lists = ivf.invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(number), lists.list_size(number)).copy()
                 for number in range(ivf.nlist) if lists.list_size(number)]
    else:
        inner = faiss.downcast_index(index)
        if not isinstance(inner, faiss.IndexIDMap):  # IndexIDMap2 is one
            raise ValueError(f"a {type(inner).__name__} has no ids to read: wrap it in an "
                             "IndexIDMap2 or use an IVF index")
        parts = [faiss.vector_to_array(inner.id_map)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def same_structure(index: faiss.Index, factory: str) -> bool:
    """Whether ``index`` is what ``new_faiss_index(index.d, factory)`` makes: the same index
    classes, and for IVF the same list count and code size."""
    reference = new_faiss_index(index.d, factory)

    def shape(candidate: faiss.Index) -> tuple[Any, ...]:
        ivf = _ivf(candidate)
        top = faiss.downcast_index(candidate)
        if ivf is not None:
            layout: tuple[Any, ...] = (type(faiss.downcast_index(ivf)).__name__, ivf.nlist,
                                       ivf.code_size)
        elif isinstance(top, faiss.IndexIDMap):
            layout = (type(faiss.downcast_index(top.index)).__name__,)
        else:
            layout = ()
        return (type(top).__name__, *layout)

    return shape(index) == shape(reference)


def build_generation(
    number: int,
    factory: str,
    vectors: VectorFile,
    alive: AliveBitmap,
    end: int,
    cancelled: Callable[[], bool] = lambda: False,
    seed: int = 0,
) -> tuple[Generation, np.ndarray]:
    """Train and fill a new generation over the live ids in ``0..end`` (no lock needed).

    Returns the generation and the ids it holds, so the caller can find which of them were
    removed while it was being built. Raises :class:`NotTrainableError` when there are too
    few live vectors to train ``factory``.
    """
    started = time.perf_counter()
    live_ids = np.flatnonzero(alive.range(0, end)).astype(np.int64)
    index = trained_index(factory, vectors.dim, live_ids, vectors.take, seed)
    generation = Generation(number, factory, index, covered=end, built_count=len(live_ids))
    for offset in range(0, len(live_ids), _BUILD_CHUNK):
        if cancelled():
            raise NotTrainableError("the store was closed during the build")
        chunk = live_ids[offset : offset + _BUILD_CHUNK]
        generation.add(chunk, vectors.take(chunk))
    log.info(
        "built index generation %d (%s) over %d vectors in %.1f s",
        number, factory, len(live_ids), time.perf_counter() - started,
    )
    return generation, live_ids
