"""The append-only vector file: one fixed-size row per item id, opened memory-mapped.

Row ``i`` of ``vectors.f32`` (or ``vectors.f16``) is the L2-normalised vector of the item
whose SQLite id is ``i``. Rows are only ever appended, never moved, so an add writes its rows
(O(batch)) and a remove writes nothing here: the id's row simply stops being live. The file
grows in large steps (a sparse ``ftruncate``) and the read mapping is replaced when it does;
readers that hold the old mapping keep a valid view of the rows they knew about.

Durability: :meth:`VectorFile.write` ``fdatasync``\\ s the rows before it returns, and the
store commits the SQLite rows that name those ids only after that, so an acknowledged add
never points at a row that is not on disk. Rows past the committed ``next_id`` are garbage
from an add that failed or was killed and are overwritten by the next add.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["VECTOR_DTYPES", "VectorFile", "vector_file_name"]

#: Storage types a store may keep its vectors in (float16 halves the file; scores are
#: always computed in float32).
VECTOR_DTYPES = {"float32": np.float32, "float16": np.float16}
_GROWTH_ROWS = 1 << 14


def vector_file_name(dtype: str) -> str:
    return "vectors.f16" if dtype == "float16" else "vectors.f32"


class VectorFile:
    """Rows of ``dim`` values of ``dtype`` in one file; ``rows``/``take`` return float32."""

    def __init__(self, path: Path, dim: int, dtype: str = "float32") -> None:
        self.path = path
        self.dim = dim
        self.dtype = np.dtype(VECTOR_DTYPES[dtype])
        self.row_bytes = dim * self.dtype.itemsize
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._capacity = os.fstat(self._fd).st_size // self.row_bytes
        self._map = self._mapping()

    def _mapping(self) -> np.ndarray:
        if self._capacity == 0:
            return np.zeros((0, self.dim), self.dtype)
        mapped = np.memmap(self.path, self.dtype, mode="r", shape=(self._capacity, self.dim))
        # a plain ndarray view of the mapping (which it keeps alive): np.memmap runs Python
        # hooks on every slice and fancy index, on the search path and under the writer's GIL
        return mapped.view(np.ndarray)

    @property
    def array(self) -> np.ndarray:
        """The current read mapping ``(capacity, dim)``; rows past ``next_id`` are not items."""
        return self._map

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` at ids ``start..start+len(rows)`` and flush them to disk."""
        end = start + len(rows)
        if end > self._capacity:
            capacity = max(end, 2 * self._capacity, _GROWTH_ROWS)
            os.ftruncate(self._fd, capacity * self.row_bytes)
            self._capacity = capacity
            self._map = self._mapping()
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        written = os.pwrite(self._fd, data, start * self.row_bytes)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")
        os.fdatasync(self._fd)

    def rows(self, start: int, end: int, array: np.ndarray | None = None) -> np.ndarray:
        """Float32 rows ``start..end`` (a view of the mapping when stored as float32)."""
        block = (self._map if array is None else array)[start:end]
        return block if self.dtype == np.float32 else block.astype(np.float32)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Float32 rows for ``ids`` (any order, repeats allowed)."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.asarray(self._map[ids], dtype=np.float32).reshape(len(ids), self.dim)

    def close(self) -> None:
        self._map = np.zeros((0, self.dim), self.dtype)
        os.close(self._fd)
