"""The challenge file formats: candidate sets in, scores out.

Candidates (``left,c0,...,c19``): one row per query, its key then its candidates' keys.
Submission: the same header and the same cells, each candidate key replaced by its score, so
a submission lines up with its candidates file row by row and column by column.
"""

from __future__ import annotations

import csv
import io
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.files import atomic_write
from ..core.pairs import CandidateSet, Pair
from .errors import EvaluationError, describe

__all__ = [
    "Challenge",
    "ChallengeFormatError",
    "read_challenge",
    "write_challenge",
    "write_scores",
    "answers_from_pairs",
]

QUERY_COLUMN = "left"


class ChallengeFormatError(EvaluationError):
    """A candidates file that is not in the ``left,c0,...,cN`` format."""


@dataclass(frozen=True)
class Challenge:
    """A parsed candidates file: the header to write back and each row's keys."""

    header: tuple[str, ...]
    queries: tuple[str, ...]
    candidates: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.queries)


def _expected_header(width: int) -> list[str]:
    return [QUERY_COLUMN] + [f"c{i}" for i in range(width)]


def read_challenge(path: str | Path) -> Challenge:
    """Parse and check a candidates CSV; every problem names the line it is on."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError as exc:
        raise ChallengeFormatError(f"no candidates file at {path}") from exc
    except OSError as exc:  # a folder, no permission
        raise ChallengeFormatError(
            f"cannot read the candidates file {path}: {exc.strerror or exc}"
        ) from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ChallengeFormatError(f"{path} is not a readable UTF-8 CSV: {exc}") from exc
    if not rows:
        raise ChallengeFormatError(f"{path} is empty")
    header = [cell.strip() for cell in rows[0]]
    if len(header) < 2 or header != _expected_header(len(header) - 1):
        raise ChallengeFormatError(
            f"{path} needs the header {','.join(_expected_header(2))},...; found "
            f"{reprlib.repr(header)}"
        )
    queries, candidates = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if len(cells) != len(header):
            raise ChallengeFormatError(
                f"{path} line {line}: {len(cells)} fields, the header has {len(header)}"
            )
        if not all(cells):
            raise ChallengeFormatError(f"{path} line {line}: an empty key")
        repeated = sorted({key for key in cells[1:] if cells[1:].count(key) > 1})
        if repeated:
            raise ChallengeFormatError(
                f"{path} line {line}: candidate(s) {describe(repeated)} listed more than once"
            )
        queries.append(cells[0])
        candidates.append(tuple(cells[1:]))
    if not queries:
        raise ChallengeFormatError(f"{path} has a header but no rows")
    return Challenge(tuple(header), tuple(queries), tuple(candidates))


def _write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Write a CSV atomically, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, text.getvalue().encode("utf-8"))


def write_challenge(path: str | Path, sets: Sequence[CandidateSet]) -> None:
    """Write candidate sets in the challenge format (answers are not written)."""
    widths = {len(s.candidates) for s in sets}
    if len(widths) != 1:
        raise EvaluationError(f"candidate sets must all have the same size, got {sorted(widths)}")
    _write_rows(
        Path(path),
        _expected_header(widths.pop()),
        [(s.query, *s.candidates) for s in sets],
    )


def write_scores(
    path: str | Path, challenge: Challenge, scores: Sequence[np.ndarray], decimals: int = 6
) -> None:
    """Write the submission: ``challenge``'s header, each key replaced by its score."""
    if len(scores) != len(challenge):
        raise EvaluationError(f"{len(scores)} score rows for {len(challenge)} queries")
    rows = []
    for query, row_scores, candidates in zip(
        challenge.queries, scores, challenge.candidates, strict=True
    ):
        if len(row_scores) != len(candidates):
            raise EvaluationError(
                f"query {query!r}: {len(row_scores)} scores for {len(candidates)} candidates"
            )
        rows.append((query, *(f"{score:.{decimals}f}" for score in row_scores)))
    _write_rows(Path(path), challenge.header, rows)


def answers_from_pairs(challenge: Challenge, pairs: Sequence[Pair]) -> list[int]:
    """Position of each query's true match (from ``pairs``) among its candidates."""
    truth = dict(pairs)
    unknown = [query for query in challenge.queries if query not in truth]
    if unknown:
        raise EvaluationError(
            f"{len(unknown)} query(ies) have no pair in the answers: {describe(unknown)}"
        )
    absent = [
        query
        for query, candidates in zip(challenge.queries, challenge.candidates, strict=True)
        if truth[query] not in candidates
    ]
    if absent:
        raise EvaluationError(
            f"{len(absent)} query(ies) do not list their true match among their candidates: "
            f"{describe(absent)}"
        )
    return [
        candidates.index(truth[query])
        for query, candidates in zip(challenge.queries, challenge.candidates, strict=True)
    ]
