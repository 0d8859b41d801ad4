"""Precision, recall and MAP@K: hand-worked cases, and a real index searched for its own items."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookalike.evaluation.errors import EvaluationError
from lookalike.evaluation.retrieval import index_retrieval_metrics, retrieval_metrics
from lookalike.index.store import IndexStore


def test_hand_worked_example() -> None:
    retrieved = [["a", "x", "b"], ["y", "z", "c"]]
    relevant = [{"a", "b"}, {"c"}]
    m = retrieval_metrics(retrieved, relevant, ks=(1, 3))
    assert m["precision@1"] == pytest.approx((1 + 0) / 2)
    assert m["recall@1"] == pytest.approx((0.5 + 0) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["recall@3"] == pytest.approx((1 + 1) / 2)
    # AP@3: query 1 hits at ranks 1 and 3 -> (1 + 2/3) / 2; query 2 hits at rank 3 -> (1/3) / 1.
    assert m["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert m["map@1"] == pytest.approx(0.5) and m["n"] == 2


def test_short_result_lists_and_bad_input() -> None:
    assert retrieval_metrics([["a"]], [{"a"}], ks=(5,))["precision@5"] == pytest.approx(0.2)
    with pytest.raises(EvaluationError, match="one relevant set per query"):
        retrieval_metrics([["a"]], [{"a"}, {"b"}])
    with pytest.raises(EvaluationError, match="at least one relevant"):
        retrieval_metrics([["a"]], [set()])


def test_an_index_finds_its_own_items(small_store_path: Path) -> None:
    store = IndexStore.open(small_store_path)
    keys = store.keys()[:5]
    metrics = index_retrieval_metrics(store, store.vectors(keys), [{k} for k in keys], ks=(1, 5))
    store.close()
    assert metrics["precision@1"] == 1.0 and metrics["map@5"] == 1.0
    assert metrics["recall@5"] == 1.0 and metrics["index_size"] == 24
