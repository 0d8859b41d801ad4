"""Searches running while other threads add, remove, merge, compact, rebuild and save never
fail and never return a key whose removal had been acknowledged before the search began."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lookalike.index.store import IndexStore, normalize_rows

DIM = 16


@pytest.mark.parametrize(
    ("factory", "params"), [("IVF8,Flat", {"nprobe": 8}), ("HNSW16", {"efSearch": 64})]
)
def test_readers_never_fail_nor_see_removed_keys(
    tmp_path: Path, factory: str, params: dict
) -> None:
    rng = np.random.default_rng(0)
    store = IndexStore.create(tmp_path / "s", dim=DIM, model_fingerprint="m", factory=factory,
                              search_params=params)
    base = normalize_rows(rng.normal(size=(1000, DIM)))
    store.add([f"base{i}" for i in range(1000)], base)
    store.save()
    removed: list[str] = []  # appended only after remove() returned
    errors: list[BaseException] = []
    stop = threading.Event()
    searches = [0]

    def writer() -> None:
        wrng = np.random.default_rng(1)
        batch = 0
        while not stop.is_set():
            keys = [f"w{batch}-{j}" for j in range(50)]
            store.add(keys, normalize_rows(wrng.normal(size=(50, DIM))))
            victims = keys[:25] + ([f"base{batch}"] if batch < 1000 else [])
            store.remove(victims)
            removed.extend(victims)
            batch += 1

    def maintainer() -> None:
        while not stop.is_set():
            store.maintain()  # merge, apply removals (IVF), rebuild on tombstones (HNSW)
            store.save()
            time.sleep(0.05)

    def reader(seed: int) -> None:
        qrng = np.random.default_rng(seed)
        while not stop.is_set():
            gone = set(removed)
            queries = normalize_rows(qrng.normal(size=(4, DIM)))
            for matches in store.search(queries, k=10):
                seen = {m.key for m in matches}
                assert not seen & gone, f"removed keys returned: {sorted(seen & gone)[:5]}"
                assert len(matches) == 10
            searches[0] += 1

    def guarded(target, *args):
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                errors.append(exc)
                stop.set()
        return threading.Thread(target=run)

    threads = [guarded(writer), guarded(maintainer)] + [guarded(reader, s) for s in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(4)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[0]
    assert searches[0] > 20 and len(removed) > 100
    assert not set(store.keys()) & set(removed)
    (matches,) = store.search(base[999:1000], k=1)
    assert matches[0].key == "base999"
    store.close()
