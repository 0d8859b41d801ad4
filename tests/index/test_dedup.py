"""Near-duplicate groups on real images with planted copies, and the grouping itself."""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.core.errors import InvalidInputError
from lookalike.evaluation.dedup import (
    COSINE_WEIGHTS,
    collect_scores,
    cross_validate,
    grouped_pairs,
    pair_metrics,
)
from lookalike.evaluation.dedup_set import make_dedup_set, read_dedup_set
from lookalike.index.dedup import (
    DedupParams,
    DuplicateGroup,
    find_duplicate_groups,
    group_pairs,
    keypoint_signature,
    keypoint_similarity,
    write_groups,
)
from lookalike.index.store import IndexStore


@pytest.fixture
def planted_store(planted_store_path: Path):  # noqa: ANN201
    store = IndexStore.open(planted_store_path, background=False)
    yield store
    store.close()


def claimed_pairs(groups: list[DuplicateGroup]) -> set[tuple[str, str]]:
    return {(a, b) for g in groups for i, a in enumerate(sorted(g.keys))
            for b in sorted(g.keys)[i + 1:]}


def test_planted_duplicates_found_and_lookalikes_left_apart(planted_store, planted_set) -> None:
    groups = find_duplicate_groups(planted_store, DedupParams())
    found = pair_metrics(claimed_pairs(groups), set(planted_set.duplicates))
    assert found["recall"] >= 0.9, found
    assert found["precision"] >= 0.9, found
    for group in groups:  # no TLL partner, no unrelated image joins a family of copies
        assert not any(key.startswith(("partner/", "other/")) for key in group.keys), group


def test_cosine_alone_confuses_lookalikes_the_keypoint_check_does_not(
    planted_store, planted_set
) -> None:
    """The reason for the second stage: at a cosine low enough to find the edited copies,
    the embedding also joins TLL partners; the keypoint check at the same candidates does not."""
    scores = collect_scores(planted_store, floor=0.3)
    truth = set(planted_set.duplicates)
    loose_cosine = pair_metrics(grouped_pairs(scores, "cosine", 0.5), truth)
    keypoints = pair_metrics(grouped_pairs(scores, "keypoints", 0.3), truth)
    assert keypoints["precision"] > loose_cosine["precision"]
    assert keypoints["recall"] >= 0.9


def test_cross_validation_reports_folds_and_a_threshold(planted_store, planted_set) -> None:
    report = cross_validate(collect_scores(planted_store, 0.3), planted_set, folds=3)
    found = report["methods"]["keypoints"]
    assert len(found["folds"]) == 3
    assert 0.0 < found["threshold_all"] < 1.0
    assert found["recall"]["se"] >= 0.0 and found["precision"]["mean"] >= 0.8
    assert found["cosine_weight_all"] in COSINE_WEIGHTS
    assert all(fold["cosine_weight"] in COSINE_WEIGHTS for fold in found["folds"])
    assert report["methods"]["cosine"]["cosine_weight_all"] == 0.0


def test_pair_scores_blend_keypoints_and_cosine_at_the_weight(planted_store) -> None:
    """What the threshold applies to: (keypoint share + w * cosine) / (1 + w), recomputed
    here from the thumbnails for every accepted pair."""
    params = DedupParams(threshold=0.3, cosine_weight=1.0)
    groups = find_duplicate_groups(planted_store, params)
    pairs = [pair for group in groups for pair in group.pairs]
    assert pairs
    for a, b, score, cosine in pairs:
        share = keypoint_similarity(keypoint_signature(planted_store.thumbnail(a)),
                                    keypoint_signature(planted_store.thumbnail(b)))
        assert score == pytest.approx((share + cosine) / 2, abs=1e-6)
        assert score >= params.threshold
    with pytest.raises(InvalidInputError, match="cosine_weight"):
        DedupParams(cosine_weight=-1.0)


def test_groups_are_deterministic_and_ordered_by_earliest_member(planted_store) -> None:
    first = find_duplicate_groups(planted_store)
    again = find_duplicate_groups(planted_store)
    assert [g.keys for g in first] == [g.keys for g in again]
    order = {key: n for n, key in enumerate(planted_store.keys())}
    anchors = [order[g.keys[0]] for g in first]
    assert anchors == sorted(anchors)
    for group in first:
        assert [order[k] for k in group.keys] == sorted(order[k] for k in group.keys)


def test_group_pairs_equals_connected_components_by_search() -> None:
    rng = random.Random(3)
    for _ in range(30):
        n = rng.randint(2, 40)
        keys = [f"k{i:02d}" for i in range(n)]
        edges = {tuple(sorted(rng.sample(range(n), 2))) for _ in range(rng.randint(0, n))}
        accepted = [(i, j, 0.9, 0.8) for i, j in sorted(edges)]
        groups = group_pairs(keys, accepted)
        # reference: depth-first search over the same edges
        neighbours: dict[int, set[int]] = {}
        for i, j in edges:
            neighbours.setdefault(i, set()).add(j)
            neighbours.setdefault(j, set()).add(i)
        seen, expected = set(), []
        for start in sorted(neighbours):
            if start in seen:
                continue
            stack, component = [start], set()
            while stack:
                node = stack.pop()
                if node not in component:
                    component.add(node)
                    stack.extend(neighbours[node] - component)
            seen |= component
            expected.append([keys[i] for i in sorted(component)])
        assert [g.keys for g in groups] == expected
        assert sum(len(g.pairs) for g in groups) == len(edges)


def test_items_without_thumbnails_are_judged_by_cosine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 32)).astype(np.float32)
    near = base[:2] + 0.05 * rng.normal(size=(2, 32)).astype(np.float32)
    store = IndexStore.create(tmp_path / "s", dim=32, model_fingerprint="x", background=False)
    try:
        # base0 has a thumbnail and near0 has none, near1 an empty one: still judged by cosine
        picture = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, format="JPEG")
        store.add([f"base{i}" for i in range(6)] + ["near0", "near1"], np.vstack([base, near]),
                  thumbnails=[picture.getvalue()] + [None] * 6 + [b""])
        assert store.with_thumbnails(["base0", "base1", "near0", "near1"]) == {"base0"}
        groups = find_duplicate_groups(store, DedupParams(cosine_only_threshold=0.95))
        assert [g.keys for g in groups] == [["base0", "near0"], ["base1", "near1"]]
        assert find_duplicate_groups(store, DedupParams(cosine_only_threshold=0.9999)) == []
    finally:
        store.close()


def test_params_are_checked_and_read_from_calibration() -> None:
    with pytest.raises(InvalidInputError, match="threshold"):
        DedupParams(threshold=1.5)
    with pytest.raises(InvalidInputError, match="k must"):
        DedupParams(k=0)
    stored = {"threshold": 0.4, "dedup": {"threshold": 0.42, "candidate_cosine": 0.25,
                                          "cosine_only_threshold": 0.8, "k": 12}}
    params = DedupParams.from_calibration(stored, threshold=None, k=5)
    assert (params.threshold, params.candidate_cosine, params.k) == (0.42, 0.25, 5)
    assert DedupParams.from_calibration(None) == DedupParams()


def test_write_groups_json_and_csv(tmp_path: Path) -> None:
    groups = [DuplicateGroup(["a", "b", "c"], [("a", "b", 0.9, 0.95), ("b", "c", 0.5, 0.7)])]
    document = json.loads(write_groups(groups, DedupParams(), tmp_path / "g.json").read_text())
    assert document["groups"][0]["keys"] == ["a", "b", "c"]
    assert document["groups"][0]["score"] == 0.5
    with open(write_groups(groups, DedupParams(), tmp_path / "g.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["group"], r["key"], r["size"]) for r in rows] == [
        ("1", "a", "3"), ("1", "b", "3"), ("1", "c", "3")]
    with pytest.raises(InvalidInputError, match=r"\.json or \.csv"):
        write_groups(groups, DedupParams(), tmp_path / "g.txt")


def test_planted_set_is_seeded(tmp_path: Path, demo_dir: Path, planted_set) -> None:
    again = make_dedup_set(demo_dir / "pairs.csv", tmp_path / "again", 8, others=4, seed=0)
    assert again.duplicates == planted_set.duplicates
    assert len(again.duplicates) == 8 * 3  # each original and its 2 copies: 3 pairs
    assert read_dedup_set(again.folder).groups == planted_set.groups
    other = make_dedup_set(demo_dir / "pairs.csv", tmp_path / "other", 8, others=4, seed=1)
    assert other.duplicates != planted_set.duplicates
