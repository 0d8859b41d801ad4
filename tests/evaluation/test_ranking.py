"""Cosine scoring and the one-to-one assignment, checked against numpy and brute force."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lookalike.evaluation import ranking
from lookalike.evaluation.challenge import read_challenge
from lookalike.evaluation.errors import EvaluationError
from lookalike.evaluation.images import ImageFolder
from lookalike.evaluation.ranking import (
    ASSIGN_BOOST,
    assign,
    boost_assigned,
    cosine_scores,
    ranked_order,
)
from lookalike.evaluation.scoring import score_challenge
from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder


def test_cosine_scores_match_numpy() -> None:
    rng = np.random.default_rng(0)
    query, candidates = rng.normal(size=8), rng.normal(size=(5, 8))
    expected = candidates @ query / np.linalg.norm(candidates, axis=1) / np.linalg.norm(query)
    np.testing.assert_allclose(cosine_scores(query, candidates), expected, rtol=1e-5)
    assert cosine_scores(query, query[None] * 3)[0] == pytest.approx(1.0)


def test_ranked_order_is_stable() -> None:
    assert list(ranked_order(np.array([0.1, 0.5, 0.1, 0.9]))) == [3, 1, 0, 2]


def _best_total(candidates: list[list[str]], scores: list[np.ndarray]) -> float:
    """Brute force over every injective choice of one candidate per query."""
    best = -np.inf
    for choice in itertools.product(*(range(len(row)) for row in candidates)):
        names = [row[i] for row, i in zip(candidates, choice, strict=True)]
        if len(set(names)) == len(names):
            best = max(best, sum(s[i] for s, i in zip(scores, choice, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_assignment_is_one_to_one_and_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = [f"r{i}" for i in range(6)]
    candidates = [list(rng.choice(pool, size=3, replace=False)) for _ in range(5)]
    scores = [rng.uniform(-1, 1, size=3) for _ in candidates]
    chosen = assign(candidates, scores)
    names = [row[i] for row, i in zip(candidates, chosen, strict=True) if i >= 0]
    assert len(names) == len(set(names))
    total = sum(s[i] for s, i in zip(scores, chosen, strict=True) if i >= 0)
    if all(i >= 0 for i in chosen):
        assert total == pytest.approx(_best_total(candidates, scores))


def test_assignment_beats_greedy_where_greedy_collides() -> None:
    # Both queries like 'a' best; 'a' fits q2 only slightly worse, so q1 must give it up.
    candidates = [["a", "b"], ["a", "c"]]
    scores = [np.array([0.9, 0.8]), np.array([0.85, 0.1])]
    assert assign(candidates, scores) == [1, 0]
    boosted = boost_assigned(scores, [1, 0])
    assert boosted[0][1] == pytest.approx(0.8 + ASSIGN_BOOST) and boosted[0][0] == 0.9
    assert list(ranked_order(boosted[0])) == [1, 0]


def test_a_query_whose_candidates_are_all_taken_is_unassigned() -> None:
    chosen = assign([["a"], ["a"]], [np.array([0.3]), np.array([0.7])])
    assert sorted(chosen) == [-1, 0] and chosen[1] == 0
    assert boost_assigned([np.array([0.3])], [-1])[0][0] == pytest.approx(0.3)


def test_assignment_refuses_huge_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranking, "MAX_ASSIGN_CELLS", 3)
    with pytest.raises(EvaluationError, match="too large"):
        assign([["a", "b"], ["c"]], [np.zeros(2), np.zeros(1)])


def test_score_challenge_on_real_images(
    tmp_path: Path,
    small_image_dir: Path,
    small_store_path: Path,
    small_pairs: list[tuple[str, str]],
    embedder: Embedder,
) -> None:
    rights = [right for _, right in small_pairs]
    path = tmp_path / "c.csv"
    path.write_text(
        "left,c0,c1,c2\n"
        + "".join(
            f"{left},{rights[i]},{rights[i - 1]},{rights[i - 2]}\n"
            for i, (left, _) in enumerate(small_pairs[:4])
        )
    )
    challenge = read_challenge(path)
    folders = ImageFolder(small_image_dir / "left"), ImageFolder(small_image_dir / "right")
    scores = score_challenge(challenge, *folders, embedder, progress=False)
    store = IndexStore.open(small_store_path)
    for query, row, row_scores in zip(challenge.queries, challenge.candidates, scores, strict=True):
        expected = store.vectors([f"right/{k}" for k in row]) @ store.vectors([f"left/{query}"])[0]
        np.testing.assert_allclose(row_scores, expected, atol=1e-4)
    store.close()
    assigned = score_challenge(challenge, *folders, embedder, use_assignment=True, progress=False)
    picks = [int(np.argmax(row)) for row in assigned]
    assert all(row.max() > 1.0 for row in assigned)
    picked = [row[i] for row, i in zip(challenge.candidates, picks, strict=True)]
    assert len(set(picked)) == len(picked)
