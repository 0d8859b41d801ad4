"""Trained region late interaction (issue 14): the batched MaxSim is the re-ranker's, a fold
trains only on pairs that share no image with it, and training learns which channels carry a
pair's likeness, so held-out pairs (new identities) are matched better than before training."""

from __future__ import annotations

import numpy as np
import torch

from lookalike.evaluation.fold_learned_regions import (
    batch_maxsim,
    fold_training_pairs,
    project,
    train_projection,
)
from lookalike.evaluation.fold_rerank import Fold
from lookalike.models.rerank import maxsim


def _tokens(pairs: int, rng: np.random.Generator) -> torch.Tensor:
    """Images 2i and 2i+1 share a signal on channels 0-7 at every region; channels 8-23 are
    louder noise of their own."""
    signal = np.repeat(rng.normal(size=(pairs, 1, 1, 8)), 2, axis=1)
    signal = np.broadcast_to(signal, (pairs, 2, 4, 8)).reshape(2 * pairs, 4, 8)
    noise = 2.0 * rng.normal(size=(2 * pairs, 4, 16))
    return torch.from_numpy(np.concatenate([signal + 0.3 * rng.normal(size=signal.shape), noise],
                                           axis=2).astype(np.float32))


def _top1(regions: np.ndarray) -> float:
    scores = np.stack([maxsim(regions[q], regions[1::2]) for q in range(0, len(regions), 2)])
    return float((scores.argmax(axis=1) == np.arange(len(scores))).mean())


def test_batch_maxsim_is_the_rerankers_maxsim() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 5, 4)).astype(np.float32)
    c = rng.normal(size=(6, 7, 4)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    got = batch_maxsim(torch.from_numpy(q), torch.from_numpy(c)).numpy()
    np.testing.assert_allclose(got, np.stack([maxsim(x, c) for x in q]), atol=1e-6)


def test_a_fold_trains_only_on_pairs_outside_it() -> None:
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 3]])
    fold = Fold(1, np.array([2, 3]), np.zeros((2, 2)), np.zeros(1, int), np.zeros((1, 1), int),
                np.zeros(1, int), head=None)
    np.testing.assert_array_equal(fold_training_pairs(pairs, fold), [[0, 1], [4, 5]])


def test_training_learns_the_channels_that_match_pairs() -> None:
    rng = np.random.default_rng(1)
    train, held_out = _tokens(64, rng), _tokens(20, rng)
    pairs = np.arange(128).reshape(64, 2)
    untrained = project(torch.nn.Linear(24, 8, bias=False), held_out)
    projection = train_projection(train, pairs, dim=8, epochs=30, batch_size=16, lr=1e-2)
    trained = project(projection, held_out)
    assert trained.shape == (40, 4, 8)
    np.testing.assert_allclose(np.linalg.norm(trained, axis=-1), 1.0, atol=1e-5)
    assert _top1(trained) >= max(0.75, _top1(untrained) + 0.3), (_top1(trained), _top1(untrained))
