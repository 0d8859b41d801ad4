"""Choosing what a loss learns from: in-batch miners and FAISS hard-negative batches.

Two levels, because they answer different questions:

* a *miner* (pytorch-metric-learning's, by name from :data:`MINERS`) picks which pairs or
  triplets **inside one batch** the loss sees (batch-hard, semi-hard);
* :class:`HardNegativeBatches` decides **which pairs share a batch**. With random batches most
  in-batch negatives are easy (a cat next to a skyline); it puts pairs whose images are
  close in the current embedding space together, so every in-batch negative is a hard one.
  The neighbours come from a FAISS inner-product index over the current embeddings and are
  refreshed each epoch, as the embedding space moves.
"""

from __future__ import annotations

import faiss
import numpy as np
from pytorch_metric_learning import miners

from .errors import ConfigError
from .losses import check_margin
from .registry import Registry

__all__ = ["MINERS", "build_miner", "HardNegativeBatches", "random_batches"]

MINERS: Registry[miners.BaseMiner | None] = Registry("miner")
"""Every in-batch miner by name (``none``: no mining)."""


@MINERS.register("none", "every pair and triplet of the batch")
def no_miner() -> None:
    return None


@MINERS.register("batch-hard", "per anchor, its farthest positive and closest negative")
def batch_hard() -> miners.BaseMiner:
    return miners.BatchHardMiner()


@MINERS.register("semi-hard",
                 "triplets whose negative is farther than the positive but within MARGIN")
def semi_hard(margin: float) -> miners.BaseMiner:
    return miners.TripletMarginMiner(margin=check_margin(margin), type_of_triplets="semihard")


def build_miner(name: str, margin: float) -> miners.BaseMiner | None:
    return MINERS.create(name, margin=margin)


def random_batches(n_pairs: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled pair indices cut into batches; a last batch of one pair is dropped (no negative)."""
    order = rng.permutation(n_pairs)
    batches = [order[start : start + batch_size] for start in range(0, n_pairs, batch_size)]
    return [batch for batch in batches if len(batch) > 1]


class HardNegativeBatches:
    """Batches built from nearest-neighbour groups of pairs.

    ``refresh(first, second)`` takes the current embeddings of each pair's two images
    ``(N, D)`` (L2-normalised) and finds, for every pair, the ``neighbours`` pairs whose second
    image is closest to its first image (its own match excluded): those are the confusions the
    model makes now. ``batches`` then grows each batch from random seed pairs, each followed by
    up to ``per_seed`` of its unused neighbours.
    """

    def __init__(self, batch_size: int, neighbours: int = 8, per_seed: int = 3) -> None:
        if per_seed < 1 or neighbours < per_seed:
            raise ConfigError("hard negatives need 1 <= per_seed <= neighbours")
        self.batch_size = batch_size
        self.neighbours = neighbours
        self.per_seed = per_seed
        self.table: np.ndarray | None = None

    def refresh(self, first: np.ndarray, second: np.ndarray) -> None:
        first = np.ascontiguousarray(first, dtype=np.float32)
        second = np.ascontiguousarray(second, dtype=np.float32)
        index = faiss.IndexFlatIP(second.shape[1])
        index.add(second)
        k = min(self.neighbours + 1, len(second))
        _, found = index.search(first, k)
        own = np.arange(len(first))[:, None]
        table = np.full((len(first), self.neighbours), -1, dtype=np.int64)
        for row, hits in enumerate(found):
            hits = hits[(hits != own[row]) & (hits >= 0)][: self.neighbours]
            table[row, : len(hits)] = hits
        self.table = table

    def batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self.table is None:
            raise RuntimeError("HardNegativeBatches.refresh must run before batches")
        n_pairs = len(self.table)
        used = np.zeros(n_pairs, dtype=bool)
        batches: list[np.ndarray] = []
        current: list[int] = []
        for seed in rng.permutation(n_pairs):
            if used[seed]:
                continue
            group = [int(seed)]
            used[seed] = True
            for hit in self.table[seed]:
                if len(group) > self.per_seed or len(current) + len(group) >= self.batch_size:
                    break
                if hit >= 0 and not used[hit]:
                    used[hit] = True
                    group.append(int(hit))
            current.extend(group)
            if len(current) >= self.batch_size:
                batches.append(np.array(current[: self.batch_size]))
                current = current[self.batch_size :]
        if len(current) > 1:
            batches.append(np.array(current))
        return batches
