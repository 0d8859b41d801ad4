"""The fold re-ranking measurements (issue 14): the exact per-cell split of a linear head, the
per-location terms averaging back to it, and the nested choice of lam never looking at the fold
it scores."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.evaluation.fold_rerank import (
    LOCATIONS,
    Head,
    _cell_masks,
    head_3x3,
    head_7x7,
    layout,
    nested,
    rerank_entry,
)
from lookalike.models.train import TrainConfig

CONFIG = TrainConfig(pairs="unused.csv", taps=[6, 7], grid_taps=[4, 5, 6], grid=3, head=[8])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _head(width: int, rng: np.random.Generator) -> Head:
    return Head(rng.normal(size=width), rng.uniform(0.5, 2, size=width),
                rng.normal(size=(8, width)), rng.normal(size=8))


def test_head_cells_and_locations_split_the_embedding() -> None:
    """The 9 cell terms plus the whole-map terms and the bias rebuild the head's output
    exactly; each cell's term is the mean of its locations' grid terms."""
    rng = np.random.default_rng(1)
    blocks = layout(CONFIG)
    width = blocks[-1].start + blocks[-1].width
    head = _head(width, rng)
    # Features made from 7 x 7 maps, pooled the way the network pools them.
    masks = _cell_masks(CONFIG.grid, LOCATIONS)
    maps, features = {}, np.zeros((2, width))
    for block in blocks:  # one map per stage (stage 6 is both a tap and a grid)
        x = maps.setdefault(f"b0.s{block.stage}",
                            rng.normal(size=(2, block.width, LOCATIONS, LOCATIONS)))
        flat = x.reshape(2, block.width, -1)
        if block.kind == "grid":
            cells = flat @ (masks / masks.sum(1, keepdims=True)).T  # (N, C, cells)
            features[:, block.start:block.start + block.width * 9] = cells.reshape(2, -1)
        else:
            features[:, block.start:block.start + block.width] = flat.mean(2)
    z = (features - head.mean) / head.std
    full = z @ head.weight.T + head.bias
    rest = sum(z[:, b.start:b.start + b.width] @ head.weight[:, b.start:b.start + b.width].T
               for b in blocks if b.kind != "grid")
    cells = head_3x3(features, head, CONFIG)
    np.testing.assert_allclose(cells.sum(1) + rest + head.bias, full, atol=1e-9)
    # Locations: grid terms plus the taps' shares; 'last' is not among the region stages.
    maps.pop(f"b0.s{blocks[-1].stage}")
    locations = head_7x7(maps, head, CONFIG)
    tap_part = sum(z[:, b.start:b.start + b.width] @ head.weight[:, b.start:b.start + b.width].T
                   for b in blocks if b.kind == "tap")
    assert locations.shape == (2, 49, 8)
    np.testing.assert_allclose(locations.sum(1), cells.sum(1) + tap_part, rtol=1e-4, atol=1e-3)


def test_nested_lam_is_chosen_on_the_other_folds() -> None:
    """A fold whose own best lam differs from the others' gets the others' choice."""
    answers = [np.zeros(4, int)] * 3
    loses, wins = np.tile([0.5, 0.6], (4, 1)), np.tile([0.6, 0.5], (4, 1))  # the answer is 0
    helps, hurts = np.tile([1.0, 0.0], (4, 1)), np.tile([0.0, 1.0], (4, 1))
    chosen, found = nested([loses, loses, wins], [helps, helps, hurts], answers,
                           lambdas=(0.0, 1.0))
    # Fold 3 is best at lam 0 on its own, but the other two folds want 1: it gets 1.
    assert chosen[2] == 1.0 and found[2]["top1"] == 0.0
    # Folds 1 and 2 see one fold for each lam: a tie, which goes to the smaller.
    assert chosen[0] == chosen[1] == 0.0
    assert found[0]["top1"] == pytest.approx(0.0)


def test_rerank_entry_reports_out_of_fold_figures_and_the_best_weight() -> None:
    """The shipped entry: a weight that flips the wrong cosine ranking, the nested weights, and
    the out-of-fold gain over the unchanged model (here from 0 to 1 in every fold)."""
    answers = [np.zeros(4, int)] * 3
    cosines, lates = [np.tile([0.5, 0.6], (4, 1))] * 3, [np.tile([1.0, 0.0], (4, 1))] * 3
    base = [{"top1": 0.0, "top5": 1.0, "mrr": 0.5}] * 3
    entry = rerank_entry(cosines, lates, answers, base)
    assert entry["weight"] >= 0.1 and all(w >= 0.1 for w in entry["nested_weights"])
    assert entry["top1"] == entry["top1_gain"] == 1.0 and entry["top1_gain_se"] == 0.0
    assert entry["flip_tta"] and entry["regions"] == "explain-7x7"
