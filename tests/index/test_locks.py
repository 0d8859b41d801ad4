"""The store's readers-writer lock: phase-fair order, checked step by step (no timing)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lookalike.index.locks import ReadWriteLock


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the threads never reached the expected state"
        time.sleep(0.001)


def run(name: str, take, order: list[str], release: threading.Event) -> threading.Thread:
    def body() -> None:
        with take():
            order.append(name)
            release.wait(10)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_readers_waiting_for_a_writer_go_before_the_next_writer() -> None:
    """A merge of many chunks must not starve searches: a search waits for one chunk."""
    lock, order, go = ReadWriteLock(), [], threading.Event()
    first = run("writer-1", lock.write, order, go)
    wait_until(lambda: order == ["writer-1"])
    reader = run("reader", lock.read, order, go)
    wait_until(lambda: lock._waiting_readers == 1)
    second = run("writer-2", lock.write, order, go)
    wait_until(lambda: lock._waiting_writers == 1)
    go.set()
    for thread in (first, reader, second):
        thread.join(10)
    assert order == ["writer-1", "reader", "writer-2"]


def test_a_waiting_writer_holds_back_new_readers() -> None:
    """A stream of searches must not starve the merge that keeps the index current."""
    lock, order = ReadWriteLock(), []
    hold_first, go = threading.Event(), threading.Event()
    first = run("reader-1", lock.read, order, hold_first)
    wait_until(lambda: order == ["reader-1"])
    writer = run("writer", lock.write, order, go)
    wait_until(lambda: lock._waiting_writers == 1)
    second = run("reader-2", lock.read, order, go)
    wait_until(lambda: lock._waiting_readers == 1)
    assert order == ["reader-1"]
    hold_first.set()
    go.set()
    for thread in (first, writer, second):
        thread.join(10)
    assert order == ["reader-1", "writer", "reader-2"]
