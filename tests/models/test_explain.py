"""Explanations: the exact split adds up to the cosine on several model configurations and on
the shipped model (PyTorch and ONNX), and the top regions are the ones that matter (deletion).

The algebra is checked on small random-init networks: the split is derived from the network
itself, so any taps, grids, backbones, standardisation or linear head must add up exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.evaluation.explanations import deletion_test
from lookalike.models.embedder import Embedder
from lookalike.models.explain import EXACT, OCCLUSION, Explainer, explainer_for, split
from lookalike.models.explain_net import LocationTerms, NotDecomposableError, derive_readout
from lookalike.models.network import EmbeddingConfig, EmbeddingNet, grid_pool

PAIRS = 6


def _images(embedder: Embedder, demo_dir: Path, demo_pairs: list[tuple[str, str]], count: int
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    def load(side: str, name: str) -> np.ndarray:
        return embedder.load_file(demo_dir / side / f"{name}.jpg")[0]

    return [(load("left", left), load("right", right)) for left, right in demo_pairs[:count]]


class MultiScaleNet(EmbeddingNet):
    """A family member the config cannot describe: 2x2, 3x3 and 4x4 grids of one stage."""

    GRIDS = (2, 3, 4)
    STAGE = 5

    def __init__(self, config: EmbeddingConfig) -> None:
        super().__init__(config, pretrained=False)
        channels = 112  # Lite0 stage 5
        dim = config.feature_dim + channels * sum(g * g for g in self.GRIDS)
        self.head = torch.nn.Linear(dim, 24)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x, pooled = images, []
        for index, stage in enumerate(self.stages[0]):
            x = stage(x)
            if index == self.STAGE:
                pooled += [grid_pool(x, grid) for grid in self.GRIDS]
        return torch.cat([*pooled, x.mean(dim=(2, 3))], dim=1)


CONFIGS = {
    "taps+grid2+standardize+head": dict(taps=(6,), grid_taps=(4,), grid=2, standardize=True,
                                        head=(32,)),
    "identity-head": dict(),
    "two-backbones+grid3": dict(backbones=("efficientnet_lite0", "efficientnet_lite1"),
                                taps=(5,), grid_taps=(3, 6), grid=3, head=(16,)),
}


def _random_net(name: str) -> EmbeddingNet:
    torch.manual_seed(0)
    if name == "multi-scale-grids":
        net = MultiScaleNet(EmbeddingConfig())
    else:
        net = EmbeddingNet(EmbeddingConfig(**CONFIGS[name]), pretrained=False)
    if net.standardize is not None:
        net.standardize.mean.normal_()
        net.standardize.std.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("name", [*CONFIGS, "multi-scale-grids"])
def test_exact_split_adds_up_on_model_configs(
    name: str, embedder: Embedder, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> None:
    net = _random_net(name)
    readout = derive_readout(net)
    terms = LocationTerms(net, readout)
    for a, b in _images(embedder, demo_dir, demo_pairs, 3):
        batch = torch.from_numpy(np.stack([a, b]))
        with torch.no_grad():
            vectors = net(batch).double().numpy()
            per_location = terms(batch).numpy()
        explanation = split(per_location[0], per_location[1], readout.bias, readout.grid, "torch")
        cosine = float(vectors[0] @ vectors[1])
        assert explanation.score == pytest.approx(cosine, abs=1e-4)
        assert explanation.total() == pytest.approx(cosine, abs=1e-4)
        assert explanation.constant + explanation.pairs.sum() + (
            explanation.query_map.sum() + explanation.match_map.sum() - explanation.pairs.sum()
        ) == pytest.approx(cosine, abs=1e-4)


@pytest.mark.parametrize("config", [dict(pooling="gem"), dict(head=(32, 16))])
def test_models_outside_the_family_are_refused(config: dict) -> None:
    torch.manual_seed(0)
    net = EmbeddingNet(EmbeddingConfig(**config), pretrained=False).eval()
    with pytest.raises(NotDecomposableError, match="not linear"):
        derive_readout(net)


@pytest.fixture(scope="module")
def explainer(embedder: Embedder) -> Explainer:
    return explainer_for(embedder)  # the one the service tests use too


def test_shipped_model_is_explained_exactly(
    explainer: Explainer, embedder: Embedder, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> None:
    assert explainer.method == EXACT and explainer.grid == 7
    for a, b in _images(embedder, demo_dir, demo_pairs, PAIRS):
        explanation = explainer.explain(a, b)
        vectors = embedder.embed_arrays(np.stack([a, b]))
        assert explanation.score == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-4)
        assert explanation.total() == pytest.approx(explanation.score, abs=1e-4)
        best = explanation.top_pairs(3)
        assert best[0].contribution >= best[1].contribution >= best[2].contribution


def test_onnx_explanation_matches_pytorch_and_the_onnx_score(
    explainer: Explainer, bundle, cache_dir: Path, embedder: Embedder, demo_dir: Path,
    demo_pairs: list[tuple[str, str]],
) -> None:
    onnx = Embedder(bundle, engine="onnx", cache_dir=cache_dir)
    onnx_explainer = Explainer(onnx, cache_dir)
    assert onnx_explainer.method == EXACT and onnx_explainer.engine == "onnx"
    for a, b in _images(embedder, demo_dir, demo_pairs, 3):
        reference, got = explainer.explain(a, b), onnx_explainer.explain(a, b)
        vectors = onnx.embed_arrays(np.stack([a, b]))
        assert got.score == pytest.approx(float(vectors[0] @ vectors[1]), abs=1e-4)
        assert np.abs(got.query_map - reference.query_map).max() < 1e-4
        assert np.abs(got.match_map - reference.match_map).max() < 1e-4


@pytest.mark.parametrize("occlusion", [False, True], ids=[EXACT, OCCLUSION])
def test_masking_top_regions_lowers_the_score_more_than_random(
    occlusion: bool, embedder: Embedder, demo_dir: Path, demo_pairs: list[tuple[str, str]],
    explainer: Explainer,
) -> None:
    chosen = explainer if not occlusion else Explainer(embedder, occlusion=True)
    assert chosen.method == (OCCLUSION if occlusion else EXACT)
    result = deletion_test(chosen, _images(embedder, demo_dir, demo_pairs, 10), top=5, draws=2)
    summary = result.summary()
    assert summary["top_drop"] > summary["random_drop"], summary
    assert result.wins >= 0.5, summary
