"""A readers-writer lock: many searches at once, one index mutation at a time.

FAISS indexes are safe to search from many threads but not while they are being changed.
Index changes in the store are small (one merge chunk, one batch of removals), so a writer
holds this lock for milliseconds. It is phase-fair: a waiting writer stops new readers from
starting (a stream of searches cannot starve the merge that keeps the index current), and
when a writer is done, the readers that waited for it go before the next writer (a merge of
many chunks cannot starve the searches: a search waits for at most one chunk).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ReadWriteLock"]


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._readers_turn = False
        """Set when a writer finishes with readers waiting; cleared when they have all started."""

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._waiting_readers += 1
            while self._writing or (self._waiting_writers and not self._readers_turn):
                self._cond.wait()
            self._waiting_readers -= 1
            if not self._waiting_readers:
                self._readers_turn = False
                self._cond.notify_all()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writing or self._readers or self._readers_turn:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._readers_turn = self._waiting_readers > 0
                self._cond.notify_all()
