"""Look-alike pairs and challenge candidate sets: the one definition every part shares.

A *pair* is ``(left, right)``: two image keys that people say look alike. A *candidate set*
is one query (a left image) with ``1 + foils`` right images, shuffled: its true match plus
foils drawn from the other pairs' right images, as in the "Totally Looks Like" challenge.
The validation split and the candidate sets are fixed by seeds, so the trainer, the
benchmarks and ``lookalike evaluate`` all score the same sets.
"""

from __future__ import annotations

import csv
import random
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .errors import InvalidInputError

__all__ = [
    "Pair",
    "CandidateSet",
    "PairsError",
    "read_pairs",
    "split_pairs",
    "fold_pairs",
    "Split",
    "select_split",
    "make_candidate_sets",
]

Pair = tuple[str, str]


class PairsError(InvalidInputError):
    """A pairs CSV that cannot be read, or too few pairs for what was asked."""


@dataclass(frozen=True)
class CandidateSet:
    query: str
    candidates: tuple[str, ...]
    answer: int
    """Position of the true match in ``candidates``."""


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a ``left,right`` CSV (extra columns are ignored)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            if not {"left", "right"} <= set(fields):
                raise PairsError(
                    f"{path} needs 'left' and 'right' columns (found: {reprlib.repr(fields)})"
                )
            pairs = []
            for line, row in enumerate(reader, start=2):
                left, right = (row.get("left") or "").strip(), (row.get("right") or "").strip()
                if not left or not right:
                    raise PairsError(f"{path} line {line}: empty 'left' or 'right'")
                pairs.append((left, right))
    except FileNotFoundError as exc:
        raise PairsError(f"no pairs file at {path}") from exc
    except OSError as exc:  # a folder, no permission
        raise PairsError(f"cannot read the pairs file {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PairsError(f"{path} is not a readable UTF-8 CSV: {exc}") from exc
    if not pairs:
        raise PairsError(f"{path} has no pairs")
    return pairs


def split_pairs(
    pairs: Sequence[Pair], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """Split into (train, validation) by a seeded shuffle; the same seed gives the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise PairsError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    return order[n_val:], order[:n_val]


def fold_pairs(
    pairs: Sequence[Pair], folds: int, fold: int, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) of fold ``fold`` of ``folds``: one seeded shuffle cut into ``folds``
    near-equal parts, so over the folds every pair is validated on exactly once."""
    if not 2 <= folds <= len(pairs):
        raise PairsError(f"cross-validation needs 2 to {len(pairs)} folds, got {folds}")
    if not 0 <= fold < folds:
        raise PairsError(f"fold must be in [0, {folds}), got {fold}")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    start, stop = (fold * len(order)) // folds, ((fold + 1) * len(order)) // folds
    return order[:start] + order[stop:], order[start:stop]


class Split(StrEnum):
    """Which pairs to use: all of them, or one side of :func:`split_pairs`."""

    all = "all"
    train = "train"
    val = "val"


def select_split(
    pairs: Sequence[Pair], split: Split = Split.all, val_fraction: float = 0.2, seed: int = 0
) -> list[Pair]:
    """The pairs of ``split``; ``val`` is the held-out side that training never sees."""
    if Split(split) is Split.all:
        return list(pairs)
    train, val = split_pairs(pairs, val_fraction, seed)
    return train if Split(split) is Split.train else val


def make_candidate_sets(
    pairs: Sequence[Pair], foils: int = 19, seed: int = 0
) -> list[CandidateSet]:
    """One candidate set per pair: its right image plus ``foils`` other right images."""
    rights = sorted({right for _, right in pairs})
    if len(rights) < foils + 1:
        raise PairsError(
            f"{foils} foils need at least {foils + 1} distinct right images, got {len(rights)}"
        )
    rng = random.Random(seed)
    sets = []
    for left, right in pairs:
        pool = [r for r in rights if r != right]
        chosen = rng.sample(pool, foils) + [right]
        rng.shuffle(chosen)
        sets.append(CandidateSet(left, tuple(chosen), chosen.index(right)))
    return sets
