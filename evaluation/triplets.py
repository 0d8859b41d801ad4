"""The "two of three" test: given three images, find the two that belong together.

Each triplet is one labelled pair plus a foil: an image (left or right, chosen at random) from
another pair. The model answers with the most similar of the three pairings; chance is 1/3.
Unlike a 20-candidate set, no image is privileged as the query, so this checks that the
embedding's similarity is symmetric in practice, not just ranked from one side.
"""

from __future__ import annotations

import numpy as np

from .errors import EvaluationError

__all__ = ["make_triplets", "two_of_three"]


def make_triplets(n_pairs: int, seed: int = 0) -> np.ndarray:
    """``(N, 2)`` ints: for pair ``i``, the foil's pair (never ``i``) and side (0 left, 1 right)."""
    if n_pairs < 2:
        raise EvaluationError(f"the two-of-three test needs at least 2 pairs, got {n_pairs}")
    rng = np.random.default_rng(seed)
    others = rng.integers(0, n_pairs - 1, size=n_pairs)
    others += others >= np.arange(n_pairs)  # skip the pair itself
    return np.stack([others, rng.integers(0, 2, size=n_pairs)], axis=1)


def two_of_three(left: np.ndarray, right: np.ndarray, triplets: np.ndarray) -> dict[str, float]:
    """Accuracy of picking the true pair: it must score above both pairings with the foil.

    ``left``/``right`` are ``(N, D)`` unit vectors of the pairs; ``triplets`` from
    :func:`make_triplets`. Ties count as wrong.
    """
    foils = np.where(triplets[:, 1:2] == 0, left[triplets[:, 0]], right[triplets[:, 0]])
    true_pair = np.einsum("nd,nd->n", left, right)
    with_left = np.einsum("nd,nd->n", left, foils)
    with_right = np.einsum("nd,nd->n", right, foils)
    correct = true_pair > np.maximum(with_left, with_right)
    return {"accuracy": float(correct.mean()), "chance": 1 / 3, "n": int(len(correct))}
