"""Real look-alike pairs laid out as the challenge does: ``left/``, ``right/``, ``pairs.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_pairs(demo_pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The 12 pairs whose images are in ``small_image_dir``."""
    return demo_pairs[:12]


@pytest.fixture(scope="session")
def pairs_csv(small_image_dir: Path, small_pairs: list[tuple[str, str]]) -> Path:
    path = small_image_dir / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["left", "right"])
        writer.writerows(small_pairs)
    return path
