"""The live-id bitmap against a Python set."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lookalike.index.liveness import AliveBitmap


@given(
    capacity=st.integers(1, 300),
    before=st.sets(st.integers(0, 299)),
    bounds=st.tuples(st.integers(0, 300), st.integers(0, 300)),
)
def test_set_range_marks_exactly_the_range_and_counts_once(
    capacity: int, before: set[int], bounds: tuple[int, int]
) -> None:
    start, stop = sorted(bounds)
    live = {i for i in before if i < capacity}
    stop = min(stop, capacity)
    bitmap = AliveBitmap(capacity)
    bitmap.set(np.array(sorted(live), np.int64))
    bitmap.set_range(start, stop)
    expected = live | set(range(start, stop))
    assert bitmap.count == len(expected)
    assert set(np.flatnonzero(bitmap.range(0, capacity)).tolist()) == expected
