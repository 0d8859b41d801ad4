"""``lookalike dedup`` and ``lookalike dedup-evaluate`` end to end on real images."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lookalike.models.bundle import ModelBundle, load_bundle, save_bundle


def test_dedup_indexes_a_folder_first_and_writes_csv(
    run: Callable, planted_set, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(planted_set.folder, folder, ignore=shutil.ignore_patterns("*.csv"))
    out = tmp_path / "groups.csv"
    result = run("dedup", folder, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "groups of near-duplicates" in result.output
    assert (folder / ".lookalike-index" / "manifest.json").is_file()
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_group: dict[str, list[str]] = {}
    for row in rows:
        by_group.setdefault(row["group"], []).append(row["key"])
    assert len(by_group) >= 7
    for keys in by_group.values():
        assert len({planted_set.groups[k] for k in keys}) == 1, keys
    again = run("dedup", folder, "--out", tmp_path / "again.csv", "--no-progress")
    assert again.exit_code == 0 and (tmp_path / "again.csv").read_text() == out.read_text()


def test_dedup_threshold_and_bad_output_name(run: Callable, planted_store_path: Path,
                                             tmp_path: Path) -> None:
    strict = run("dedup", planted_store_path, "--out", tmp_path / "s.json", "--threshold", 0.99,
                 "--no-progress")
    assert strict.exit_code == 0, strict.output
    loose = run("dedup", planted_store_path, "--out", tmp_path / "l.json", "--threshold", 0.2,
                "--no-progress")
    assert loose.exit_code == 0, loose.output
    count = [len(json.loads((tmp_path / n).read_text())["groups"]) for n in ("s.json", "l.json")]
    assert count[0] < count[1]
    bad = run("dedup", planted_store_path, "--out", tmp_path / "groups.txt", "--no-progress")
    assert bad.exit_code == 2 and bad.output.startswith("error:") and ".json or .csv" in bad.output
    missing = run("dedup", tmp_path / "nowhere", "--out", tmp_path / "g.json")
    assert missing.exit_code == 2 and missing.output.startswith("error:")


@pytest.mark.slow
def test_dedup_evaluate_cross_validates_and_writes_the_calibration(
    run: Callable, demo_dir: Path, tmp_path: Path, bundle: ModelBundle
) -> None:
    model = tmp_path / "model"
    save_bundle(bundle.net, model)
    shutil.copy(bundle.path / "calibration.json", model)  # the verification threshold
    text = (model / "calibration.json").read_text()
    (model / "calibration.json").write_text(text.replace(bundle.fingerprint, load_bundle(
        model).fingerprint))
    out = tmp_path / "eval"
    result = run("dedup-evaluate", demo_dir / "pairs.csv", "--out", out, "--originals", 10,
                 "--others", 5, "--folds", 2, "--model", model, "--engine", "torch",
                 "--write-calibration", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "keypoints precision" in result.output and (out / "dedup-curve.png").is_file()
    metrics = json.loads((out / "dedup-metrics.json").read_text())
    assert len(metrics["methods"]["keypoints"]["folds"]) == 2
    assert load_bundle(model).calibration["dedup"] == metrics["params"]
