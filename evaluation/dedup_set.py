"""A seeded evaluation set for near-duplicate detection, generated from look-alike pairs.

Why generated rather than committed: the figures must predict images this repository never
held, so the set is rebuilt from any "Totally Looks Like" folder (the 100 demo pairs or the
1,500 shared ones) and the edits are drawn from a seed. Each *original* (a pair's left image)
gets ``copies`` edited copies (resized, cropped, re-compressed, flipped, colour-shifted,
slightly rotated); its TLL partner sits beside it as a look-alike that is NOT a duplicate, and
left images of unused pairs are unrelated distractors. Every original, with its copies and its
partner, is one *group*: cross-validation splits groups, never pairs, so no original is on both
sides of a split.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from ..core.files import atomic_write
from ..core.pairs import read_pairs
from ..models.preprocess import decode_image
from .errors import EvaluationError

__all__ = ["EDITS", "DedupSet", "make_dedup_set", "read_dedup_set"]

TRUTH_FILE = "truth.csv"


def _resize(image: Image.Image, rng: random.Random) -> Image.Image:
    scale = rng.uniform(0.35, 0.75)
    size = (max(16, round(image.width * scale)), max(16, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _crop(image: Image.Image, rng: random.Random) -> Image.Image:
    keep = rng.uniform(0.8, 0.92)  # of each side: 64-85 % of the area
    width, height = round(image.width * keep), round(image.height * keep)
    left = rng.randint(0, image.width - width)
    top = rng.randint(0, image.height - height)
    return image.crop((left, top, left + width, top + height))


def _recompress(image: Image.Image, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(12, 30))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _flip(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(image)


def _colour(image: Image.Image, rng: random.Random) -> Image.Image:
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.4, 1.6))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))


def _rotate(image: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.choice((-1, 1)) * rng.uniform(2.0, 8.0)
    rotated = image.rotate(angle, Image.Resampling.BICUBIC, expand=False)
    margin = 0.08  # cut the corners the rotation left empty
    width, height = rotated.size
    return rotated.crop((round(width * margin), round(height * margin),
                         round(width * (1 - margin)), round(height * (1 - margin))))


EDITS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "resize": _resize, "crop": _crop, "jpeg": _recompress, "flip": _flip,
    "colour": _colour, "rotate": _rotate,
}
"""The planted edits; a copy gets one of them, sometimes two (a flip of a colour shift)."""


@dataclass(frozen=True)
class DedupSet:
    """A generated set: ``folder`` of images (keys = relative paths without suffix), the true
    duplicate pairs (key pairs, sorted) and each key's group (its original's name; distractors
    are groups of their own)."""

    folder: Path
    duplicates: frozenset[tuple[str, str]]
    groups: dict[str, str]


def make_dedup_set(
    pairs_file: Path, out: Path, originals: int, *, copies: int = 2, others: int | None = None,
    seed: int = 0,
) -> DedupSet:
    """Write the set into ``out``: ``orig/``, ``copy/``, ``partner/``, ``other/`` and
    ``truth.csv`` (key, group, duplicate_of). ``pairs_file`` is a TLL pairs CSV with ``left/``
    and ``right/`` folders beside it."""
    pairs = read_pairs(pairs_file)
    others = originals if others is None else others
    if originals + others > len(pairs):
        raise EvaluationError(
            f"{pairs_file} has {len(pairs)} pairs; {originals} originals and {others} others "
            "need one pair each")
    rng = random.Random(seed)
    chosen = rng.sample(list(pairs), originals + others)
    root = Path(pairs_file).parent
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    edits = sorted(EDITS)
    for left, right in chosen[:originals]:
        image = _load(root / "left", left)
        rows.append(_save(image, out, f"orig/{left}", left, ""))
        for number, edit in enumerate(rng.sample(edits, copies), start=1):
            copy = EDITS[edit](image, rng)
            if rng.random() < 0.25:  # a second edit on some copies
                second = rng.choice([e for e in edits if e != edit])
                copy, edit = EDITS[second](copy, rng), f"{edit}+{second}"
            rows.append(_save(copy, out, f"copy/{left}-{number}-{edit}", left, f"orig/{left}"))
        rows.append(_save(_load(root / "right", right), out, f"partner/{right}", left, ""))
    for left, _ in chosen[originals:]:
        rows.append(_save(_load(root / "left", left), out, f"other/{left}", f"other-{left}", ""))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["key", "group", "duplicate_of"])
    writer.writerows(rows)
    atomic_write(out / TRUTH_FILE, text.getvalue())
    return read_dedup_set(out)


def read_dedup_set(folder: Path) -> DedupSet:
    """Read a set written by :func:`make_dedup_set`: every original and its copies are
    mutual duplicates; nothing else is."""
    with open(Path(folder) / TRUTH_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups = {row["key"]: row["group"] for row in rows}
    families: dict[str, list[str]] = {}
    for row in rows:
        if row["duplicate_of"]:
            families.setdefault(row["duplicate_of"], [row["duplicate_of"]]).append(row["key"])
    duplicates = frozenset(
        _pair(a, b) for members in families.values() for i, a in enumerate(members)
        for b in members[i + 1:]
    )
    return DedupSet(Path(folder), duplicates, groups)


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def _load(folder: Path, name: str) -> Image.Image:
    matches: Sequence[Path] = sorted(folder.glob(f"{name}.*"))
    if not matches:
        raise EvaluationError(f"no image named {name} in {folder}")
    return decode_image(matches[0].read_bytes()).convert("RGB")


def _save(image: Image.Image, out: Path, key: str, group: str, duplicate_of: str
          ) -> tuple[str, str, str]:
    target = out / f"{key}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    atomic_write(target, buffer.getvalue())
    return key, group, duplicate_of
