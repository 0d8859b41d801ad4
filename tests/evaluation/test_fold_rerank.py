"""The fold re-ranking measurements (issue 14): the exact per-cell split of a linear head, the
per-location terms averaging back to it, and the nested choice of lam never looking at the fold
it scores."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.evaluation.fold_rerank import (
    LOCATIONS,
    Fold,
    Head,
    _cell_masks,
    add_row_arguments,
    head_3x3,
    head_7x7,
    layout,
    nested,
    pair_matrix,
    row_recipe,
    verification_table,
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


def _fold(number: int, pairs: int, rng: np.random.Generator) -> tuple[Fold, np.ndarray]:
    """A fold of ``pairs`` queries (images 0..P-1) whose true matches are images P..2P-1, with
    random unit vectors, and regions that carry the pair's identity (one-hot per pair)."""
    vectors = _unit(rng.normal(size=(2 * pairs, 8)))
    candidates = np.stack([np.roll(np.arange(pairs, 2 * pairs), -i)[:3] for i in range(pairs)])
    fold = Fold(number, np.arange(2 * pairs), vectors, np.arange(pairs), candidates,
                np.zeros(pairs, int), head=None)
    regions = np.tile(np.eye(2 * pairs)[np.r_[0:pairs, 0:pairs]][:, None, :], (1, 3, 1))
    return fold, regions


def test_pair_matrix_puts_the_matching_pairs_on_the_diagonal() -> None:
    rng = np.random.default_rng(2)
    fold, regions = _fold(1, 5, rng)
    cos = pair_matrix(fold, fold.vectors)
    np.testing.assert_allclose(cos[1, 3], fold.vectors[1] @ fold.vectors[5 + 3])
    late = pair_matrix(fold, None, regions)
    np.testing.assert_array_equal(late, np.eye(5))


def test_verification_with_late_interaction_chooses_lam_out_of_fold() -> None:
    """Regions that tell every pair apart make AUC ~1 once lam > 0; the random cosine alone is
    near chance. lam is picked on the other folds (all of them want the largest here)."""
    rng = np.random.default_rng(3)
    folds, regions = zip(*(_fold(k, 12, rng) for k in (1, 2, 3)), strict=True)
    table = verification_table(list(folds), [f.vectors for f in folds],
                               {"one-hot": list(regions)})
    assert table["fold model"]["metrics"] == table["flip TTA"]["metrics"]
    late = table["flip TTA cosine + lam x one-hot"]
    assert all(lam > 0 for lam in late["lam"])
    assert all(m["auc"] > 0.99 and m["tmr_at_far"] > 0.9 for m in late["metrics"])
    assert np.mean([m["auc"] for m in table["fold model"]["metrics"]]) < 0.9


def test_the_flipped_region_cache_holds_the_mirror_images_maps(tmp_path) -> None:
    """``region_cache(flip=True)`` (training the map on mirrored pairs) computes each image's
    stage maps from its mirror: the same maps as the plain cache of a mirrored copy of the
    file, cached apart from the plain cache (another key) and without the ``mirror`` features."""
    from PIL import Image

    from lookalike.evaluation.fold_rerank import region_cache

    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 255, size=(224, 224, 3), dtype=np.uint8))
    picture.save(tmp_path / "a.png")
    picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.png")
    config = TrainConfig(pairs="unused.csv")
    cache = tmp_path / "cache"
    flipped = region_cache(config, [tmp_path / "a.png"], cache, progress=False, flip=True)
    plain = region_cache(config, [tmp_path / "mirror.png"], cache, progress=False)
    assert "mirror" not in flipped and "mirror" in plain
    assert len(list(cache.glob("regions-*.safetensors"))) == 2
    for name, maps in flipped.items():
        np.testing.assert_allclose(maps.float().numpy(), plain[name].float().numpy(),
                                   atol=2e-2, rtol=1e-2)


def test_the_region_cache_holds_the_stages_asked_for(tmp_path) -> None:
    """``--stages``: another stage set is another cache (the default one's key unchanged),
    holding those stages' maps pooled to 7 x 7, in the order ``stage_maps`` reads them."""
    from PIL import Image

    from lookalike.evaluation.fold_rerank import region_cache, stage_maps
    from lookalike.models.network import stage_channels

    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 255, size=(96, 96, 3), dtype=np.uint8)).save(
        tmp_path / "a.png")
    config = TrainConfig(pairs="unused.csv")
    cache = tmp_path / "cache"
    default = region_cache(config, [tmp_path / "a.png"], cache, progress=False)
    wider = region_cache(config, [tmp_path / "a.png"], cache, progress=False,
                         stages=(3, 4, 5, 6, 7))
    assert len(list(cache.glob("regions-*.safetensors"))) == 2
    assert "b0.s3" in wider and "b0.s3" not in default
    channels = stage_channels(config.backbones[0])
    maps = stage_maps({k: v.float().numpy() for k, v in wider.items() if k != "mirror"}, 1,
                      (3, 4, 5, 6, 7))
    assert [m.shape for m in maps] == [(1, channels[s], 49) for s in (3, 4, 5, 6, 7)]
    for name in default:  # the stages both hold are the same maps
        np.testing.assert_array_equal(default[name].numpy(), wider[name].numpy())


def test_a_row_is_its_recipe_with_the_overrides_it_was_run_with() -> None:
    """The fold tools read a CV row as the recipe plus ``--set`` (how the two-trunk rows of
    the accurate recipe are re-read after it gained Lite2), then the tool's own overrides."""
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser()
    add_row_arguments(parser)
    recipe = Path(__file__).parents[2] / "models" / "recipes" / "accurate.toml"
    args = parser.parse_args(["--config", str(recipe), "--cv-dir", "unused",
                              "--set", "backbones=efficientnet_lite0,efficientnet_lite1"])
    assert row_recipe(args).backbones == ["efficientnet_lite0", "efficientnet_lite1"]
    assert row_recipe(args, backbones="efficientnet_lite0").backbones == ["efficientnet_lite0"]
    plain = parser.parse_args(["--config", str(recipe), "--cv-dir", "unused"])
    assert row_recipe(plain).backbones == TrainConfig.from_file(recipe).backbones
