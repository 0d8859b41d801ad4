"""Which item ids are live: one bit per id, shared by the exact scan and FAISS's IDSelector.

The store's SQLite table is the truth; this bitmap is its in-memory mirror, rebuilt at open
from ``SELECT id FROM items``. It is laid out the way ``faiss.IDSelectorBitmap`` reads it
(bit ``i & 7`` of byte ``i >> 3``), so FAISS skips removed ids during search without a copy.

Writers (serialised by the store's write lock) flip bits in place; a reader that races a
flip sees the byte before or after it, never anything else. When the bitmap must grow, a new
array replaces the old one (copy-on-write), so a reader holding the old array and its
selector keeps a consistent, if slightly older, view.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["AliveBitmap"]


class AliveBitmap:
    """A growable set of live ids as a little-endian bitmap, with a FAISS selector over it."""

    def __init__(self, capacity: int = 0) -> None:
        self.bits = np.zeros(max(8, (capacity + 7) // 8 + 1), np.uint8)
        self.selector = faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits))
        self.count = 0

    def grown(self, capacity: int) -> AliveBitmap:
        """This bitmap, or a larger copy of it when ``capacity`` ids do not fit."""
        if (capacity + 7) // 8 <= len(self.bits):
            return self
        bigger = AliveBitmap(max(capacity, 16 * len(self.bits)))
        bigger.bits[: len(self.bits)] = self.bits
        bigger.count = self.count
        return bigger

    def subset(self, ids: np.ndarray) -> AliveBitmap:
        """A new bitmap of the live ids among ``ids`` (a filter's selection), for FAISS's
        selector and the exact scan; this one is not changed."""
        ids = np.asarray(ids, dtype=np.int64)
        mask = np.zeros(8 * len(self.bits), bool)
        mask[ids[(ids >= 0) & (ids < len(mask))]] = True
        subset = AliveBitmap(0)
        subset.bits = np.packbits(mask, bitorder="little") & self.bits
        subset.selector = faiss.IDSelectorBitmap(len(subset.bits), faiss.swig_ptr(subset.bits))
        subset.count = int(np.bitwise_count(subset.bits).sum())
        return subset

    def set(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        before = self.contains(ids)
        np.bitwise_or.at(self.bits, ids >> 3, (1 << (ids & 7)).astype(np.uint8))
        self.count += int(len(np.unique(ids[~before])))

    def set_range(self, start: int, stop: int) -> None:
        """Mark ids ``start..stop`` live with byte operations: an add's new ids are one
        contiguous range, and this keeps the writer's hold on the GIL short."""
        if stop <= start:
            return
        first, last = start >> 3, (stop - 1) >> 3
        before = int(np.bitwise_count(self.bits[first : last + 1]).sum())
        low = (0xFF << (start & 7)) & 0xFF
        high = (1 << (((stop - 1) & 7) + 1)) - 1
        if first == last:
            self.bits[first] |= low & high
        else:
            self.bits[first] |= low
            self.bits[first + 1 : last] = 0xFF
            self.bits[last] |= high
        self.count += int(np.bitwise_count(self.bits[first : last + 1]).sum()) - before

    def clear(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        before = self.contains(ids)
        np.bitwise_and.at(self.bits, ids >> 3, (~(1 << (ids & 7))).astype(np.uint8))
        self.count -= int(len(np.unique(ids[before])))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean array: which of ``ids`` are live (ids past the bitmap are not)."""
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & ((ids >> 3) < len(self.bits))
        safe = np.where(inside, ids, 0)
        return inside & ((self.bits[safe >> 3] >> (safe & 7)) & 1).astype(bool)

    def range(self, start: int, end: int) -> np.ndarray:
        """Boolean array of length ``end - start``: which ids in ``start..end`` are live."""
        if end <= start:
            return np.zeros(0, bool)
        first, last = start >> 3, (end + 7) >> 3
        unpacked = np.unpackbits(self.bits[first:last], bitorder="little").astype(bool)
        offset = start - 8 * first
        return np.pad(unpacked, (0, max(0, end - start + offset - len(unpacked))))[
            offset : offset + end - start
        ]
