"""K-fold cross-validation of a recipe on real demo pairs: every pair is validated once, the
summary is the folds' mean and standard error, a rerun resumes from the saved folds, and
``lookalike train --cv`` prints the table row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lookalike.evaluation.crossval import CV_METRICS, cross_validate
from lookalike.models.bundle import load_bundle
from lookalike.models.train import TrainConfig
from lookalike.service.cli import app


@pytest.fixture(scope="module")
def config(pairs_file: Path, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return TrainConfig(
        pairs=pairs_file, left_dir=demo_dir / "left", right_dir=demo_dir / "right", foils=5,
        taps=[6], head=[16], views=1, epochs=2, batch_size=8, lr=1e-2, cv=3, progress=False,
        out=tmp_path_factory.mktemp("cv") / "model",
    )


@pytest.fixture(scope="module")
def result(config: TrainConfig):
    return cross_validate(config)


def test_every_pair_is_validated_once_and_summarised_with_its_standard_error(
    result, config: TrainConfig
) -> None:
    assert [fold["n"] for fold in result.folds] == [10, 10, 10]
    assert [fold["train_pairs"] for fold in result.folds] == [20, 20, 20]
    assert len(result.positives) == 30 and len(result.negatives) == 3 * 10 * 9
    for key in CV_METRICS:
        values = np.array([fold[key] for fold in result.folds])
        assert result.summary[key]["mean"] == pytest.approx(values.mean())
        assert result.summary[key]["se"] == pytest.approx(values.std(ddof=1) / np.sqrt(3))
    # Each fold keeps its last epoch, and its history has every epoch.
    assert all(len(fold["history"]) == 3 for fold in result.folds)
    assert all(fold["top1"] == fold["history"][-1]["top1"] for fold in result.folds)
    assert result.curve[-1] == pytest.approx(result.summary["top1"]["mean"])
    saved = json.loads((config.work_dir / "cv" / "cv.json").read_text())
    assert saved["summary"] == result.summary and saved["folds"] == 3
    assert "± " in (config.work_dir / "cv" / "cv.md").read_text()


def test_the_recipe_model_trains_on_every_pair_and_is_calibrated_out_of_fold(result) -> None:
    bundle = load_bundle(result.bundle)
    extra = bundle.config.extra
    assert extra["data"]["train_pairs"] == 30 and extra["data"]["validation_sets"] == 0
    assert "validation" not in extra and "fit_on_training_pairs" in extra["training"]
    assert extra["cross_validation"]["summary"] == result.summary
    assert (result.bundle / "training-curve.png").stat().st_size > 1000
    calibration = bundle.calibration
    assert calibration is not None and calibration["model_fingerprint"] == bundle.fingerprint
    assert calibration["measured_on"]["positives"] == 30
    assert "out-of-fold" in calibration["measured_on"]["method"]
    assert (result.positives >= calibration["threshold"]).mean() == pytest.approx(
        calibration["tpr"])


def test_a_rerun_resumes_from_the_saved_folds(result, config: TrainConfig) -> None:
    fold_file = config.work_dir / "cv" / "fold-2.json"
    fold_file.unlink()  # as if stopped during fold 2
    before = (config.work_dir / "cv" / "fold-1.json").stat().st_mtime_ns
    again = cross_validate(config)
    assert (config.work_dir / "cv" / "fold-1.json").stat().st_mtime_ns == before
    assert fold_file.is_file()
    assert again.folds[1]["top1"] == pytest.approx(result.folds[1]["top1"])
    # Changed settings are not reused.
    changed = cross_validate(TrainConfig(**{**config.__dict__, "head": [8]}))
    assert all(fold["settings"]["head"] == [8] for fold in changed.folds)


def test_train_cv_prints_mean_and_standard_error(config: TrainConfig, result) -> None:
    runner = CliRunner()
    found = runner.invoke(app, [
        "train", "--pairs", str(config.pairs), "--left-dir", str(config.left_dir),
        "--right-dir", str(config.right_dir), "--foils", "5", "--taps", "6", "--head", "16",
        "--views", "1", "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--cv", "3",
        "--out", str(config.out), "--no-progress",
    ])
    assert found.exit_code == 0, found.output
    top1 = result.summary["top1"]
    assert f"{top1['mean']:.4f} ± {top1['se']:.4f}" in found.output
    assert "| ROC-AUC |" in found.output
    bad = runner.invoke(app, ["train", "--pairs", str(config.pairs), "--cv", "1",
                              "--out", str(config.out)])
    assert bad.exit_code == 2 and bad.output.startswith("error:"), bad.output


def test_keep_fold_models_saves_heads_that_reproduce_the_out_of_fold_vectors(
    result, config: TrainConfig
) -> None:
    """A finished CV without fold heads is re-run fold by fold when they are asked for (same
    figures: the folds are deterministic), and each saved head, put back on the frozen trunk,
    gives the fold's saved validation vectors from the cached trunk features."""
    import torch
    from safetensors.torch import load_file

    from lookalike.evaluation.crossval import head_path
    from lookalike.models.feature_cache import FeatureCache
    from lookalike.models.network import EmbeddingNet
    from lookalike.models.train import load_data

    directory = config.work_dir / "cv"
    assert not head_path(directory, 1).exists()
    kept = cross_validate(TrainConfig(**{**config.__dict__, "keep_fold_models": True}))
    assert [f["top1"] for f in kept.folds] == pytest.approx([f["top1"] for f in result.folds])
    net = EmbeddingNet(config.model_config(), pretrained=False).eval()
    state = load_file(str(head_path(directory, 2)))
    assert not any(key.startswith("trunks.") for key in state)
    net.load_state_dict(state, strict=False)
    record = json.loads((directory / "fold-2.json").read_text())
    with np.load(directory / "fold-2.npz") as arrays:
        saved = arrays["vectors"]
    # The fold's own inputs: the shared cache of the frozen trunk's features of every image.
    images = load_data(config).images
    features = FeatureCache(net, config, torch.device("cpu")).get(images, 1, "all")[0]
    rows = {str(path): row for row, path in enumerate(images)}
    with torch.inference_mode():
        vectors = net.project(features[[rows[p] for p in record["images"]]]).numpy()
    np.testing.assert_allclose(vectors, saved, atol=1e-5)
