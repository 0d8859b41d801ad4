"""The plain pair score's hubness correction on the CV folds (issue 14): the entry names the
k that wins out of fold with its own threshold; shipping writes the bundle's cohort and the
entry, which the model then loads and /compare judges by."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from lookalike.evaluation.fold_hubness import hubness_entry, ship
from lookalike.models.cohort import cohort_of
from lookalike.models.embedder import Embedder
from lookalike.models.model import CALIBRATION_FILE, COHORT_FILE, HUBNESS_KEY
from lookalike.models.resolve import resolve_model
from lookalike.models.train import TrainConfig


def _folds(hub_shift: float) -> dict[int, list[np.ndarray]]:
    """Query 0 is a hub (0.8 to every match): uncorrected, its non-matching pairs beat the
    matching ones; corrected (k=5), they fall below."""
    plain, fixed = [], []
    for _ in range(3):
        cosine = np.full((10, 10), 0.2)
        cosine[np.diag_indices(10)] = 0.6
        cosine[0, :] = 0.8
        cosine[0, 0] = 0.9
        plain.append(cosine)
        fixed.append(cosine - hub_shift * np.where(np.arange(10) == 0, 0.8, 0.2)[:, None])
    return {0: plain, 5: fixed}


def test_the_entry_names_the_winning_k_and_its_own_threshold() -> None:
    """The k choice is fold_learned_regions.verification_entry's (k x weight, nested), with
    the weight fixed at 0."""
    entry = hubness_entry(_folds(0.5))
    assert entry["k"] == 5 and entry["nested_k"] == [5] * 3
    assert entry["auc"] == 1.0 and entry["auc_gain"] > 0 and entry["far"] <= 0.01
    assert set(entry) >= {"threshold", "target_far", "tmr_at_far", "positives", "negatives"}
    assert "weight" not in entry and "hubness_k" not in entry
    assert hubness_entry(_folds(0.0))["k"] == 0, "no gain: no correction (the first, 0)"


def test_ship_writes_a_cohort_and_an_entry_the_model_loads(
    tmp_path: Path, cache_dir: Path, demo_dir: Path
) -> None:
    copy = tmp_path / "default"
    shutil.copytree(resolve_model(None, cache_dir).path, copy)
    model = resolve_model(str(copy), cache_dir)
    embedder = Embedder(model, "torch")
    images = np.stack([embedder.load_file(p)[0] for p in sorted(
        (demo_dir / "left").glob("*.jpg"))[:4]])
    with torch.no_grad():
        features = model.torch_net().features(torch.from_numpy(images)).double().numpy()
    entry = {**hubness_entry(_folds(0.5)), "threshold": 0.05}
    # a model without a cohort yet: the entry and the file go together
    calibration = json.loads((copy / CALIBRATION_FILE).read_text())
    del calibration[HUBNESS_KEY]
    (copy / CALIBRATION_FILE).write_text(json.dumps(calibration))
    (copy / COHORT_FILE).unlink()
    written = ship(copy, features, TrainConfig(pairs=Path("pairs.csv")), Path("r.toml"), 5, entry)
    assert [p.name for p in written] == ["cohort.safetensors", "calibration.json"]
    # a cohort already there for these weights (it may hold the re-ranker's regions) is kept
    stored = (copy / COHORT_FILE).read_bytes()
    again = ship(copy, features, TrainConfig(pairs=Path("pairs.csv")), Path("r.toml"), 5, entry)
    assert [p.name for p in again] == ["calibration.json"]
    assert (copy / COHORT_FILE).read_bytes() == stored
    reloaded = resolve_model(str(copy), cache_dir)
    assert reloaded.calibration[HUBNESS_KEY]["threshold"] == 0.05
    assert reloaded.calibration[HUBNESS_KEY]["measured_on"]["images"] == 4
    cohort = cohort_of(reloaded, embedder.dim)
    np.testing.assert_allclose(cohort.vectors, embedder.embed_arrays(images), atol=1e-2)
