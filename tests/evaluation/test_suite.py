"""The whole evaluation on 12 real pairs: every metric, every figure, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lookalike.evaluation.challenge import read_challenge
from lookalike.evaluation.errors import EvaluationError
from lookalike.evaluation.images import ImageFolder
from lookalike.evaluation.suite import EvaluationOptions, run_evaluation
from lookalike.models.embedder import Embedder

FIGURES = ("roc", "precision_recall", "score_histogram", "embedding_map", "top_matches")


def test_evaluation_writes_metrics_figures_and_report(
    tmp_path: Path,
    small_image_dir: Path,
    small_pairs: list[tuple[str, str]],
    embedder: Embedder,
) -> None:
    folders = ImageFolder(small_image_dir / "left"), ImageFolder(small_image_dir / "right")
    options = EvaluationOptions(foils=5, seed=0, far=0.1, grid_queries=3, progress=False)
    out = tmp_path / "eval"
    result = run_evaluation(
        small_pairs, *folders, embedder, out, options=options, data={"split": "all"}
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    ranked = metrics["candidates"]
    assert ranked["n"] == 12 and ranked["candidates"] == 6
    assert 1 / 6 <= ranked["mrr"] <= 1 and ranked["top1"] <= ranked["top5"]
    assert metrics["candidates_assign"]["n"] == 12
    assert metrics["retrieval"]["index_size"] == 12
    assert metrics["retrieval"]["recall@10"] >= metrics["retrieval"]["recall@1"]
    verification = metrics["verification"]
    assert verification["positives"] == 12 and verification["negatives"] == 132
    assert 0.5 < verification["auc"] <= 1.0, "real look-alikes should beat chance"
    assert metrics["calibration"]["far"] <= 0.1
    assert 0 <= metrics["two_of_three"]["accuracy"] <= 1
    report = (out / "report.md").read_text()
    for name in FIGURES:
        file = out / metrics["figures"][name]
        with Image.open(file) as image:
            assert image.format == "PNG" and image.width > 200
        assert f"]({file.name})" in report
    assert result.calibration.model_fingerprint == embedder.fingerprint


def test_evaluation_scores_a_given_candidates_file(
    tmp_path: Path,
    small_image_dir: Path,
    small_pairs: list[tuple[str, str]],
    embedder: Embedder,
) -> None:
    # The true match first, always: ranks are exactly what the model says of that one image.
    rights = [right for _, right in small_pairs]
    lines = [f"{left},{right},{rights[i - 1]}" for i, (left, right) in enumerate(small_pairs)]
    path = tmp_path / "c.csv"
    path.write_text("left,c0,c1\n" + "\n".join(lines) + "\n")
    folders = ImageFolder(small_image_dir / "left"), ImageFolder(small_image_dir / "right")
    result = run_evaluation(
        small_pairs,
        *folders,
        embedder,
        tmp_path / "eval",
        challenge=read_challenge(path),
        options=EvaluationOptions(progress=False, grid_queries=2),
    )
    assert result.metrics["candidates"]["candidates"] == 2
    assert result.metrics["candidates"]["top5"] == 1.0


def test_options_fail_before_any_work() -> None:
    with pytest.raises(EvaluationError, match="false-match rate"):
        EvaluationOptions(far=1.5)
    with pytest.raises(EvaluationError, match="at least 1"):
        EvaluationOptions(foils=0)
