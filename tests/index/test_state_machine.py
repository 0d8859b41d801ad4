"""A Hypothesis state machine drives add/remove/search/save/reopen on each index family and
checks every answer against a brute-force numpy model of the same items."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lookalike.index.store import IndexStore, normalize_rows

DIM = 8
#: Each family with knobs that make its search exhaustive on these small sets, so the model
#: (exact cosine) is the right answer: the test checks ids, tombstones and merging, not recall.
FAMILIES = {
    "exact": ("Flat", {}),
    "hnsw": ("HNSW8", {"efSearch": 400}),
    "ivf": ("IVF2,Flat", {"nprobe": 2}),
}

keys_strategy = st.lists(st.integers(0, 59), min_size=1, max_size=12, unique=True)


class StoreMachine(RuleBasedStateMachine):
    factory = "Flat"
    params: dict[str, int] = {}

    @initialize()
    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.store = IndexStore.create(
            self.dir / "s", dim=DIM, model_fingerprint="m", factory=self.factory,
            search_params=self.params, background=False,
        )
        self.model: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(0)
        # enough vectors to train IVF2 (78) from the start; they stay in the model
        self._add([f"base{i}" for i in range(80)], replace=False)

    def _add(self, keys: list[str], replace: bool) -> None:
        vectors = normalize_rows(self.rng.normal(size=(len(keys), DIM)))
        self.store.add(keys, vectors, metadata=[{"k": key} for key in keys], replace=replace)
        self.model.update(zip(keys, vectors, strict=True))

    @rule(ids=keys_strategy)
    def add(self, ids: list[int]) -> None:
        keys = [f"k{i}" for i in ids]
        self._add(keys, replace=True)

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        present = sorted(self.model)
        keys = data.draw(st.lists(st.sampled_from(present), min_size=1, max_size=10, unique=True))
        assert self.store.remove(keys) == len(keys)
        for key in keys:
            del self.model[key]

    @rule()
    def maintain(self) -> None:
        self.store.maintain()

    @rule()
    def save(self) -> None:
        self.store.save()

    @rule(save_first=st.booleans())
    def reopen(self, save_first: bool) -> None:
        if save_first:
            self.store.save()
        self.store.close()
        self.store = IndexStore.open(self.dir / "s", model_fingerprint="m", background=False)

    @rule(k=st.integers(1, 15), seed=st.integers(0, 1000), stored=st.booleans())
    def search(self, k: int, seed: int, stored: bool) -> None:
        if stored and self.model:
            query = self.model[sorted(self.model)[seed % len(self.model)]]
        else:
            query = normalize_rows(np.random.default_rng(seed).normal(size=(1, DIM)))[0]
        (matches,) = self.store.search(query[None], k=k)
        keys = sorted(self.model)
        if not keys:  # everything removed: the store must answer, with nothing
            assert matches == []
            return
        scores = np.stack([self.model[key] for key in keys]) @ query
        expected = np.sort(scores)[::-1][:k]
        assert len(matches) == min(k, len(keys))
        np.testing.assert_allclose([m.score for m in matches], expected, atol=1e-5)
        for match in matches:
            assert match.key in self.model
            assert match.score == pytest.approx(float(self.model[match.key] @ query), abs=1e-5)

    @invariant()
    def same_items(self) -> None:
        assert len(self.store) == len(self.model)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_store_matches_brute_force_model(family: str) -> None:
    factory, params = FAMILIES[family]
    machine = type(f"{family}Machine", (StoreMachine,), {"factory": factory, "params": params})
    machine.TestCase.settings = settings(
        max_examples=15, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    machine.TestCase().runTest()
