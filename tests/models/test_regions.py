"""Learned regions (issue 14): the batched MaxSim is the re-ranker's, weighted or not; training
learns which channels carry a pair's likeness, so held-out pairs (new identities) match better
than before training, and (weighted) which of the query's regions carry it; the describe
network is the model's own embedding followed by the map of its stage maps pooled to 7 x 7
(checked against adaptive pooling and NumPy), then the query-region weights; a region map
round-trips and refuses damage and other weights; the ONNX export describes as PyTorch does,
torch-free from a serving model too, which carries the cohort."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lookalike.models.cohort import Cohort
from lookalike.models.embedder import Embedder
from lookalike.models.errors import BundleError
from lookalike.models.export import export_serving_model
from lookalike.models.model import REGIONS_FILE, RERANK_KEY, update_calibration
from lookalike.models.network import stage_channels
from lookalike.models.regions_net import (
    LOCATIONS,
    REGION_STAGES,
    DescribeNet,
    RegionMap,
    batch_maxsim,
    location_tokens,
    region_weights,
    standardisation,
    train_region_map,
)
from lookalike.models.rerank import REGIONS, Layout, maxsim, reranker_for, unit
from lookalike.models.resolve import resolve_model
from lookalike.models.serving import RERANK_ONNX


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


def _project(weight: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    return unit((tokens @ weight.T).numpy())


def test_batch_maxsim_is_the_rerankers_maxsim() -> None:
    rng = np.random.default_rng(0)
    q = unit(rng.normal(size=(3, 5, 4))).astype(np.float32)
    c = unit(rng.normal(size=(6, 7, 4))).astype(np.float32)
    got = batch_maxsim(torch.from_numpy(q), torch.from_numpy(c)).numpy()
    np.testing.assert_allclose(got, np.stack([maxsim(x, c) for x in q]), atol=1e-6)
    weights = rng.dirichlet(np.ones(5), size=3).astype(np.float32)
    got = batch_maxsim(torch.from_numpy(q), torch.from_numpy(c), torch.from_numpy(weights))
    by_query = [maxsim(x, c, weights=w) for x, w in zip(q, weights, strict=True)]
    np.testing.assert_allclose(got.numpy(), np.stack(by_query), atol=1e-6)
    best = np.einsum("rd,ksd->krs", q[0], c).max(axis=2)  # (K, R): each region's best match
    np.testing.assert_allclose(maxsim(q[0], c, weights=weights[0]), best @ weights[0],
                               atol=1e-6)


def test_training_learns_the_channels_that_match_pairs() -> None:
    rng = np.random.default_rng(1)
    train, held_out = _tokens(64, rng), _tokens(20, rng)
    pairs = np.arange(128).reshape(64, 2)
    untrained = _project(torch.randn(8, 24, generator=torch.Generator().manual_seed(0)),
                         held_out)
    # This toy task's settings; the shipped ones (MAP_DIM, MAP_TEMPERATURE) fit the trunks'.
    weight = train_region_map(train, pairs, dim=8, epochs=30, temperature=0.05, batch_size=16,
                              lr=1e-2, weighted=False).weight
    trained = _project(weight, held_out)
    assert weight.shape == (8, 24) and trained.shape == (40, 4, 8)
    assert _top1(trained) >= max(0.75, _top1(untrained) + 0.3), (_top1(trained), _top1(untrained))


def _marked_tokens(pairs: int, rng: np.random.Generator) -> torch.Tensor:
    """Four regions per image; only region 0 carries the pair's shared signal (channels 0-7)
    and a marker (channel 8) that tells it apart; regions 1-3 are noise of their own."""
    tokens = np.concatenate([rng.normal(size=(2 * pairs, 4, 9)),
                             2.0 * rng.normal(size=(2 * pairs, 4, 15))], axis=2)
    signal = np.repeat(rng.normal(size=(pairs, 8)), 2, axis=0)
    tokens[:, 0, :8] = 2.0 * signal + 0.3 * rng.normal(size=signal.shape)
    tokens[:, :, 8] = 0.0
    tokens[:, 0, 8] = 3.0
    return torch.from_numpy(tokens.astype(np.float32))


def test_weighted_training_learns_which_query_regions_carry_the_likeness() -> None:
    """The importance starts at the plain mean and learns to weigh the marked region; the
    weighted MaxSim then ranks held-out pairs far better than the plain map's, whose mean
    over the four regions drowns the one that matches in noise."""
    rng = np.random.default_rng(2)
    train, held_out = _marked_tokens(96, rng), _marked_tokens(30, rng)
    pairs = np.arange(192).reshape(96, 2)
    plain = train_region_map(train, pairs, dim=8, epochs=30, temperature=0.05, batch_size=16,
                             lr=1e-2, weighted=False)
    weighted = train_region_map(train, pairs, dim=8, epochs=30, temperature=0.05, batch_size=16,
                                lr=1e-2, importance_lr=1e-1)
    assert plain.importance is None and weighted.importance is not None
    weights = region_weights(held_out, weighted.importance).numpy()
    assert weights.shape == (60, 4) and weights[:, 0].mean() > 0.6, weights.mean(axis=0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)

    def top1(regions: np.ndarray, w: np.ndarray | None) -> float:
        scores = np.stack([maxsim(regions[q], regions[1::2], weights=None if w is None
                                  else w[q]) for q in range(0, len(regions), 2)])
        return float((scores.argmax(axis=1) == np.arange(len(scores))).mean())

    with_weights = top1(_project(weighted.weight, held_out), weights)
    without = top1(_project(plain.weight, held_out), None)
    assert with_weights >= max(0.8, without + 0.3), (with_weights, without)


@pytest.fixture(scope="module")
def default_copy(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The default bundle with a weighted region map of random weights: what is tested here
    is the plumbing, not the map's quality."""
    source = resolve_model(None, cache_dir)
    copy = tmp_path_factory.mktemp("regions") / "default"
    shutil.copytree(source.path, copy)
    stages = tuple((0, s, stage_channels("efficientnet_lite0")[s]) for s in REGION_STAGES)
    channels = sum(c for _, _, c in stages)
    rng = np.random.default_rng(0)
    mean, scale = rng.normal(size=channels), rng.uniform(0.5, 2.0, size=channels)
    region_map = RegionMap(rng.normal(size=(16, channels)).astype(np.float32),
                           mean.astype(np.float32), scale.astype(np.float32), stages,
                           facts={"test": True},
                           importance=rng.normal(size=channels).astype(np.float32))
    region_map.save(copy, source.fingerprint)
    Cohort(unit(rng.normal(size=(10, source.facts.embedding_dim))).astype(np.float32)).save(
        copy, source.fingerprint)
    update_calibration(copy, source.fingerprint, {RERANK_KEY: {"weight": 1.0,
                                                               "regions": REGIONS}})
    return copy


def _images(embedder: Embedder, demo_dir: Path, count: int = 4) -> np.ndarray:
    paths = sorted((demo_dir / "left").glob("*.jpg"))[:count]
    return np.stack([embedder.load_file(path)[0] for path in paths])


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "plain"])
def test_describe_net_is_the_embedding_then_the_regions_of_pooled_stage_maps(
    default_copy: Path, cache_dir: Path, demo_dir: Path, weighted: bool
) -> None:
    """Then, for a weighted map, each location's weight: a softmax of the importance over
    the standardised locations (a plain map's descriptions end with the regions)."""
    model = resolve_model(str(default_copy), cache_dir)
    region_map = RegionMap.load(default_copy, model.fingerprint)
    if not weighted:
        region_map = dataclasses.replace(region_map, importance=None)
    net = model.torch_net().eval()
    images = _images(Embedder(model, "torch"), demo_dir)
    with torch.inference_mode():
        described = DescribeNet(net, region_map)(torch.from_numpy(images)).numpy()
        embedding = net(torch.from_numpy(images)).numpy()
        _, maps = net.features_and_maps(torch.from_numpy(images),
                                        [(t, s) for t, s, _ in region_map.stages])
    dim, cells = embedding.shape[1], LOCATIONS**2
    assert described.shape == (len(images), dim + cells * (region_map.dim + weighted))
    np.testing.assert_allclose(described[:, :dim], embedding, atol=1e-5)
    pooled = [F.adaptive_avg_pool2d(x, LOCATIONS).flatten(2).numpy() for x in maps]
    tokens = location_tokens(pooled, region_map.mean, region_map.scale)
    regions = described[:, dim:dim + cells * region_map.dim].reshape(len(images), cells,
                                                                     region_map.dim)
    np.testing.assert_allclose(regions, region_map.regions(tokens), atol=1e-4)
    if weighted:
        np.testing.assert_allclose(described[:, -cells:], region_map.weights(tokens),
                                   rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(described[:, -cells:].sum(axis=1), 1.0, rtol=1e-5)
    else:
        assert region_map.weights(tokens) is None


def test_standardisation_centres_and_scales_each_stage_alike() -> None:
    rng = np.random.default_rng(3)
    maps = [rng.normal(5.0, 3.0, size=(6, 4, 9)), rng.normal(-1.0, 0.1, size=(6, 16, 9))]
    mean, scale = standardisation(maps)
    tokens = location_tokens(maps, mean, scale)  # (6, 9, 20)
    assert tokens.shape == (6, 9, 20)
    np.testing.assert_allclose(tokens.mean(axis=(0, 1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(tokens[..., :4].std(axis=(0, 1)), 1 / 2, rtol=1e-4)
    np.testing.assert_allclose(tokens[..., 4:].std(axis=(0, 1)), 1 / 4, rtol=1e-4)


def test_a_region_map_round_trips_and_refuses_damage_and_other_weights(
    default_copy: Path, cache_dir: Path, tmp_path: Path
) -> None:
    fingerprint = resolve_model(str(default_copy), cache_dir).fingerprint
    loaded = RegionMap.load(default_copy, fingerprint)
    assert loaded.dim == 16 and loaded.facts == {"test": True} and loaded.locations == LOCATIONS
    assert loaded.weighted and loaded.importance.shape == loaded.mean.shape
    with pytest.raises(BundleError, match="trained for other weights"):
        RegionMap.load(default_copy, "0" * 64)
    with pytest.raises(BundleError, match="no learned regions"):
        RegionMap.load(tmp_path, fingerprint)
    (tmp_path / REGIONS_FILE).write_bytes((default_copy / REGIONS_FILE).read_bytes()[:100])
    with pytest.raises(BundleError, match="damaged"):
        RegionMap.load(tmp_path, fingerprint)
    narrow = RegionMap(loaded.weight[:, :10], loaded.mean, loaded.scale, loaded.stages)
    narrow.save(tmp_path, fingerprint)
    with pytest.raises(BundleError, match="shapes do not match"):
        RegionMap.load(tmp_path, fingerprint)
    dataclasses.replace(loaded, importance=loaded.importance[:10]).save(tmp_path, fingerprint)
    with pytest.raises(BundleError, match="shapes do not match"):
        RegionMap.load(tmp_path, fingerprint)
    dataclasses.replace(loaded, importance=None).save(tmp_path, fingerprint)
    assert not RegionMap.load(tmp_path, fingerprint).weighted  # a plain map stays plain


def test_onnx_describes_as_pytorch_does_and_travels_in_the_serving_export(
    default_copy: Path, cache_dir: Path, demo_dir: Path, tmp_path: Path
) -> None:
    """The ONNX engine's descriptions (rerank.onnx, converted once) match PyTorch's; the
    serving export carries rerank.onnx, and a serving model re-ranks with it; scores are the
    cosine plus the weight times MaxSim, its query regions weighted."""
    model = resolve_model(str(default_copy), cache_dir)
    by_torch = reranker_for(Embedder(model, "torch"), cache_dir)
    by_onnx = reranker_for(Embedder(model, "onnx"), cache_dir)
    layout = Layout(model.facts.embedding_dim, LOCATIONS**2, 16, weighted=True)
    assert by_torch.layout == by_onnx.layout == layout
    images = _images(by_torch.source, demo_dir, 5)
    expected = by_torch.describe(images)
    np.testing.assert_allclose(by_onnx.describe(images), expected, atol=1e-4)
    assert by_onnx.describe(images[:0]).shape == (0, layout.width)
    serving = export_serving_model(model, tmp_path / "serving", cache_dir, int8=False)
    assert (serving.path / RERANK_ONNX).is_file()
    np.testing.assert_array_equal(  # the pair score's cohort travels too
        Cohort.load(serving.path, serving.fingerprint, layout.embedding_dim).vectors,
        Cohort.load(default_copy, model.fingerprint, layout.embedding_dim).vectors)
    by_serving = reranker_for(Embedder(serving, "onnx"), None)
    np.testing.assert_allclose(by_serving.describe(images), expected, atol=1e-4)
    scores = by_onnx.scores(expected[0], expected[1:])
    regions = by_onnx.regions(expected)
    dim = layout.embedding_dim
    weights = by_onnx.weights(expected[0])
    assert weights.shape == (LOCATIONS**2,) and weights.sum() == pytest.approx(1.0, abs=1e-5)
    loop = [expected[i, :dim] @ expected[0, :dim]
            + sum(w * max(q @ r for r in regions[i])
                  for q, w in zip(regions[0], weights, strict=True))
            for i in range(1, 5)]
    np.testing.assert_allclose(scores, loop, atol=1e-5)
    np.testing.assert_allclose(by_onnx.cosines(expected[0], expected[1:]),
                               expected[1:, :dim] @ expected[0, :dim], atol=1e-6)
