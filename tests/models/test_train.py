"""Training on real demo pairs: the loss falls, a bundle comes out, resume continues exactly,
fine-tuning touches only the chosen stages, and bad configs fail in one line (exit code 2).

Every run here is a handful of steps on a few real look-alike pairs: real weights, real
images, real FAISS; long training is not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lookalike.models.bundle import SHIPPED_BUNDLES, load_bundle
from lookalike.models.embedder import Embedder
from lookalike.models.resolve import resolve_model
from lookalike.models.train import TrainConfig, TrainConfigError, Trainer, train
from lookalike.service.cli import app


@pytest.fixture(scope="module")
def make_config(pairs_file: Path, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    shared = tmp_path_factory.mktemp("feature-cache")

    def make(out: Path, **changes) -> TrainConfig:
        values = dict(
            pairs=pairs_file, left_dir=demo_dir / "left", right_dir=demo_dir / "right",
            foils=5, taps=[6, 7], head=[32], views=2, epochs=3, batch_size=8, lr=1e-2,
            patience=10, out=out, progress=False,
            # Every run here caches the same features: computed once, shared by the module.
            feature_cache=shared,
        )
        values.update(changes)
        return TrainConfig(**values)

    return make


@pytest.fixture(scope="module")
def trained(make_config, tmp_path_factory: pytest.TempPathFactory):
    config = make_config(tmp_path_factory.mktemp("run") / "model")
    return config, train(config)


def test_training_lowers_the_loss_and_writes_a_bundle_that_embeds(trained, demo_dir: Path) -> None:
    config, result = trained
    history = json.loads((config.work_dir / "history.json").read_text())
    losses = [entry["loss"] for entry in history if entry["epoch"] > 0]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert result.steps == 9

    bundle = load_bundle(result.bundle)
    assert bundle.fingerprint == result.fingerprint
    extra = bundle.config.extra
    assert extra["recipe"]["loss"] == "infonce" and extra["recipe"]["taps"] == [6, 7]
    assert extra["data"]["train_pairs"] == 24 and extra["data"]["validation_sets"] == 6
    assert extra["validation"] == result.metrics and result.metrics["n"] == 6
    assert (result.bundle / "training-curve.png").stat().st_size > 1000

    embedder = Embedder(bundle)
    files = sorted((demo_dir / "left").glob("*.jpg"))[:3]
    (batch,) = embedder.embed_files(files)
    assert batch.vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(batch.vectors, axis=1), 1.0, atol=1e-5)


def test_resume_continues_from_the_saved_step(make_config, trained, tmp_path: Path) -> None:
    """Stop mid-epoch at step 4, resume: the run ends exactly where an unbroken one does."""
    _, unbroken = trained
    first = make_config(tmp_path / "model", max_steps=4)
    train(first)
    saved = torch.load(first.work_dir / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 4 and saved["state"]["batch"] == 1

    resumed_config = make_config(tmp_path / "model", resume=True)
    trainer = Trainer(resumed_config)
    trainer._prepare()
    trainer.load_checkpoint()
    assert trainer.state["step"] == 4
    result = Trainer(resumed_config).fit()
    assert result.steps == unbroken.steps == 9
    mine = load_file(str(resumed_config.work_dir / "best.safetensors"))
    theirs = load_file(str(unbroken.bundle.with_name("model.work") / "best.safetensors"))
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, atol=1e-5, rtol=1e-5)


def test_resume_refuses_changed_settings(make_config, trained, tmp_path: Path) -> None:
    config, _ = trained
    changed = make_config(config.out, resume=True, loss="triplet-cosine")
    with pytest.raises(TrainConfigError, match="settings changed since it was saved: loss"):
        Trainer(changed).fit()


def test_fine_tuning_trains_only_the_last_stages(make_config, tmp_path: Path) -> None:
    config = make_config(tmp_path / "model", trainable_stages=1, standardize=False,
                         batch_size=2)
    trainer = Trainer(config)
    stages = trainer.net._stages[0]
    last = [p.detach().clone() for p in stages[-1].parameters()]
    first = [p.detach().clone() for p in stages[0].parameters()]
    stats = stages[0][1].running_mean.clone()
    loss = trainer.step(np.array([0, 1]))
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(last, stages[-1].parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, stages[0].parameters(), strict=True))
    assert torch.equal(stats, stages[0][1].running_mean), "frozen BatchNorm keeps its statistics"


@pytest.mark.parametrize("trainable", [0, 1, 2, 4])
def test_frozen_part_and_the_trainable_stages_rebuild_the_features(trainable: int) -> None:
    """features == features_from(frozen_part(images, k), k) for any split point k, on a fused
    two-trunk net with taps and grids on both sides of it."""
    from lookalike.models.network import EmbeddingConfig, EmbeddingNet

    net = EmbeddingNet(EmbeddingConfig(
        backbones=("efficientnet_lite0", "efficientnet_lite1"), taps=(5, 7), grid_taps=(4, 6),
        grid=2), pretrained=False).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        whole = net.features(images)
        parts = net.frozen_part(images, trainable)
        rebuilt = net.features_from(parts, trainable)
    torch.testing.assert_close(rebuilt, whole)
    assert len(parts) == 2 and parts[0].boundary.dim() == 4


def test_cached_fine_tuning_runs_only_the_trainable_stages(make_config, tmp_path: Path) -> None:
    """--cache-frozen: the frozen stages' output is cached per view, a step trains the last
    stages from it, and validation sees what the whole network computes."""
    config = make_config(tmp_path / "model", trainable_stages=2, cache_frozen=True, epochs=1,
                         batch_size=4)
    trainer = Trainer(config)
    trainer._prepare()
    stages = trainer.net._stages[0]
    last = [p.detach().clone() for p in stages[-1].parameters()]
    first = [p.detach().clone() for p in stages[0].parameters()]
    assert np.isfinite(trainer.step(np.array([0, 1, 2, 3])))
    assert any(not torch.equal(a, b) for a, b in zip(last, stages[-1].parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, stages[0].parameters(), strict=True))
    cached = trainer._features_of(trainer.val_parts)
    whole = trainer.cache.compute(trainer.val.images, augment=False, seed=0, desc="check")
    torch.testing.assert_close(cached, whole, atol=0.05, rtol=0.05)  # bf16 autocast, cached fp16
    result = train(config)
    assert load_bundle(result.bundle).fingerprint == result.fingerprint


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--loss", "arcface"], "error: unknown loss 'arcface'; choose one of"),
        (["--miner", "hardest"], "error: unknown miner 'hardest'"),
        (["--pairs", "{tmp}/missing.csv"], "error: pairs CSV {tmp}/missing.csv does not exist"),
        (["--pairs", "{tmp}/empty.csv"], "has no pairs"),
        (["--batch-size", "1"], "error: batch_size must be >= 2"),
        (["--head", "wide"], "error: head must be a comma-separated list of int"),
        (["--taps", "42"], "error: backbone efficientnet_lite0 has stages 0-8"),
        (["--config", "{tmp}/bad.toml"], "error: {tmp}/bad.toml: unknown setting(s) lossy"),
        (["--labelled", "{tmp}/empty.csv"], "error: give exactly one data source"),
    ],
)
def test_bad_configs_fail_in_one_line_with_exit_code_2(
    args: list[str], message: str, pairs_file: Path, demo_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty.csv").write_text("left,right\n")
    (tmp_path / "left").mkdir()
    (tmp_path / "right").mkdir()
    (tmp_path / "bad.toml").write_text(f'pairs = "{pairs_file}"\nlossy = "infonce"\n')
    args = [a.format(tmp=tmp_path) for a in args]
    if "--pairs" not in args and "--config" not in args:
        args += ["--pairs", str(pairs_file), "--left-dir", str(demo_dir / "left"),
                 "--right-dir", str(demo_dir / "right")]
    args += ["--out", str(tmp_path / "model"), "--no-progress"]
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], result.output


@pytest.mark.parametrize("name", [None, "default", "accurate"])
def test_the_shipped_models_are_what_their_recipes_make(tmp_path: Path, name: str | None) -> None:
    """``resolve_model(None)`` loads models/default/, ``--model accurate`` models/accurate/,
    each trained by its recipe in models/recipes/: cross-validated, then trained on every
    pair, its figures the CV's."""
    bundle = resolve_model(name, tmp_path)
    shipped_path = SHIPPED_BUNDLES[name or "default"]
    assert bundle.path == shipped_path
    extra = bundle.config.extra
    recipe = TrainConfig.from_file(shipped_path.parent / "recipes" / f"{shipped_path.name}.toml")
    # where and how it ran, not what it made
    where = {"out", "work_dir", "feature_cache", "progress", "keep_fold_models"}
    shipped = {k: v for k, v in extra["recipe"].items() if k not in where}
    # settings added after the bundle was made count at their defaults (the same run)
    defaults = TrainConfig(pairs=recipe.pairs).to_dict()
    made = {k: v for k, v in recipe.to_dict().items()
            if k not in where and (k in shipped or v != defaults[k])}
    assert shipped == made, "the shipped bundle is what the recipe makes"
    assert recipe.cv == 5 and extra["cross_validation"]["folds"] == 5
    assert extra["data"]["train_pairs"] == extra["data"]["pairs"] == 1500
    assert extra["data"]["validation_sets"] == 0
    top1 = extra["cross_validation"]["summary"]["top1"]
    assert top1["mean"] - 3 * top1["se"] > 0.45, "trained: well above the untrained ~0.35"
    assert "out-of-fold" in bundle.calibration["measured_on"]["method"]
    size = sum(f.stat().st_size for f in shipped_path.iterdir())
    assert size < 20_000_000
    if name == "accurate":  # its trunks come from the offline packages, checked by sha256
        config = json.loads((shipped_path / "config.json").read_text())
        assert sorted(config["offline_trunks"]) == ["0", "1", "2"]
        # head (int8 rows), region map and a cohort with 800 images' regions: 9 MB; any
        # trunk's ImageNet weights (4.7M, 5.4M and 6.1M parameters) would break this
        assert size < 10_000_000


def test_feature_cache_survives_a_data_set_copied_again(make_config, demo_dir: Path,
                                                        tmp_path: Path) -> None:
    """The cache is keyed on the images' bytes: new mtimes (a data set unpacked again) reuse
    it, an edited image makes a new one."""
    import os
    import shutil

    from lookalike.models.feature_cache import FeatureCache
    from lookalike.models.network import EmbeddingNet

    images = []
    for source in sorted((demo_dir / "left").iterdir())[:3]:
        images.append(tmp_path / source.name)
        shutil.copy(source, images[-1])
    config = make_config(tmp_path / "model", feature_cache=tmp_path / "cache")
    cache = FeatureCache(EmbeddingNet(config.model_config(), pretrained=False), config,
                         torch.device("cpu"))
    first = cache.get(images, 1, "probe")
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    for image in images:
        os.utime(image, ns=(0, 10**18))
    torch.testing.assert_close(cache.get(images, 1, "probe"), first)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == files
    shutil.copy(demo_dir / "right" / sorted(os.listdir(demo_dir / "right"))[0], images[0])
    cache.get(images, 1, "probe")
    assert len(list((tmp_path / "cache").iterdir())) == 2
