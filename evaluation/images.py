"""Images named by key in a folder, each embedded once.

Challenge files name images by key: the file name without its extension. A run over 1,500
queries x 20 candidates names each right image about 20 times, so every unique file is decoded
and embedded exactly once, with a progress bar, before any scoring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.files import IMAGE_SUFFIXES
from ..models.embedder import Embedder
from .errors import EvaluationError, describe

__all__ = ["ImageFolder", "MissingImagesError", "UnreadableImagesError", "embed_unique"]


class MissingImagesError(EvaluationError):
    """Keys with no image file in the folder that should hold them."""


class UnreadableImagesError(EvaluationError):
    """Image files that exist but cannot be read or decoded."""


class ImageFolder:
    """``key -> file`` for the images directly inside one folder (key = name without extension)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise EvaluationError(f"image folder {self.root} does not exist or is not a folder")
        self._files: dict[str, list[Path]] = {}
        for path in sorted(self.root.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                self._files.setdefault(path.stem, []).append(path)

    def paths(self, keys: Iterable[str]) -> dict[str, Path]:
        """The file of each key; raises naming every key that has none (or more than one)."""
        keys = list(dict.fromkeys(keys))
        missing = [key for key in keys if key not in self._files]
        if missing:
            raise MissingImagesError(
                f"{len(missing)} image(s) not found in {self.root}: {describe(missing)} "
                f"(looked for KEY{{{','.join(sorted(IMAGE_SUFFIXES))}}})"
            )
        ambiguous = [key for key in keys if len(self._files[key]) > 1]
        if ambiguous:
            raise EvaluationError(
                f"{len(ambiguous)} key(s) in {self.root} match more than one file, e.g. "
                f"{', '.join(p.name for p in self._files[ambiguous[0]])}: keep one file per key"
            )
        return {key: self._files[key][0] for key in keys}


def embed_unique(
    embedder: Embedder,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[Path, np.ndarray]:
    """Embed each distinct file in ``paths`` once -> ``{path: (D,) unit vector}``.

    Every file must decode: a score for a query whose image was skipped would be a silent
    hole in a submission, so failures are collected and raised together, naming the files.
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    vectors: dict[Path, np.ndarray] = {}
    failed: dict[Path, str] = {}
    with tqdm(total=len(unique), desc="embedding", unit="img", disable=not progress) as bar:
        for batch in embedder.embed_files(unique, batch_size):
            vectors.update(zip((unique[i] for i in batch.indices), batch.vectors, strict=True))
            failed.update((unique[i], reason) for i, reason in batch.errors.items())
            bar.update(len(batch.indices) + len(batch.errors))
    if failed:
        first, reason = next(iter(failed.items()))
        raise UnreadableImagesError(
            f"{len(failed)} image(s) could not be read: {describe([str(p) for p in failed])} "
            f"(e.g. {first.name}: {reason})"
        )
    return vectors
