"""Embedder: images (bytes, files or PIL) -> unit vectors, through a chosen inference engine
(see :mod:`.engines`). Decoding overlaps the forward pass:
while the engine runs batch *n*, a thread pool decodes batch *n+1* (Pillow and numpy release
the GIL) straight into the rows of the next batch array, so no batch is copied by stacking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .engines import EngineOptions, create_engine
from .model import Model
from .preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocessor

__all__ = ["Embedder", "FileBatch"]

log = logging.getLogger(__name__)


@dataclass
class FileBatch:
    """One batch from :meth:`Embedder.embed_files`: which inputs succeeded, why others failed."""

    indices: list[int]
    vectors: np.ndarray
    errors: dict[int, str]
    extras: list[Any]
    """``extra(image)`` for each successful input, when ``embed_files`` was given ``extra``."""


class Embedder:
    """A :class:`~.model.Model` bound to an engine and a preprocessor. Imports no torch
    itself: a serving container runs without it.

    ``threads`` is the forward pass's thread count and ``cache_dir`` where engines cache
    converted models (see :class:`~.engines.EngineOptions`). The default engine is the eager
    reference; the service and the CLI default to the fastest accurate one. ``run`` replaces
    the engine's forward pass (``(B, 3, S, S)`` -> ``(B, D)``) when it runs elsewhere, e.g. in
    a Ray Serve deployment; ``engine`` then only names it.
    """

    def __init__(
        self,
        bundle: Model,
        engine: str = "torch",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decode_workers: int = 2,
        *,
        threads: int = 2,
        cache_dir: str | Path | None = None,
        run: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        config = bundle.facts
        self.bundle = bundle
        self.engine_name = engine
        self.preprocessor = Preprocessor(config.input_size, config.mean, config.std, max_pixels)
        self.decode_workers = decode_workers
        if run is None:
            options = EngineOptions(threads, Path(cache_dir) if cache_dir is not None else None)
            run = create_engine(engine, bundle, options)
        self._run = run

    @property
    def dim(self) -> int:
        return self.bundle.facts.embedding_dim

    @property
    def fingerprint(self) -> str:
        return self.bundle.fingerprint

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` preprocessed float32 -> ``(B, D)`` unit vectors."""
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(self._run(batch), dtype=np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_arrays(self.preprocessor.batch(images))

    def embed_bytes(self, data: bytes) -> np.ndarray:
        """Decode (raising :class:`ImageDecodeError` on bad input), embed one image -> ``(D,)``."""
        return self.embed_arrays(self.preprocessor(self.preprocessor.decode(data))[None])[0]

    def load_file(
        self,
        path: Path,
        extra: Callable[[Image.Image], Any] | None = None,
        out: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Any]:
        """Read, decode and preprocess one file -> ``((3, S, S), extra(image) or None)``;
        the array is written into ``out`` when given."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {path}: {exc.strerror or exc}") from exc
        image = self.preprocessor.decode(data)
        return self.preprocessor(image, out=out), extra(image) if extra else None

    def embed_files(
        self,
        paths: Sequence[Path],
        batch_size: int = 32,
        extra: Callable[[Image.Image], Any] | None = None,
    ) -> Iterator[FileBatch]:
        """Embed files in batches, decoding the next batch while the current one runs.

        Unreadable files do not stop the run: their errors come back in each batch.
        ``extra`` is called on each decoded image (e.g. to make a thumbnail) in the pool.
        """
        size = self.preprocessor.size
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool:

            def submit(start: int) -> _Pending:
                chunk = paths[start : start + batch_size]
                batch = np.empty((len(chunk), 3, size, size), np.float32)
                futures = [pool.submit(self.load_file, path, extra, row)
                           for path, row in zip(chunk, batch, strict=True)]
                return batch, futures

            pending = submit(0)
            for start in range(0, len(paths), batch_size):
                current, following = pending, start + batch_size
                if following < len(paths):
                    pending = submit(following)
                yield self._collect(*current, start)

    def _collect(
        self, batch: np.ndarray, futures: Iterable[Future[tuple[np.ndarray, Any]]], start: int
    ) -> FileBatch:
        rows, indices, extras, errors = [], [], [], {}
        for offset, future in enumerate(futures):
            try:
                _, extra = future.result()
            except ImageDecodeError as exc:
                errors[start + offset] = str(exc)
                continue
            rows.append(offset)
            extras.append(extra)
            indices.append(start + offset)
        if not rows:
            vectors = np.zeros((0, self.dim), np.float32)
        else:
            vectors = self.embed_arrays(batch if len(rows) == len(batch) else batch[rows])
        return FileBatch(indices=indices, vectors=vectors, errors=errors, extras=extras)


_Pending = tuple[np.ndarray, list[Future[tuple[np.ndarray, Any]]]]
