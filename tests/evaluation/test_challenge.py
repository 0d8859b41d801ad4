"""The challenge CSV formats: candidates in, scores out, and every way a file can be wrong."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lookalike.core.pairs import make_candidate_sets
from lookalike.evaluation.challenge import (
    ChallengeFormatError,
    answers_from_pairs,
    read_challenge,
    write_challenge,
    write_scores,
)
from lookalike.evaluation.errors import EvaluationError


def test_candidates_round_trip(tmp_path: Path, demo_pairs: list[tuple[str, str]]) -> None:
    sets = make_candidate_sets(demo_pairs, foils=19, seed=3)
    path = tmp_path / "candidates.csv"
    write_challenge(path, sets)
    challenge = read_challenge(path)
    assert challenge.header == ("left", *(f"c{i}" for i in range(20)))
    assert list(challenge.queries) == [s.query for s in sets]
    assert list(challenge.candidates) == [s.candidates for s in sets]
    assert answers_from_pairs(challenge, demo_pairs) == [s.answer for s in sets]


def test_scores_keep_header_rows_and_columns(tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_text("left,c0,c1,c2\nq1,a,b,c\nq2,c,a,b\n")
    challenge = read_challenge(source)
    scores = [np.array([0.5, -0.25, 0.125]), np.array([1.0, 0.0, -1.0])]
    out = tmp_path / "out" / "s.csv"
    write_scores(out, challenge, scores)
    with open(out, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["left", "c0", "c1", "c2"]
    assert [row[0] for row in rows[1:]] == ["q1", "q2"]
    read_back = [np.array([float(x) for x in row[1:]]) for row in rows[1:]]
    for expected, found in zip(scores, read_back, strict=True):
        np.testing.assert_allclose(found, expected, atol=1e-6)


def test_scores_must_fit_the_candidates(tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_text("left,c0,c1\nq1,a,b\n")
    challenge = read_challenge(source)
    with pytest.raises(EvaluationError, match="1 scores for 2 candidates"):
        write_scores(tmp_path / "s.csv", challenge, [np.array([0.1])])
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("left,right\nq,a\n", "needs the header left,c0,c1"),
        ("left,c1,c2\nq,a,b\n", "needs the header"),
        ("left,c0,c1\n", "no rows"),
        ("left,c0,c1\nq,a\n", "line 2: 2 fields, the header has 3"),
        ("left,c0,c1\nq,a,b\nr,a,,\n", "line 3: 4 fields"),
        ("left,c0,c1\nq,a, \n", "line 2: an empty key"),
        ("left,c0,c1,c2\nq,a,b,a\n", "line 2: candidate\\(s\\) 'a' listed more than once"),
    ],
)
def test_malformed_candidates_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ChallengeFormatError, match=message):
        read_challenge(path)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ChallengeFormatError, match="no candidates file"):
        read_challenge(tmp_path / "nope.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ChallengeFormatError, match="not a readable UTF-8 CSV"):
        read_challenge(binary)


def test_answers_need_every_query_and_its_match(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("left,c0,c1\nq1,a,b\nq2,a,b\n")
    challenge = read_challenge(path)
    assert answers_from_pairs(challenge, [("q1", "b"), ("q2", "a")]) == [1, 0]
    with pytest.raises(EvaluationError, match="no pair in the answers: 'q2'"):
        answers_from_pairs(challenge, [("q1", "b")])
    with pytest.raises(EvaluationError, match="do not list their true match.*'q2'"):
        answers_from_pairs(challenge, [("q1", "b"), ("q2", "z")])
