"""Trained region late interaction on the CV folds (issue 14): a fold trains only on pairs that
share no image with it; the shipped entry reports out-of-fold figures and the weight (and
hubness k) best over all folds; the hubness correction is the pair score's; shipping writes
the map, the cohort (the bundle's own embeddings) and the entry into a bundle, which then
re-ranks; the pair score is corrected by the hubness of the combined score against the
region cohort, the images others score best with."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.core.scoring import unit
from lookalike.evaluation.fold_learned_regions import (
    combined_pairs,
    fold_training_pairs,
    mirrored_pairs,
    multiscale,
    project,
    query_weights,
    region_cohort,
    rerank_entry,
    ship,
    verification_entry,
)
from lookalike.evaluation.fold_rerank import Fold, corrected_pairs, pair_matrix
from lookalike.models.cohort import Cohort, CohortRegions
from lookalike.models.embedder import Embedder
from lookalike.models.model import RERANK_KEY
from lookalike.models.network import stage_channels
from lookalike.models.regions_net import REGION_STAGES, RegionMap, TrainedMap
from lookalike.models.rerank import REGIONS, cohort_scores, reranker_for
from lookalike.models.resolve import resolve_model
from lookalike.models.train import TrainConfig


def test_a_fold_trains_only_on_pairs_outside_it() -> None:
    pairs = np.array([[0, 1], [2, 3], [4, 5], [6, 3]])
    fold = Fold(1, np.array([2, 3]), np.zeros((2, 2)), np.zeros(1, int), np.zeros((1, 1), int),
                np.zeros(1, int), head=None)
    np.testing.assert_array_equal(fold_training_pairs(pairs, fold), [[0, 1], [4, 5]])


def test_mirrored_pairs_follow_the_originals_as_rows_of_the_mirrored_tokens() -> None:
    np.testing.assert_array_equal(mirrored_pairs(np.array([[0, 1], [2, 3]]), 10),
                                  [[0, 1], [2, 3], [10, 11], [12, 13]])


def test_candidates_mirrors_add_regions_a_query_region_may_match() -> None:
    """``--mirror-candidates``: each query region takes its best match among the candidate's
    regions and its mirror's, so the MaxSim is the better of the two where one region wins,
    and never lower than without the mirrors; queries keep their own regions."""
    regions = np.zeros((3, 1, 2))
    regions[:, 0] = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]  # a query and two candidates
    mirrors = np.zeros((3, 1, 2))
    mirrors[:, 0] = [[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]]
    fold = Fold(0, np.arange(3), np.eye(3), np.array([0]), np.array([[1, 2]]), np.array([0]),
                head=None)
    plain = fold.late(regions, symmetric=False)
    both = fold.late(regions, symmetric=False,
                     candidate_regions=np.concatenate([regions, mirrors], axis=1))
    np.testing.assert_allclose(plain, [[0.0, 0.6]])
    np.testing.assert_allclose(both, [[1.0, 0.6]])  # candidate 1's mirror matches the query
    union = np.concatenate([regions, mirrors], axis=1)
    np.testing.assert_allclose(pair_matrix(fold, None, regions, union), [[1.0]])
    np.testing.assert_allclose(pair_matrix(fold, None, regions), [[0.0]])


def test_query_weights_decide_which_regions_count() -> None:
    """A weighted map's held-out scores: each query region's best match, weighted by the
    query's own weights, in candidate sets and in pair matrices alike."""
    regions = np.array([[[1.0, 0.0], [0.0, 1.0]],   # the query: two regions
                        [[1.0, 0.0], [1.0, 0.0]],   # candidate 1 matches its first
                        [[0.0, 1.0], [0.0, 1.0]]])  # candidate 2 its second
    weights = np.array([[0.9, 0.1], [0.5, 0.5], [0.5, 0.5]])
    fold = Fold(0, np.arange(3), np.eye(3), np.array([0]), np.array([[1, 2]]), np.array([0]),
                head=None)
    np.testing.assert_allclose(fold.late(regions, symmetric=False), [[0.5, 0.5]])
    np.testing.assert_allclose(fold.late(regions, False, weights=weights), [[0.9, 0.1]])
    np.testing.assert_allclose(pair_matrix(fold, None, regions, weights=weights), [[0.9]])


def test_multiscale_keeps_the_grid_and_adds_its_pooled_cells() -> None:
    """``--scales 7,3,1``: the 49 tokens unchanged, then 9 means of overlapping 3 x 3 cells
    (adaptive pooling of a 7-cell side: rows 0-2, 2-4, 4-6), then the whole image's mean."""
    tokens = torch.arange(2 * 49 * 3, dtype=torch.float32).reshape(2, 49, 3)
    pooled = multiscale(tokens, (7, 3, 1))
    assert pooled.shape == (2, 59, 3)
    torch.testing.assert_close(pooled[:, :49], tokens)
    grid = tokens.reshape(2, 7, 7, 3)
    torch.testing.assert_close(pooled[:, 49], grid[:, 0:3, 0:3].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[:, 57], grid[:, 4:7, 4:7].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[:, 58], tokens.mean(dim=1))


def test_rerank_entry_reports_out_of_fold_figures_and_the_best_weight() -> None:
    """A weight that flips the wrong cosine ranking, the nested weights, and the out-of-fold
    gain over the unchanged model (here from 0 to 1 in every fold)."""
    answers = [np.zeros(4, int)] * 3
    cosines, lates = [np.tile([0.5, 0.6], (4, 1))] * 3, [np.tile([1.0, 0.0], (4, 1))] * 3
    base = [{"top1": 0.0, "top5": 1.0, "mrr": 0.5}] * 3
    entry = rerank_entry(cosines, lates, answers, base, (0.0, 0.05, 0.5))
    assert entry["weight"] == 0.5 and entry["nested_weights"] == [0.5] * 3
    assert entry["top1"] == entry["top1_gain"] == 1.0 and entry["top1_gain_se"] == 0.0
    assert entry["regions"] == REGIONS


def test_ship_writes_a_map_and_entry_the_bundle_reranks_with(
    tmp_path: Path, cache_dir: Path, demo_dir: Path
) -> None:
    copy = tmp_path / "default"
    shutil.copytree(resolve_model(None, cache_dir).path, copy)
    stages = tuple((0, s, stage_channels("efficientnet_lite0")[s]) for s in REGION_STAGES)
    channels = sum(c for _, _, c in stages)
    rng = np.random.default_rng(0)
    region_map = RegionMap(rng.normal(size=(8, channels)).astype(np.float32),
                           np.zeros(channels, np.float32), np.ones(channels, np.float32), stages,
                           importance=rng.normal(size=channels).astype(np.float32))
    entry = {"weight": 0.5, "regions": REGIONS, "top1": 0.6}
    model = resolve_model(str(copy), cache_dir)
    embedder = Embedder(model, "torch")
    images = np.stack([embedder.load_file(p)[0] for p in sorted((demo_dir / "left").glob(
        "*.jpg"))[:6]])
    with torch.no_grad():
        features = model.torch_net().features(torch.from_numpy(images)).double().numpy()
    config = TrainConfig(pairs=Path("pairs.csv"))
    trained = TrainedMap(torch.from_numpy(region_map.weight),
                         torch.from_numpy(region_map.importance))
    tokens = torch.from_numpy(rng.normal(size=(6, 49, channels)).astype(np.float32))
    written = ship(copy, trained, region_map, tokens, features, config, Path("recipe.toml"),
                   entry)
    assert [p.name for p in written] == ["regions.safetensors", "cohort.safetensors",
                                         "calibration.json"]
    embedder = Embedder(resolve_model(str(copy), cache_dir), "torch")
    assert embedder.bundle.calibration[RERANK_KEY] == entry
    cohort = Cohort.load(copy, model.fingerprint, embedder.dim)
    assert cohort.facts == {"images": 6, "pairs_file": "pairs.csv", "recipe": "recipe.toml",
                            "region_images": 6}
    # the cohort's regions are the map's regions of the tokens, as the pair score needs them
    expected = project(trained.weight, tokens)
    assert cohort.regions is not None and list(cohort.regions.rows) == list(range(6))
    np.testing.assert_allclose(cohort.regions.regions, expected, atol=0.1)
    np.testing.assert_allclose(cohort.regions.weights, query_weights(trained, tokens), atol=1e-3)
    np.testing.assert_allclose(cohort.vectors, embedder.embed_arrays(images), atol=1e-2)
    reranker = reranker_for(embedder)
    assert reranker.layout.weighted  # the map's importance travels with it
    described = reranker.describe(images[:1])
    assert reranker.scores(described[0], described) == pytest.approx([1.5], abs=1e-5)


def test_verification_entry_fits_the_threshold_on_the_pooled_out_of_fold_scores() -> None:
    """Per fold, matching pairs on the diagonal: the cosine alone ranks one non-matching pair
    above them, the region term fixes that; the threshold lets through at most 1% of the
    pooled non-matching scores at the chosen weight."""
    rng = np.random.default_rng(4)
    cosines, lates = [], []
    for _ in range(3):
        cosine = rng.uniform(0.0, 0.5, size=(12, 12))
        cosine[np.diag_indices(12)] = 0.6
        cosine[0, 1] = 0.9
        late = np.zeros((12, 12))
        late[np.diag_indices(12)] = 1.0
        cosines.append(cosine)
        lates.append(late)
    scores = {(0, lam): [c + lam * li for c, li in zip(cosines, lates, strict=True)]
              for lam in (0.0, 1.0)}
    entry = verification_entry(scores, cosines)
    assert entry["weight"] == 1.0 and entry["nested_weights"] == [1.0] * 3
    assert entry["hubness_k"] == 0 and entry["nested_hubness_k"] == [0] * 3
    assert entry["auc"] == 1.0 and entry["auc_gain"] > 0
    assert entry["positives"] == 36 and entry["negatives"] == 3 * 132
    assert entry["far"] <= 0.01 and entry["tpr"] == 1.0
    negatives = np.sort(np.concatenate([c[~np.eye(12, dtype=bool)] for c in cosines]))[::-1]
    assert negatives[3] < entry["threshold"] <= negatives[2] <= 1.6  # 3 of 396 let through


def test_corrected_pairs_subtract_half_of_each_sides_hubness() -> None:
    """As the served pair score: cosine - (hub(query) + hub(match)) / 2, each hub the mean
    cosine to the k nearest cohort vectors; k=0 leaves the cosines alone."""
    rng = np.random.default_rng(1)
    vectors, cohort = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(30, 8)))
    queries, candidates = np.array([0, 1, 2]), np.array([[3, 4], [5, 3], [4, 5]])
    fold = Fold(1, np.arange(6), vectors, queries, candidates, np.array([0, 1, 1]), head=None)
    truth = np.array([3, 3, 5])
    cosines = vectors[queries] @ vectors[truth].T
    hub = [np.sort(cohort @ v)[-4:].mean() for v in vectors]
    expected = [[cosines[i, j] - 0.5 * (hub[q] + hub[t]) for j, t in enumerate(truth)]
                for i, q in enumerate(queries)]
    np.testing.assert_allclose(corrected_pairs(fold, cosines, cohort, 4), expected, atol=1e-6)
    assert corrected_pairs(fold, cosines, cohort, 0) is cosines


def test_the_region_cohort_keeps_the_images_others_score_best_with() -> None:
    """Three of 200 images are hubs (every region close to one shared direction, so every
    image scores high with them): a region cohort of three keeps exactly them."""
    rng = np.random.default_rng(2)
    regions = unit(rng.normal(size=(200, 4, 16)))
    shared = unit(rng.normal(size=16))
    hubs = [5, 17, 30]
    regions[hubs] = unit(shared + 0.05 * rng.normal(size=(3, 4, 16)))
    regions[:, 0] = unit(regions[:, 0] + shared)  # every image has one region near the hubs
    vectors = unit(rng.normal(size=(200, 8)))
    found = region_cohort(vectors, regions, np.full((200, 4), 0.25), count=3)
    assert list(found.rows) == hubs
    np.testing.assert_array_equal(found.regions, regions[hubs])


def test_combined_pairs_correct_by_the_hubness_of_the_combined_score() -> None:
    """As the served pair score: cosine + w x MaxSim both ways - (hub(query) + hub(match)) / 2,
    each hub the mean of an image's k best (cosine + w x MaxSim both ways) to the cohort's
    region images; k=0 leaves the combined score alone."""
    rng = np.random.default_rng(3)
    vectors, regions = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(6, 3, 4)))
    weights = rng.dirichlet(np.ones(3), size=6)
    cohort_vectors, cohort_regions = unit(rng.normal(size=(9, 8))), unit(rng.normal(size=(9, 3, 4)))
    cohort_weights = rng.dirichlet(np.ones(3), size=9)
    cohort = Cohort(cohort_vectors, regions=CohortRegions(np.arange(9), cohort_regions,
                                                          cohort_weights))
    queries, candidates = np.array([0, 1, 2]), np.array([[3, 4], [5, 3], [4, 5]])
    fold = Fold(1, np.arange(6), vectors, queries, candidates, np.array([0, 1, 1]), head=None)
    truth = np.array([3, 3, 5])

    def late(i: int, r: np.ndarray, w_r: np.ndarray) -> float:
        forward = sum(weights[i][a] * max(regions[i][a] @ c for c in r) for a in range(3))
        back = sum(w_r[b] * max(r[b] @ q for q in regions[i]) for b in range(3))
        return 0.5 * (forward + back)

    hub = [np.sort([vectors[i] @ cohort_vectors[j] + 2.0 * late(i, cohort_regions[j],
                                                                 cohort_weights[j])
                    for j in range(9)])[-4:].mean() for i in range(6)]
    pair_cosines = vectors[queries] @ vectors[truth].T
    pair_lates = pair_matrix(fold, None, regions, weights=weights, symmetric=True)
    for i, q in enumerate(queries):
        for j, t in enumerate(truth):
            assert pair_lates[i, j] == pytest.approx(late(q, regions[t], weights[t]))
    held_out = cohort_scores(vectors, regions, weights, cohort)
    expected = [[pair_cosines[i, j] + 2.0 * pair_lates[i, j] - 0.5 * (hub[q] + hub[t])
                 for j, t in enumerate(truth)] for i, q in enumerate(queries)]
    np.testing.assert_allclose(combined_pairs(pair_cosines, pair_lates, fold, held_out, 2.0, 4),
                               expected, atol=1e-6)
    np.testing.assert_allclose(combined_pairs(pair_cosines, pair_lates, fold, held_out, 2.0, 0),
                               pair_cosines + 2.0 * pair_lates)
