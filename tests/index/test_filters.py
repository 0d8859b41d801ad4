"""Metadata filters, min_score and exclude: the filter spec's parsing and errors, and filtered
search against brute force over the filtered set, on each index family and on both paths
(exact scan of the selected ids, and the index with an id selector)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookalike.index import store as store_module
from lookalike.index.filters import Condition, Filter, FilterError
from lookalike.index.store import IndexStore, UnknownKeyError, normalize_rows

DIM = 8
N = 240
ALBUMS = ["holiday", "work", "family", "2020"]
FAMILIES = {
    "exact": ("Flat", {}),
    "hnsw": ("HNSW8", {"efSearch": 400}),
    "ivf": ("IVF4,Flat", {"nprobe": 4}),
}


def _metadata(rng: np.random.Generator, i: int) -> dict:
    meta: dict = {"n": i}
    if rng.random() < 0.9:
        meta["album"] = ALBUMS[int(rng.integers(len(ALBUMS)))]
    if rng.random() < 0.8:
        meta["year"] = int(rng.integers(2000, 2025))
    if rng.random() < 0.5:
        meta["rating"] = float(np.round(rng.random() * 5, 2))
    if rng.random() < 0.3:
        meta["flag"] = bool(rng.random() < 0.5)
    if rng.random() < 0.1:
        meta["year"] = "2020"  # a string where others hold numbers: never a number's match
    return meta


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    factory, params = FAMILIES[request.param]
    store = IndexStore.create(
        tmp_path_factory.mktemp(request.param) / "s", dim=DIM, model_fingerprint="m",
        factory=factory, search_params=params, background=False,
    )
    rng = np.random.default_rng(1)
    vectors = normalize_rows(rng.normal(size=(N, DIM)))
    metas = [_metadata(rng, i) for i in range(N)]
    keys = [f"k{i}" for i in range(N)]
    store.add(keys[:200], vectors[:200], metadata=metas[:200])
    store.save()  # the index covers the first 200; the rest stay in the exact tail
    store.add(keys[200:], vectors[200:], metadata=metas[200:])
    store.remove(["k3", "k150", "k210"])
    model = {k: (v, m) for k, v, m in zip(keys, vectors, metas, strict=True)
             if k not in ("k3", "k150", "k210")}
    yield store, model, _added_times(store)
    store.close()


def _added_times(store: IndexStore) -> dict[str, float]:
    return dict(store._reader().execute("SELECT key, added FROM items").fetchall())


conditions = st.one_of(
    st.builds(Condition, st.just("album"), st.just("eq"), st.sampled_from(ALBUMS + ["none"])),
    st.builds(Condition, st.just("album"), st.just("in"),
              st.lists(st.sampled_from(ALBUMS), min_size=1, max_size=3).map(tuple)),
    st.builds(Condition, st.just("year"), st.sampled_from(["gt", "gte", "lt", "lte"]),
              st.integers(1999, 2025)),
    st.builds(Condition, st.just("year"), st.just("eq"), st.sampled_from([2010, "2020"])),
    st.builds(Condition, st.just("rating"), st.sampled_from(["gte", "lt"]),
              st.floats(0, 5, allow_nan=False)),
    st.builds(Condition, st.just("flag"), st.just("eq"), st.booleans()),
    st.builds(Condition, st.just("n"), st.just("lt"), st.integers(0, N)),
)
filters = st.lists(conditions, min_size=1, max_size=3).map(lambda cs: Filter(tuple(cs)))


FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # the module-scoped store is shared on purpose


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(spec=filters, k=st.integers(1, 30), query=st.integers(0, 10_000),
       exclude=st.lists(st.integers(0, N - 1), max_size=4), selector=st.booleans(),
       min_score=st.one_of(st.none(), st.floats(-1, 1, allow_nan=False)))
def test_filtered_search_equals_brute_force(
    filled, monkeypatch: pytest.MonkeyPatch, spec: Filter, k: int, query: int,
    exclude: list[int], selector: bool, min_score: float | None,
) -> None:
    store, model, added = filled
    # selector=True sends every filter through the index with an id selector
    monkeypatch.setattr(store_module, "FILTER_EXACT_MAX", 0 if selector else 10**9)
    monkeypatch.setattr(store_module, "FILTER_INDEX_MIN_FRACTION", 0.0)
    q = normalize_rows(np.random.default_rng(query).normal(size=(1, DIM)))
    excluded = {f"k{i}" for i in exclude}
    passing = [key for key, (_, meta) in model.items()
               if key not in excluded and spec.matches(meta, added[key])]
    scores = {key: float(model[key][0] @ q[0]) for key in passing}
    expected = sorted(passing, key=lambda key: -scores[key])[:k]
    if min_score is not None:
        expected = [key for key in expected if scores[key] >= min_score]
    (got,) = store.search(q, k, exclude=sorted(excluded), where=spec, min_score=min_score)
    assert [m.key for m in got] == expected
    assert [m.score for m in got] == pytest.approx([scores[key] for key in expected], abs=1e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURE_OK)
@given(k=st.integers(1, 40), min_score=st.floats(-1, 1, allow_nan=False),
       query=st.integers(0, 99))
def test_min_score_keeps_the_prefix_of_top_k_above_it(filled, k, min_score, query) -> None:
    store, _, _ = filled
    q = normalize_rows(np.random.default_rng(query).normal(size=(1, DIM)))
    (top,) = store.search(q, k)
    (kept,) = store.search(q, k, min_score=min_score)
    assert len(kept) <= k
    assert all(m.score >= min_score for m in kept)
    assert kept == [m for m in top if m.score >= min_score]


def test_filter_sql_agrees_with_python_reference(filled) -> None:
    store, model, added = filled
    spec = Filter.parse({"year": {"gte": 2010, "lt": 2020}, "album": {"in": ["work", "2020"]}})
    view = store._view
    ids = store._selected(spec, view)
    keys = set(store._keys_of(ids).values())
    assert keys == {key for key, (_, meta) in model.items() if spec.matches(meta, added[key])}
    assert keys  # the data has such items, so the test can fail


def test_filters_follow_adds_removes_and_replaced_metadata(tmp_path: Path) -> None:
    store = IndexStore.create(tmp_path / "s", dim=DIM, model_fingerprint="m", background=False)
    rng = np.random.default_rng(0)
    store.add(["a", "b", "c"], rng.normal(size=(3, DIM)),
              metadata=[{"album": "x"}, {"album": "y"}, {"album": "x"}])
    q = rng.normal(size=(1, DIM))
    x = {"album": "x"}
    assert sorted(m.key for m in store.search(q, 10, where=x)[0]) == ["a", "c"]
    store.add(["d"], rng.normal(size=(1, DIM)), metadata=[{"album": "x"}])
    store.remove(["a"])
    store.add(["c"], rng.normal(size=(1, DIM)), metadata=[{"album": "y"}], replace=True)
    assert sorted(m.key for m in store.search(q, 10, where=x)[0]) == ["d"]
    assert sorted(m.key for m in store.search(q, 10, where={"album": "y"})[0]) == ["b", "c"]
    store.close()


def test_added_time_filter_selects_recent_items(tmp_path: Path) -> None:
    store = IndexStore.create(tmp_path / "s", dim=DIM, model_fingerprint="m", background=False)
    rng = np.random.default_rng(0)
    store.add(["old"], rng.normal(size=(1, DIM)))
    time.sleep(0.05)
    between = time.time()
    time.sleep(0.05)
    store.add(["new"], rng.normal(size=(1, DIM)))
    q = rng.normal(size=(1, DIM))
    assert [m.key for m in store.search(q, 5, where={"added": {"gte": between}})[0]] == ["new"]
    assert [m.key for m in store.search(q, 5, where={"added": {"lt": between}})[0]] == ["old"]
    week = Filter.from_expressions(["added>=-7d"])
    assert sorted(m.key for m in store.search(q, 5, where=week)[0]) == ["new", "old"]
    assert store.search(q, 5, where={"added": {"gte": "2999-01-01"}})[0] == []
    store.close()


def test_matching_filters_candidate_keys_in_order(filled) -> None:
    store, model, _ = filled
    keys = ["k10", "k0", "k11", "k5"]
    want = [key for key in keys if model[key][1].get("album") == "work"]
    assert store.matching(keys, {"album": "work"}) == want
    assert store.matching(keys, None) == keys
    with pytest.raises(UnknownKeyError):
        store.matching(["k3"], {"album": "work"})  # removed


@pytest.mark.parametrize(
    ("expressions", "json_form"),
    [
        (["album=holiday"], {"album": "holiday"}),
        (["year>=2020", "year<2024"], {"year": {"gte": 2020, "lt": 2024}}),
        (["album in holiday, work"], {"album": {"in": ["holiday", "work"]}}),
        (['year="2020"'], {"year": "2020"}),
        (["flag=true", "rating<=4.5"], {"flag": True, "rating": {"lte": 4.5}}),
        (["added>=2026-11-25"], {"added": {"gte": "2026-11-25T00:00:00+00:00"}}),
    ],
)
def test_cli_expressions_and_json_give_one_filter(expressions, json_form) -> None:
    assert Filter.from_expressions(expressions) == Filter.parse(json_form)


def test_filter_json_round_trips() -> None:
    spec = Filter.parse('{"album": {"in": ["a", "b"]}, "year": {"gte": 2000, "lt": 2010}}')
    assert Filter.parse(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["album"]', "expected a JSON object"),
        ({"year": {"between": [1, 2]}}, "unknown operator 'between'"),
        ({"year": {"gte": "2020"}}, "compares numbers"),
        ({"year": {"gte": True}}, "compares numbers"),
        ({"album": {"in": []}}, "non-empty list"),
        ({"album": {"in": "holiday"}}, "non-empty list"),
        ({"album": {}}, "no operator"),
        ({"album": ["a"]}, "compare with a string"),
        ({"": 1}, "field names"),
        ({'a"b': 1}, "quote"),
        ({"added": {"gte": "last tuesday"}}, "ISO date"),
        ({"n": 2**70}, "64-bit"),
    ],
)
def test_bad_filters_are_refused_with_a_reason(spec, message) -> None:
    with pytest.raises(FilterError, match=message):
        Filter.parse(spec)


@pytest.mark.parametrize("expression", ["album", "=x", "year>=", "year=>2020", "year!=3"])
def test_bad_where_expressions_are_refused(expression) -> None:
    with pytest.raises(FilterError, match="--where"):
        Filter.from_expressions([expression])


def test_bad_min_score_is_refused(filled) -> None:
    store, _, _ = filled
    with pytest.raises(store_module.StoreInputError, match="min_score"):
        store.search(np.ones((1, DIM)), 3, min_score=1.5)
