"""The two-of-three test on vectors whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.evaluation.errors import EvaluationError
from lookalike.evaluation.triplets import make_triplets, two_of_three


def test_foils_come_from_other_pairs_and_are_seeded() -> None:
    triplets = make_triplets(50, seed=1)
    assert triplets.shape == (50, 2)
    assert (triplets[:, 0] != np.arange(50)).all()
    assert set(triplets[:, 1]) == {0, 1}
    assert (make_triplets(50, seed=1) == triplets).all()
    with pytest.raises(EvaluationError):
        make_triplets(1)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_identical_pairs_are_always_found_and_swapped_ones_never() -> None:
    rng = np.random.default_rng(0)
    left = _unit(rng.normal(size=(40, 16)))
    triplets = make_triplets(40, seed=0)
    assert two_of_three(left, left.copy(), triplets)["accuracy"] == 1.0
    # Each right image is a copy of its foil (the left image of another pair): the foil
    # pairs with it perfectly, so the true pair is never the best of the three.
    foil_is_left = np.stack([triplets[:, 0], np.zeros(40, int)], axis=1)
    result = two_of_three(left, left[triplets[:, 0]], foil_is_left)
    assert result["accuracy"] == 0.0
    assert result["n"] == 40 and result["chance"] == pytest.approx(1 / 3)
