"""Losses and miners: each runs one optimisation step; the table losses match plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lookalike.models.losses import LOSSES, PairClassifierLoss, build_loss, pair_labels
from lookalike.models.mining import MINERS, HardNegativeBatches, build_miner, random_batches
from lookalike.models.network import ConfigError


def _pair_batch(n_pairs: int = 8, dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(n_pairs, dim, generator=generator)
    second = first + 0.8 * torch.randn(n_pairs, dim, generator=generator)
    ids = torch.arange(n_pairs)
    return torch.cat([first, second]), pair_labels(ids, ids)


@pytest.mark.parametrize("miner_name", sorted(MINERS))
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_each_loss_and_miner_runs_one_step(loss_name: str, miner_name: str) -> None:
    if loss_name == "infonce" and miner_name != "none":
        with pytest.raises(ConfigError, match="uses every in-batch negative"):
            build_loss(loss_name, 0.2, 0.1, 8)(*_pair_batch(), (torch.tensor([0]),) * 3)
        return
    inputs, labels = _pair_batch()
    torch.manual_seed(0)
    head = torch.nn.Linear(inputs.shape[1], 8)
    # A wide margin, so the semi-hard miner finds triplets in a batch of random vectors.
    loss_fn = build_loss(loss_name, margin=1.0, temperature=0.1, embedding_dim=8)
    miner = build_miner(miner_name, margin=1.0)
    params = list(head.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = head.weight.detach().clone()

    embeddings = F.normalize(head(inputs), dim=1)
    indices = miner(embeddings, labels) if miner is not None else None
    loss = loss_fn(embeddings, labels, indices)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    assert torch.isfinite(loss)
    assert loss.item() >= 0
    assert not torch.equal(before, head.weight), f"{loss_name}/{miner_name} did not update"


def test_infonce_matches_a_plain_loop() -> None:
    """Each image against the other side's images; a second pair of the same group is masked."""
    inputs, _ = _pair_batch(n_pairs=5)
    embeddings = F.normalize(inputs, dim=1)
    ids = torch.tensor([0, 1, 2, 3, 0])  # pairs 0 and 4 look alike: not each other's negatives
    labels = pair_labels(ids, ids)
    temperature = 0.1
    got = build_loss("infonce", 0.2, temperature, 16)(embeddings, labels)
    first, second = embeddings[:5], embeddings[5:]
    terms = []
    for queries, keys in ((first, second), (second, first)):
        for i in range(5):
            others = [j for j in range(5) if ids[j] != ids[i]]
            logits = torch.stack([queries[i] @ keys[i]] + [queries[i] @ keys[j] for j in others])
            terms.append(-torch.log_softmax(logits / temperature, dim=0)[0])
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)


def test_ntxent_matches_a_plain_loop() -> None:
    """NT-Xent over 2B rows: each row's positive against every other row of the batch."""
    inputs, labels = _pair_batch(n_pairs=5)
    embeddings = F.normalize(inputs, dim=1)
    temperature = 0.1
    got = build_loss("ntxent", 0.2, temperature, embeddings.shape[1])(embeddings, labels)
    sims = embeddings @ embeddings.T / temperature
    terms = []
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j and labels[i] == labels[j]:
                negatives = [sims[i, k] for k in range(len(labels)) if labels[k] != labels[i]]
                logits = torch.stack([sims[i, j], *negatives])
                terms.append(-torch.log_softmax(logits, dim=0)[0])
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)


def test_contrastive_cosine_matches_a_plain_loop() -> None:
    inputs, labels = _pair_batch(n_pairs=4)
    embeddings = F.normalize(inputs, dim=1)
    margin = 0.3
    got = build_loss("contrastive-cosine", margin, 0.1, embeddings.shape[1])(embeddings, labels)
    sims = embeddings @ embeddings.T
    positive, negative = [], []
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i == j:
                continue
            if labels[i] == labels[j]:
                positive.append(torch.relu(1.0 - sims[i, j]))
            else:
                negative.append(torch.relu(sims[i, j] - margin))
    # pytorch-metric-learning averages each side over its non-zero terms.
    def mean_nonzero(terms: list[torch.Tensor]) -> torch.Tensor:
        values = torch.stack(terms)
        return values[values > 0].mean() if (values > 0).any() else values.sum()

    assert torch.allclose(got, mean_nonzero(positive) + mean_nonzero(negative), atol=1e-5)


def test_pair_classifier_starts_as_a_scaled_cosine() -> None:
    loss = PairClassifierLoss(embedding_dim=4, scale=10.0)
    u = F.normalize(torch.tensor([[1.0, 2.0, 0.0, 1.0]]), dim=1)
    v = F.normalize(torch.tensor([[0.5, 1.0, 1.0, 0.0]]), dim=1)
    assert torch.allclose(loss.logits(u, v), 10.0 * (u * v).sum(1) - 5.0, atol=1e-6)


def test_unknown_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'arcface'"):
        build_loss("arcface", 0.2, 0.1, 8)
    with pytest.raises(ConfigError, match="unknown miner"):
        build_miner("hardest", 0.2)


def test_hard_negative_batches_group_nearest_neighbours() -> None:
    """Pairs whose images sit close together in the embedding space share a batch."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    cluster = np.repeat(np.arange(6), 4)  # 24 pairs in 6 tight clusters of 4
    first = centres[cluster] + 0.01 * rng.normal(size=(24, 16))
    second = centres[cluster] + 0.01 * rng.normal(size=(24, 16))
    first /= np.linalg.norm(first, axis=1, keepdims=True)
    second /= np.linalg.norm(second, axis=1, keepdims=True)
    batcher = HardNegativeBatches(batch_size=4, neighbours=3, per_seed=3)
    batcher.refresh(first, second)
    assert all(cluster[row] == cluster[i] for i, row in enumerate(batcher.table) for row in row)
    batches = batcher.batches(np.random.default_rng(1))
    assert sorted(np.concatenate(batches)) == list(range(24)), "every pair exactly once"
    assert all(len(set(cluster[b])) == 1 for b in batches), "each batch is one cluster"
    mixed = random_batches(24, 4, np.random.default_rng(1))
    assert any(len(set(cluster[b])) > 1 for b in mixed)
