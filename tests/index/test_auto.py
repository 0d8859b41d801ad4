"""``factory="auto"``: exact while small, then an IVF index chosen, trained and tuned in the
background and swapped in atomically; re-chosen as the store grows past 2x."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from lookalike.index import tuning
from lookalike.index.store import IndexStore, normalize_rows

DIM = 8


def test_choose_factory_follows_size_and_budget() -> None:
    assert tuning.choose_factory(10_000, 256) == "Flat"
    assert tuning.choose_factory(1_000_000, 256) == "IVF1024,SQ8"
    assert tuning.choose_factory(10_000_000, 256) == "IVF4096,SQ8"
    assert tuning.choose_factory(10_000_000, 256, memory_budget=1 << 30) == "IVF4096,PQ64"


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the background thread did not get there"
        time.sleep(0.05)


def test_auto_rechooses_in_the_background(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "FLAT_MAX_WORK", 1000 * DIM)  # exact up to 1000 items
    rng = np.random.default_rng(0)
    vectors = normalize_rows(rng.normal(size=(20000, DIM)))
    keys = [f"k{i}" for i in range(20000)]
    store = IndexStore.create(tmp_path / "s", dim=DIM, model_fingerprint="m")
    store.add(keys[:900], vectors[:900])
    store.maintain()
    assert store.manifest["index"]["family"] == "exact"

    store.add(keys[900:3000], vectors[900:3000])  # 3000 > 1000: IVF64,SQ8 (64 lists at least)
    wait_for(lambda: store.manifest["index"]["factory"] == "IVF64,SQ8")
    first = store.manifest["index"]
    assert first["recall_at_10"] >= 0.95 and "nprobe" in first["params"]
    assert [m[0].key for m in store.search(vectors[:20], k=1)] == keys[:20]

    store.add(keys[3000:], vectors[3000:])  # 20000 > 2 x 3000 and sqrt(20000) ~ 141: IVF128
    wait_for(lambda: store.manifest["index"]["factory"] == "IVF128,SQ8")
    second = store.manifest["index"]
    assert second["generation"] == first["generation"] + 1
    assert [m[0].key for m in store.search(vectors[-20:], k=1)] == keys[-20:]
    store.save()
    store.close()
    reopened = IndexStore.open(tmp_path / "s", background=False)
    assert reopened.manifest["index"]["factory"] == "IVF128,SQ8" and len(reopened) == 20000
    report = reopened.tune(target_recall=0.99)
    assert report.factory == "IVF128,SQ8" and report.recall == reopened.manifest["index"][
        "recall_at_10"]
    reopened.close()
