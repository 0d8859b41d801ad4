"""Faithfulness of explanations: the deletion test.

If an explanation ranks regions by what they add to a score, greying out its top regions must
lower the score more than greying out the same area chosen at random. Each pair is scored by
the explainer's own embedder, before and after masking (``mask_regions``: the input's mean
colour), on both images at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..models.explain import Explainer, mask_regions

__all__ = ["Deletion", "deletion_test"]


@dataclass(frozen=True)
class Deletion:
    """Per pair: the score drop with the top regions masked, and the mean drop over random
    masks of the same area."""

    top: np.ndarray
    random: np.ndarray

    @property
    def wins(self) -> float:
        """Share of pairs where the top regions matter more than random ones."""
        return float((self.top > self.random).mean())

    def summary(self) -> dict[str, float]:
        """Means and standard errors of both drops and of their difference."""
        difference = self.top - self.random
        n = len(difference)
        return {
            "pairs": n,
            "top_drop": float(self.top.mean()),
            "top_se": float(self.top.std(ddof=1) / np.sqrt(n)),
            "random_drop": float(self.random.mean()),
            "random_se": float(self.random.std(ddof=1) / np.sqrt(n)),
            "difference": float(difference.mean()),
            "difference_se": float(difference.std(ddof=1) / np.sqrt(n)),
            "wins": self.wins,
        }


def deletion_test(
    explainer: Explainer,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    top: int = 5,
    draws: int = 3,
    seed: int = 0,
) -> Deletion:
    """Mask the ``top`` strongest regions of each side of each (preprocessed) pair, and
    ``draws`` times ``top`` random regions of each side."""
    rng = np.random.default_rng(seed)
    run = explainer.embedder.embed_arrays
    top_drops, random_drops = [], []
    for a, b in pairs:
        explanation = explainer.explain(a, b)
        grid, cells = explanation.grid, explanation.grid**2
        strongest = [np.argsort(side, axis=None)[::-1][:top]
                     for side in (explanation.query_map, explanation.match_map)]
        masks = [strongest] + [[rng.choice(cells, top, replace=False) for _ in range(2)]
                               for _ in range(draws)]
        images = [mask_regions(image, regions, grid)
                  for qa, mb in masks for image, regions in ((a, qa), (b, mb))]
        vectors = run(np.stack([a, b, *images]))
        scores = (vectors[0::2] * vectors[1::2]).sum(1)
        top_drops.append(scores[0] - scores[1])
        random_drops.append(float(np.mean(scores[0] - scores[2:])))
    return Deletion(np.array(top_drops), np.array(random_drops))
