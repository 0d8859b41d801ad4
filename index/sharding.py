"""Split an index store into shard stores for sharded serving, and merge shard answers.

A sharded service holds one part of the collection per shard, each a whole
:class:`~.store.IndexStore` of its own (its own ids, vector file and FAISS generations), so
a shard is served, tuned and maintained exactly like an unsharded store. Items are dealt to
shards round-robin in the source store's id order (item ``n`` in id order goes to shard
``n % S``), which keeps the shards within one item of each other in size and spreads every
batch of a build over all of them.

Because every store scores exactly (cosine, re-ranked on the raw vectors), the top-``k`` of
the union is the top-``k`` of the shards' top-``k`` lists merged by score: sharded answers
are the unsharded ones (:func:`merge_matches`).

The split is derived data, rebuilt when the source store changed: ``stamp.json`` records the
source's write generation, next id and count.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from lookalike.core.files import atomic_write

from .store import IndexStore, Match, StoreInputError

__all__ = ["SHARDS_DIR", "merge_matches", "shard_paths", "split_store"]

log = logging.getLogger(__name__)

SHARDS_DIR = "serve-shards"
_PAGE = 2048


def shard_paths(store_path: str | Path, shards: int) -> list[Path]:
    """Where the ``shards`` shard stores of ``store_path`` live."""
    base = Path(store_path) / SHARDS_DIR / str(shards)
    return [base / f"shard-{number:03d}" for number in range(shards)]


def _stamp(store: IndexStore) -> dict[str, int]:
    manifest = store.manifest
    return {"generation": int(manifest.get("generation", 0)),
            "next_id": int(manifest.get("next_id", 0)), "count": int(manifest["count"])}


def split_store(store_path: str | Path, shards: int, progress: bool = False) -> list[Path]:
    """Deal the items of the store at ``store_path`` to ``shards`` shard stores (vectors,
    metadata, paths, sha256 and thumbnails; the same factory, PCA and recall target) and
    return their paths; an up-to-date split is reused as it is."""
    if shards < 1:
        raise StoreInputError(f"the number of shards must be at least 1, got {shards}")
    paths = shard_paths(store_path, shards)
    stamp_file = paths[0].parent / "stamp.json"
    source = IndexStore.open(store_path, background=False)
    try:
        stamp = _stamp(source)
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            return paths
        if paths[0].parent.exists():
            shutil.rmtree(paths[0].parent)
        manifest = source.manifest
        targets = [
            IndexStore.create(
                path, dim=source.dim, model_fingerprint=source.model_fingerprint,
                model_name=manifest.get("model_name", ""), factory=manifest["factory"],
                pca_dim=manifest.get("pca_dim"),
                vector_dtype=manifest.get("vector_dtype", "float32"),
                target_recall=manifest["target_recall"],
                search_params=manifest.get("search_params") or None, background=False,
            )
            for path in paths
        ]
        try:
            _deal(source, targets)
        finally:
            for target in targets:
                target.save()
                target.close()
        atomic_write(stamp_file, json.dumps(stamp))
        log.info("split %s into %d shards of ~%d items", store_path, shards,
                 len(source) // shards)
        return paths
    finally:
        source.close()


def _deal(source: IndexStore, targets: Sequence[IndexStore]) -> None:
    """Copy the source's items, page by page in id order, round-robin into ``targets``."""
    position = 0
    while True:
        page = source.items(position, _PAGE)
        if not page:
            return
        keys = [item.key for item in page]
        vectors = source.vectors(keys)
        for number, target in enumerate(targets):
            chosen = [i for i in range(len(page)) if (position + i) % len(targets) == number]
            if not chosen:
                continue
            target.add(
                [keys[i] for i in chosen], vectors[chosen],
                paths=[page[i].path for i in chosen], sha256=[page[i].sha256 for i in chosen],
                metadata=[page[i].metadata for i in chosen],
                thumbnails=[source.thumbnail(keys[i]) for i in chosen],
            )
        position += len(page)


def merge_matches(lists: Sequence[Sequence[tuple[str, float]]], k: int) -> list[Match]:
    """The top ``k`` of several shards' ``(key, score)`` lists, by score (ties: shard order,
    then each shard's own order), ranked from 1."""
    merged = sorted(((score, shard, place, key)
                     for shard, found in enumerate(lists)
                     for place, (key, score) in enumerate(found)),
                    key=lambda entry: (-entry[0], entry[1], entry[2]))
    return [Match(key, float(score), rank)
            for rank, (score, _, _, key) in enumerate(merged[:k], start=1)]
