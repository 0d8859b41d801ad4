"""kill -9 in the middle of adding and of saving: the store opens and keeps every acked add."""

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
    store = IndexStore.create(path, dim=16, model_fingerprint="crash-test")
    rng = np.random.default_rng(0)
    for i in range(100000):
        store.add([f"k{i}"], rng.normal(size=(1, 16)), metadata=[{"i": i}])
        print(f"ack k{i}", flush=True)   # acknowledged: add() returned
        if mode == "save" or i % 7 == 0:
            store.save()
    """
)


@pytest.mark.parametrize("mode", ["add", "save"])
def test_kill_9_loses_no_acknowledged_add(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[str] = []
    deadline = time.monotonic() + 60
    assert process.stdout is not None
    while len(acked) < 40 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("ack "):
            acked.append(line.split()[1])
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert len(acked) >= 40, "the writer did not get going"

    store = IndexStore.open(path, model_fingerprint="crash-test")
    keys = set(store.keys())
    assert set(acked) <= keys
    assert len(keys) - len(acked) <= 1  # at most the add that was in flight
    vectors = store.vectors(acked)
    (matches,) = store.search(vectors[-1:], k=1)
    assert matches[0].key == acked[-1]
    store.close()
