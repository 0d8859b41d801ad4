"""IndexStore against brute-force numpy, and its durability rules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from lookalike.core.errors import ConflictError, InvalidInputError, NotFoundError
from lookalike.index import store as store_module
from lookalike.index.store import (
    DuplicateKeyError,
    IndexStore,
    ModelMismatchError,
    StoreError,
    UnknownKeyError,
    normalize_rows,
)

DIM = 32


def random_vectors(n: int, seed: int = 0) -> np.ndarray:
    return normalize_rows(np.random.default_rng(seed).normal(size=(n, DIM)))


def new_store(
    path: Path, n: int = 200, **kwargs: object
) -> tuple[IndexStore, list[str], np.ndarray]:
    store = IndexStore.create(path, dim=DIM, model_fingerprint="f" * 64, **kwargs)
    keys = [f"item-{i:04d}" for i in range(n)]
    vectors = random_vectors(n)
    store.add(keys, vectors, metadata=[{"i": i} for i in range(n)])
    return store, keys, vectors


def brute_force(vectors: np.ndarray, keys: list[str], query: np.ndarray, k: int) -> list[str]:
    scores = vectors @ query
    return [keys[i] for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize(
    ("factory", "params"),
    [("Flat", {}), ("auto", {}), ("HNSW32", {"efSearch": 256}), ("IVF4,Flat", {"nprobe": 4})],
)
def test_search_matches_brute_force(tmp_path: Path, factory: str, params: dict) -> None:
    store, keys, vectors = new_store(tmp_path / "s", factory=factory, search_params=params)
    store.maintain()
    serving = store.manifest["index"]["factory"]
    assert serving == ("Flat" if factory == "auto" else factory)
    queries = random_vectors(10, seed=1)
    for query, matches in zip(queries, store.search(queries, k=5), strict=True):
        assert [m.key for m in matches] == brute_force(vectors, keys, query, 5)
        expected = np.sort(vectors @ query)[::-1][:5]
        np.testing.assert_allclose([m.score for m in matches], expected, atol=1e-5)
        assert [m.rank for m in matches] == [1, 2, 3, 4, 5]


def test_pca_rescores_exactly_on_raw_vectors(tmp_path: Path) -> None:
    store, keys, vectors = new_store(tmp_path / "s", pca_dim=16, factory="Flat")
    store.maintain()
    assert store.manifest["index"]["factory"] == "PCA16,L2norm,Flat"
    query = random_vectors(1, seed=3)[0]
    (matches,) = store.search(query[None], k=10)
    for match in matches:
        assert match.score == pytest.approx(float(vectors[keys.index(match.key)] @ query), abs=1e-5)
    assert store.manifest["pca_dim"] == 16 and store.factory == "PCA16,L2norm,Flat"


def test_rows_merged_into_a_pca_ivf_index_are_found_and_survive_reopen(tmp_path: Path) -> None:
    """Merges append pre-encoded codes to the IVF inside the PCA wrapper, in several lock
    holds; the wrapper's count, the covered mark and the search must all agree."""
    store, keys, vectors = new_store(tmp_path / "s", n=400, pca_dim=16, factory="IVF4,Flat",
                                     search_params={"nprobe": 4})
    store.maintain()
    more = random_vectors(2500, seed=5)
    more_keys = [f"more-{i:04d}" for i in range(len(more))]
    store.add(more_keys, more)
    store.maintain()  # 2,500 rows: three commits of COMMIT_ROWS
    info = store.manifest["index"]
    assert info["factory"] == "PCA16,L2norm,IVF4,Flat"
    assert info["indexed"] == info["covered"] == 2900
    for path in (None, tmp_path / "s"):
        if path is not None:
            store.save()
            store.close()
            store = IndexStore.open(path)
        for i in (0, 1234, 2499):
            (matches,) = store.search(more[i][None], k=1)
            assert matches[0].key == more_keys[i]
            assert matches[0].score == pytest.approx(1.0, abs=1e-5)
    store.close()


def test_an_add_to_an_ivf_store_is_in_the_index_when_add_returns(tmp_path: Path) -> None:
    """The writer merges its own rows into an IVF index (no unmerged tail for searches to
    scan, no background pass woken); HNSW rows still wait for the background merge."""
    store, keys, _ = new_store(tmp_path / "ivf", n=400, factory="IVF4,Flat",
                               search_params={"nprobe": 4})
    store.maintain()
    more = random_vectors(300, seed=9)
    store.add([f"more-{i}" for i in range(300)], more)
    info = store.manifest["index"]
    assert info["unmerged"] == 0 and info["indexed"] == info["covered"] == 700
    (matches,) = store.search(more[123][None], k=1)
    assert matches[0].key == "more-123"
    store.close()
    hnsw, _, _ = new_store(tmp_path / "hnsw", n=400, factory="HNSW32")
    hnsw.maintain()
    hnsw.add(["late"], random_vectors(1, seed=10))
    assert hnsw.manifest["index"]["unmerged"] == 1
    hnsw.close()


def test_a_failed_merge_does_not_fail_the_committed_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The add is committed before its rows are merged: if the merge fails, the add still
    succeeds, the rows are searched exactly, and the background pass merges them later."""
    store, _, _ = new_store(tmp_path / "s", n=400, factory="IVF4,Flat",
                            search_params={"nprobe": 4})
    store.maintain()
    generation = store._view.generation
    assert generation is not None

    def failing(*args: object, **kwargs: object) -> None:
        raise MemoryError("no room for the codes")

    monkeypatch.setattr(generation, "add", failing)
    more = random_vectors(50, seed=11)
    store.add([f"more-{i}" for i in range(50)], more)
    assert store.manifest["index"]["unmerged"] == 50
    (matches,) = store.search(more[7][None], k=1)
    assert matches[0].key == "more-7"
    monkeypatch.undo()
    store.maintain()
    assert store.manifest["index"]["unmerged"] == 0
    store.close()


def test_reopening_reads_the_live_ids_range_by_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open reads ids a range at a time (one count where nothing was removed, one JSON row
    where something was); the live set after reopening is exactly the one before."""
    monkeypatch.setattr(store_module, "LOAD_RANGE", 64)
    store, keys, vectors = new_store(tmp_path / "s", n=300)
    removed = keys[10:12] + keys[64:128] + [keys[299]]
    store.remove(removed)
    store.save()
    store.close()
    reopened = IndexStore.open(tmp_path / "s")
    assert sorted(reopened.keys()) == sorted(set(keys) - set(removed)) and len(reopened) == 233
    assert reopened._view.alive.count == 233
    (matches,) = reopened.search(vectors[200][None], k=1)
    assert matches[0].key == keys[200]
    found = {m.key for m in reopened.search(vectors[100][None], k=300)[0]}
    assert found == set(keys) - set(removed)
    reopened.close()


def test_rank_sorts_candidates_by_cosine(tmp_path: Path) -> None:
    store, keys, vectors = new_store(tmp_path / "s", n=20)
    query = random_vectors(1, seed=2)[0]
    candidates = keys[3:9]
    ranked = store.rank(query, candidates)
    assert [m.key for m in ranked] == brute_force(vectors[3:9], candidates, query, 6)
    with pytest.raises(UnknownKeyError, match="nope"):
        store.rank(query, ["item-0003", "nope"])


def test_exclude_and_k(tmp_path: Path) -> None:
    store, keys, vectors = new_store(tmp_path / "s", n=30)
    (matches,) = store.search(vectors[:1], k=3, exclude=[keys[0]])
    assert keys[0] not in [m.key for m in matches] and len(matches) == 3
    (everything,) = store.search(vectors[:1], k=100)
    assert len(everything) == 30


def test_add_remove_replace(tmp_path: Path) -> None:
    store, keys, vectors = new_store(tmp_path / "s", n=10)
    with pytest.raises(DuplicateKeyError):
        store.add([keys[0]], vectors[:1])
    store.add([keys[0]], -vectors[:1], replace=True)
    np.testing.assert_allclose(store.vectors([keys[0]])[0], -vectors[0], atol=1e-6)
    assert store.remove(keys[:4]) == 4
    assert len(store) == 6 and keys[1] not in store
    (matches,) = store.search(vectors[1:2], k=10)
    assert keys[1] not in {m.key for m in matches}
    with pytest.raises(UnknownKeyError):
        store.remove(["never-added"])
    with pytest.raises(StoreError, match="dimension"):
        store.add(["x"], np.ones((1, DIM + 1)))


def test_saved_store_reopens_identically(tmp_path: Path) -> None:
    store, keys, vectors = new_store(tmp_path / "s", n=50)
    store.remove(keys[:5])
    store.save()
    store.close()
    reopened = IndexStore.open(tmp_path / "s", model_fingerprint="f" * 64)
    assert reopened.keys() == keys[5:]
    assert reopened.get("item-0010").metadata == {"i": 10}
    np.testing.assert_allclose(reopened.vectors(keys[5:]), vectors[5:], atol=1e-6)


def test_another_models_store_is_refused(tmp_path: Path) -> None:
    store, _, _ = new_store(tmp_path / "s", n=5)
    store.close()
    with pytest.raises(ModelMismatchError, match="rebuild the index"):
        IndexStore.open(tmp_path / "s", model_fingerprint="0" * 64)


def test_unsaved_adds_survive_reopening(tmp_path: Path) -> None:
    """Every add is committed to SQLite: a stale snapshot is rebuilt from the database."""
    store, keys, vectors = new_store(tmp_path / "s", n=5)
    store.save()
    store.add(["late"], random_vectors(1, seed=9))
    store.close()  # no save: as if the process died here
    reopened = IndexStore.open(tmp_path / "s")
    assert "late" in reopened and len(reopened) == 6
    (matches,) = reopened.search(random_vectors(1, seed=9), k=1)
    assert matches[0].key == "late" and matches[0].score == pytest.approx(1.0, abs=1e-5)


def test_damaged_index_file_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    store, keys, vectors = new_store(tmp_path / "s", n=200, factory="HNSW32")
    store.save()
    store.close()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (name,) = manifest["files"]
    (tmp_path / "s" / name).write_bytes(b"garbage")
    reopened = IndexStore.open(tmp_path / "s")
    (matches,) = reopened.search(vectors[3:4], k=1)
    assert matches[0].key == keys[3]
    reopened.save()
    assert reopened.manifest["index"]["factory"] == "HNSW32"
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["count"] == 200


def test_swapped_index_file_is_never_loaded(tmp_path: Path) -> None:
    """A valid FAISS file that is not the one the manifest hashed (swapped or planted) is not
    deserialised: the store serves exact search and builds its own index again."""
    store, keys, vectors = new_store(tmp_path / "s", n=200, factory="IVF4,Flat",
                                     search_params={"nprobe": 4})
    store.save()
    store.close()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    ((name, digest),) = manifest["files"].items()
    planted = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    planted.add_with_ids(random_vectors(200, seed=99), np.arange(200, dtype=np.int64))
    faiss.write_index(planted, str(tmp_path / "s" / name))
    assert hashlib.sha256((tmp_path / "s" / name).read_bytes()).hexdigest() != digest
    reopened = IndexStore.open(tmp_path / "s", background=False)
    assert reopened.manifest["index"]["family"] == "exact"  # the planted file was refused
    assert [m[0].key for m in reopened.search(vectors, k=1)] == keys
    reopened.save()
    assert reopened.manifest["index"]["factory"] == "IVF4,Flat"
    assert [m[0].key for m in reopened.search(vectors, k=1)] == keys


def test_create_and_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no index store"):
        IndexStore.open(tmp_path / "missing")
    new_store(tmp_path / "s", n=1)
    with pytest.raises(StoreError, match="already holds"):
        IndexStore.create(tmp_path / "s", dim=DIM, model_fingerprint="f")
    with pytest.raises(StoreError, match="FAISS cannot build"):
        IndexStore.create(tmp_path / "t", dim=DIM, model_fingerprint="f", factory="Nonsense9")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        IndexStore.open(tmp_path / "s")


def test_untrainable_index_serves_exact_until_it_can_train(tmp_path: Path) -> None:
    """IVF64 needs 39 x 64 vectors to train: below that the store answers exactly from its
    vector file, and the index appears once there are enough."""
    store = IndexStore.create(tmp_path / "s", dim=DIM, model_fingerprint="f",
                              factory="IVF64,Flat", search_params={"nprobe": 64})
    vectors = random_vectors(2600)
    keys = [f"k{i}" for i in range(2600)]
    store.add(keys[:2], vectors[:2])
    store.save()
    assert store.manifest["index"]["family"] == "exact"
    assert store.search(vectors[1:2], k=1)[0][0].key == "k1"
    store.add(keys[2:], vectors[2:])
    store.save()
    assert store.manifest["index"]["factory"] == "IVF64,Flat"
    assert [m[0].key for m in store.search(vectors[:50], k=1)] == keys[:50]


def test_failed_add_stores_nothing(tmp_path: Path) -> None:
    """Every metadata object is checked before anything is written."""
    store, keys, vectors = new_store(tmp_path / "s", n=5)
    with pytest.raises(InvalidInputError, match="finite"):
        store.add(["a", "b"], random_vectors(2), metadata=[{"ok": 1}, {"bad": float("nan")}])
    with pytest.raises(InvalidInputError):
        store.add(["a"], np.full((1, DIM), np.nan))
    assert len(store) == 5 and "a" not in store
    store.add(["a"], random_vectors(1, seed=4), metadata=[{"name": "ä"}])
    assert store.get("a").metadata == {"name": "ä"}


def test_errors_have_kinds() -> None:
    assert issubclass(UnknownKeyError, NotFoundError)
    assert issubclass(DuplicateKeyError, ConflictError)
    assert issubclass(ModelMismatchError, InvalidInputError)
    assert all(issubclass(e, StoreError) for e in (UnknownKeyError, DuplicateKeyError))


def test_float16_vectors_and_tune_report(tmp_path: Path) -> None:
    store, keys, vectors = new_store(tmp_path / "s", n=300, vector_dtype="float16",
                                     factory="IVF4,Flat")
    store.save()
    assert (tmp_path / "s" / "vectors.f16").exists()
    np.testing.assert_allclose(store.vectors(keys[:3]), vectors[:3], atol=2e-3)
    report = store.tune(target_recall=0.99)
    assert report.factory == "IVF4,Flat" and report.reached and report.recall >= 0.99
    assert report.chosen == store.manifest["index"]["params"]
    assert store.manifest["index"]["recall_at_10"] == report.recall
    assert [t["params"]["nprobe"] for t in report.tried] == [1, 2, 4][: len(report.tried)]
