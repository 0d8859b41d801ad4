"""Score-level ensembles of CV rows: the mean of the rows' cosines, never of their vectors,
and rows scored on other candidate sets are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.core.scoring import set_cosines
from lookalike.evaluation.fold_ensemble import ensemble


def _row(root: Path, name: str, vectors: list[np.ndarray], candidates: np.ndarray) -> Path:
    folder = root / name / "model.work" / "cv"
    folder.mkdir(parents=True)
    for number, v in enumerate(vectors, start=1):
        np.savez(folder / f"fold-{number}.npz", vectors=v, queries=np.array([0, 1]),
                 candidates=candidates, answers=np.array([0, 0]))
    return root / name


def test_the_ensemble_averages_cosines(tmp_path: Path) -> None:
    """Two rows whose spaces are rotations of each other: averaging their vectors would mix
    unrelated coordinates; averaging their cosines gives each row's ranking back."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 4))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    candidates = np.array([[2, 3, 4], [5, 6, 7]])
    first = _row(tmp_path, "a", [base, base], candidates)
    second = _row(tmp_path, "b", [base @ rotation, base @ rotation], candidates)
    found = ensemble([first, second], folds=2)
    assert found["ensemble"] == found[str(first)] == found[str(second)]
    np.testing.assert_allclose(set_cosines(base @ rotation, np.array([0]), candidates[:1]),
                               set_cosines(base, np.array([0]), candidates[:1]), atol=1e-12)


def test_rows_on_other_candidate_sets_are_refused(tmp_path: Path) -> None:
    vectors = [np.eye(8)[:, :4]]
    first = _row(tmp_path, "a", vectors, np.array([[2, 3], [4, 5]]))
    second = _row(tmp_path, "b", vectors, np.array([[3, 2], [4, 5]]))
    with pytest.raises(SystemExit, match="other candidate sets"):
        ensemble([first, second], folds=1)
