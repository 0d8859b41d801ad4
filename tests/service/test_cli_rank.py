"""`lookalike make-candidates`, `rank` and `evaluate` on real images, and their user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lookalike.core.pairs import read_pairs, split_pairs
from lookalike.evaluation.challenge import read_challenge
from lookalike.models.bundle import ModelBundle, load_bundle, save_bundle
from lookalike.models.embedder import Embedder


@pytest.fixture(scope="module")
def pairs_dir(
    tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> Path:
    """6 real pairs in the challenge layout: left/, right/, pairs.csv."""
    root = tmp_path_factory.mktemp("tll")
    for side in ("left", "right"):
        (root / side).mkdir()
    pairs = demo_pairs[:6]
    for left, right in pairs:
        shutil.copy(demo_dir / "left" / f"{left}.jpg", root / "left")
        shutil.copy(demo_dir / "right" / f"{right}.jpg", root / "right")
    with open(root / "pairs.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("left", "right"), *pairs])
    return root


def _rank(pairs_dir: Path, candidates: Path, out: Path) -> list[object]:
    """`lookalike rank` arguments: ``candidates`` over the pairs' left/right folders."""
    return [
        "rank", "--candidates", candidates, "--query-dir", pairs_dir / "left",
        "--candidate-dir", pairs_dir / "right", "--out", out,
    ]


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_make_candidates_then_rank_round_trip(
    run, pairs_dir: Path, tmp_path: Path, embedder: Embedder
) -> None:
    candidates, scores = tmp_path / "c.csv", tmp_path / "s.csv"
    made = run(
        "make-candidates", pairs_dir / "pairs.csv", "--foils", 3, "--seed", 7, "--out", candidates
    )
    assert made.exit_code == 0, made.output
    assert "6 queries x 4 candidates" in made.output
    challenge = read_challenge(candidates)
    result = run(
        *_rank(pairs_dir, candidates, scores),
        "--no-progress",
        "--answers",
        pairs_dir / "pairs.csv",
        "--engine",
        embedder.engine_name,  # the reference below is computed with the same engine
    )
    assert result.exit_code == 0, result.output
    assert "6 queries x 4 candidates" in result.output and "top-1 " in result.output
    rows = _rows(scores)
    assert rows[0] == list(challenge.header) == _rows(candidates)[0]
    assert [row[0] for row in rows[1:]] == list(challenge.queries)
    # Reference: each image embedded alone, one at a time (no batching, no cache).
    vectors = {
        (path.parent.name, path.stem): embedder.embed_bytes(path.read_bytes())
        for path in pairs_dir.glob("*/*.jpg")
    }
    for row, query, keys in zip(rows[1:], challenge.queries, challenge.candidates, strict=True):
        expected = [vectors["right", k] @ vectors["left", query] for k in keys]
        np.testing.assert_allclose([float(x) for x in row[1:]], expected, atol=1e-4)


def test_rank_with_assign_marks_one_candidate_per_query(
    run, pairs_dir: Path, tmp_path: Path
) -> None:
    candidates, plain, assigned = tmp_path / "c.csv", tmp_path / "p.csv", tmp_path / "a.csv"
    run("make-candidates", pairs_dir / "pairs.csv", "--foils", 5, "--out", candidates)
    assert run(*_rank(pairs_dir, candidates, plain), "--no-progress").exit_code == 0
    result = run(*_rank(pairs_dir, candidates, assigned), "--no-progress", "--assign")
    assert result.exit_code == 0, result.output
    before = np.array([[float(x) for x in row[1:]] for row in _rows(plain)[1:]])
    after = np.array([[float(x) for x in row[1:]] for row in _rows(assigned)[1:]])
    boosted = after > 1.0
    assert (boosted.sum(axis=1) == 1).all(), "exactly one assigned candidate per query"
    np.testing.assert_allclose(after - 2.0 * boosted, before, atol=1e-6)
    challenge = read_challenge(candidates)
    picked = [row[int(np.argmax(s))] for row, s in zip(challenge.candidates, after, strict=True)]
    assert len(set(picked)) == len(picked), "one-to-one: no candidate assigned twice"
    # With 5 foils every query lists all 6 right images: the assignment is a permutation.
    assert set(picked) == {path.stem for path in (pairs_dir / "right").glob("*.jpg")}


def test_missing_images_are_named_before_any_embedding(
    run, pairs_dir: Path, tmp_path: Path
) -> None:
    candidates = tmp_path / "c.csv"
    candidates.write_text("left,c0,c1\nnot_there,zzz1,zzz2\n")
    result = run(*_rank(pairs_dir, candidates, tmp_path / "s.csv"))
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: 1 image(s) not found in")
    assert "'not_there'" in result.output and not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("left,right\na,b\n", "needs the header left,c0,c1"),
        ("left,c0,c1\na,b\n", "line 2: 2 fields"),
    ],
)
def test_malformed_candidates_exit_2(
    run, pairs_dir: Path, tmp_path: Path, content: str, text: str
) -> None:
    candidates = tmp_path / "c.csv"
    candidates.write_text(content)
    result = run(*_rank(pairs_dir, candidates, tmp_path / "s.csv"))
    assert result.exit_code == 2 and text in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")


def test_make_candidates_errors(run, pairs_dir: Path, tmp_path: Path) -> None:
    result = run("make-candidates", pairs_dir / "pairs.csv", "--foils", 6, "--out", tmp_path / "c")
    assert result.exit_code == 2 and "6 foils need at least 7" in result.output
    result = run("make-candidates", tmp_path / "none.csv", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "error: no pairs file" in result.output
    result = run(
        "make-candidates",
        pairs_dir / "pairs.csv",
        "--split",
        "val",
        "--val-fraction",
        0.5,
        "--foils",
        2,
        "--out",
        tmp_path / "v.csv",
    )
    assert result.exit_code == 0, result.output
    assert "3 queries x 3 candidates" in result.output
    _, val = split_pairs(read_pairs(pairs_dir / "pairs.csv"), 0.5, seed=0)
    assert read_challenge(tmp_path / "v.csv").queries == tuple(left for left, _ in val)


def test_evaluate_writes_a_report_and_calibrates_the_bundle(
    run, pairs_dir: Path, tmp_path: Path, bundle: ModelBundle
) -> None:
    model = tmp_path / "model"
    fingerprint = save_bundle(bundle.net, model)
    out = tmp_path / "eval"
    result = run(
        "evaluate",
        pairs_dir / "pairs.csv",
        "--out",
        out,
        "--model",
        model,
        "--foils",
        3,
        "--calibrate-far",
        0.2,
        "--write-calibration",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    for text in (
        "candidate sets (6 x 4)",
        "with --assign",
        "retrieval over 6 images",
        "verification: AUC",
        "two of three",
        "report: ",
    ):
        assert text in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["split"] == "all" and metrics["model"]["fingerprint"] == fingerprint
    assert all((out / name).is_file() for name in metrics["figures"].values())
    reloaded = load_bundle(model)
    assert reloaded.fingerprint == fingerprint
    assert reloaded.calibration["threshold"] == pytest.approx(metrics["calibration"]["threshold"])
    assert reloaded.calibration["measured_on"]["pairs_file"] == str(pairs_dir / "pairs.csv")


def test_evaluate_rejects_a_bad_rate_before_embedding(run, pairs_dir: Path, tmp_path: Path) -> None:
    result = run("evaluate", pairs_dir / "pairs.csv", "--out", tmp_path / "e", "--calibrate-far", 2)
    assert result.exit_code == 2 and "false-match rate must be in (0, 1)" in result.output
