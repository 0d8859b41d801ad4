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


def line_up(lock: ReadWriteLock, order: list[str],
            plan: list[tuple[str, str, threading.Event]]) -> list[threading.Thread]:
    """Start one thread per (name, "read" or "write", release event), each once the one
    before it holds the lock or waits for it."""
    threads = []
    for name, mode, release in plan:
        def waiting(mode: str = mode) -> int:
            return lock._waiting_readers if mode == "read" else lock._waiting_writers

        before = waiting()
        threads.append(run(name, getattr(lock, mode), order, release))
        wait_until(lambda name=name, before=before: name in order or waiting() > before)
    return threads


def test_readers_waiting_for_a_writer_go_before_the_next_writer() -> None:
    """A merge of many chunks must not starve searches: a search waits for one chunk."""
    lock, order, go = ReadWriteLock(), [], threading.Event()
    threads = line_up(lock, order, [("writer-1", "write", go), ("reader", "read", go),
                                    ("writer-2", "write", go)])
    go.set()
    for thread in threads:
        thread.join(10)
    assert order == ["writer-1", "reader", "writer-2"]


def test_a_waiting_writer_holds_back_new_readers() -> None:
    """A stream of searches must not starve the merge that keeps the index current."""
    lock, order = ReadWriteLock(), []
    hold_first, go = threading.Event(), threading.Event()
    threads = line_up(lock, order, [("reader-1", "read", hold_first), ("writer", "write", go),
                                    ("reader-2", "read", go)])
    assert order == ["reader-1"]
    hold_first.set()
    go.set()
    for thread in threads:
        thread.join(10)
    assert order == ["reader-1", "writer", "reader-2"]
