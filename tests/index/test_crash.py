"""kill -9 in the middle of adding, saving and compacting: the store opens and keeps every
acknowledged write (adds present, removals gone)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lookalike.index.store import IndexStore

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from lookalike.index.store import IndexStore

    path, mode = sys.argv[1], sys.argv[2]
    factory = {"add": "auto", "save": "auto", "compact": "IVF4,Flat", "hnsw": "HNSW8"}[mode]
    store = IndexStore.create(path, dim=16, model_fingerprint="crash-test", factory=factory)
    rng = np.random.default_rng(0)
    if mode in ("compact", "hnsw"):
        store.add([f"base{i}" for i in range(400)], rng.normal(size=(400, 16)))
        store.save()
    for i in range(100000):
        store.add([f"k{i}"], rng.normal(size=(1, 16)), metadata=[{"i": i}])
        print(f"ack k{i}", flush=True)   # acknowledged: add() returned
        if mode in ("compact", "hnsw"):
            store.remove([f"base{i % 400}"] if i < 400 else [f"k{i - 300}"])
            print(f"gone {f'base{i % 400}' if i < 400 else f'k{i - 300}'}", flush=True)
            store.maintain()             # applies removals / rebuilds: killed in the middle
        if mode == "save" or i % 7 == 0:
            store.save()
    """
)


@pytest.mark.parametrize("mode", ["add", "save", "compact", "hnsw"])
def test_kill_9_loses_no_acknowledged_write(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[str] = []
    gone: set[str] = set()
    deadline = time.monotonic() + 60
    assert process.stdout is not None
    while len(acked) < 120 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("ack "):
            acked.append(line.split()[1])
        elif line.startswith("gone "):
            gone.add(line.split()[1])
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert len(acked) >= 120, "the writer did not get going"

    store = IndexStore.open(path, model_fingerprint="crash-test")
    keys = set(store.keys())
    kept = [key for key in acked if key not in gone]
    assert set(kept) <= keys
    assert not keys & gone
    assert len(keys - set(kept) - {f"base{i}" for i in range(400)}) <= 1  # the add in flight
    vectors = store.vectors(kept)
    (matches,) = store.search(vectors[-1:], k=1)
    assert matches[0].key == kept[-1]
    store.save()
    assert [m[0].key for m in store.search(vectors[-20:], k=1)] == kept[-20:]
    store.close()
