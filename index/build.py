"""Embed a folder or CSV of images into an IndexStore: incremental, resumable, with progress.

Each batch is committed to the store's database as it is embedded, so an interrupted build
keeps what it did, and running the same build again embeds only images that are new or whose
bytes changed (compared by sha256). Images that cannot be decoded are skipped and reported,
never fatal: one bad file must not cost an hour of embedding.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..core.errors import InvalidInputError
from ..core.files import IMAGE_SUFFIXES
from ..models.embedder import Embedder
from ..models.model import Model
from ..models.preprocess import make_thumbnail
from .store import IndexStore, StoreError

__all__ = [
    "ImageSource",
    "BuildReport",
    "SourceError",
    "discover_images",
    "build_index",
    "open_store",
    "plan_build",
    "store_batch",
    "sources_from_rows",
    "finish_build",
]

log = logging.getLogger(__name__)



class SourceError(InvalidInputError):
    """A folder or CSV that does not describe a set of images."""


@dataclass(frozen=True)
class ImageSource:
    key: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """Why this part of the source could not be read when it was discovered (a folder that
    cannot be listed: key = its path with a trailing ``/``); the build reports it as failed."""


@dataclass
class BuildReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    """``key -> reason`` for images that could not be decoded."""
    total: int = 0

    def summary(self) -> str:
        parts = [f"{self.added} added", f"{self.updated} updated", f"{self.unchanged} unchanged"]
        if self.removed:
            parts.append(f"{self.removed} removed")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return f"{', '.join(parts)}; the index holds {self.total} images"


def discover_images(source: str | Path) -> list[ImageSource]:
    """List the images a folder (recursively) or a CSV names, with their keys.

    Folder: key = path relative to the folder, without extension (``left/aaa``).
    CSV (or Parquet): a ``path`` column (relative to the CSV's folder), an optional ``key`` column
    (default: the file name without extension); every other column becomes metadata.
    """
    source = Path(source)
    if source.is_dir():
        images = _scan_folder(source)
    elif source.is_file() and source.suffix.lower() == ".parquet":
        images = _read_parquet(source)
    elif source.is_file():
        images = _read_csv(source)
    else:
        raise SourceError(f"{source} is neither a folder nor a CSV file")
    if not any(image.error is None for image in images):
        raise SourceError(
            f"no images found in {source} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    seen: dict[str, Path] = {}
    for image in images:
        if image.key in seen:
            raise SourceError(
                f"two images have the key {image.key!r}: {str(seen[image.key])!r} and "
                f"{str(image.path)!r}"
            )
        seen[image.key] = image.path
    return images


def _scan_folder(source: Path) -> list[ImageSource]:
    """The images under ``source`` (symbolic links to folders are not followed), plus one
    failed entry per folder that cannot be listed: ``Path.rglob`` would skip those silently."""
    found: list[Path] = []
    unreadable: list[ImageSource] = []

    def failed(exc: OSError) -> None:
        folder = Path(exc.filename)
        if folder == source:
            raise SourceError(f"cannot read {source}: {exc.strerror or exc}") from exc
        key = folder.relative_to(source).as_posix() + "/"
        unreadable.append(ImageSource(key, folder, error=f"cannot read folder {folder}: "
                                                          f"{exc.strerror or exc}"))

    for folder, _, names in os.walk(source, onerror=failed):
        found.extend(Path(folder) / name for name in names
                     if Path(name).suffix.lower() in IMAGE_SUFFIXES)
    images = [ImageSource(path.relative_to(source).with_suffix("").as_posix(), path)
              for path in sorted(found) if path.is_file()]
    return images + sorted(unreadable, key=lambda image: image.key)


def _read_csv(path: Path) -> list[ImageSource]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise SourceError(
                    f"{path} needs a 'path' column (found: {reprlib.repr(reader.fieldnames or [])})"
                )
            rows = list(reader)
    except OSError as exc:  # e.g. no permission
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not a UTF-8 CSV file: {exc}") from exc
    except csv.Error as exc:
        raise SourceError(f"{path} is not a valid CSV file: {exc}") from exc
    return sources_from_rows(path, rows)


def _read_parquet(path: Path) -> list[ImageSource]:
    """A Parquet list of images, with the CSV's columns (the format of large path lists, as
    a Ray cluster's jobs write them); needs pyarrow (``lookalike[ray]`` brings it)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise SourceError(f"reading {path} needs pyarrow: pip install 'lookalike[ray]'") from exc
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"{path} is not a readable Parquet file: {exc}") from exc
    if "path" not in table.column_names:
        raise SourceError(f"{path} needs a 'path' column (found: "
                          f"{reprlib.repr(table.column_names)})")
    return sources_from_rows(path, table.to_pylist())


def sources_from_rows(path: Path, rows: list[dict[str, Any]]) -> list[ImageSource]:
    """The images a table of rows names (a CSV's, or a Parquet list's): a ``path`` relative
    to the table's folder, an optional ``key``, every other column metadata."""
    images = []
    for line, row in enumerate(rows, start=2):
        if None in row or not row.get("path"):
            raise SourceError(f"{path} line {line}: wrong number of fields or an empty path")
        try:
            image_path = (path.parent / row.pop("path")).resolve()
        except ValueError as exc:  # a NUL byte: no file can have that name
            raise SourceError(f"{path} line {line}: the path is not a file name: {exc}") from exc
        key = row.pop("key", None) or image_path.stem
        images.append(ImageSource(key, image_path, row))
    return images


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def open_store(
    store_path: Path, model: Model, factory: str = "auto", pca_dim: int | None = None,
    background: bool = True,
) -> IndexStore:
    """Open the store at ``store_path`` (refusing another model's store) or create it;
    ``background=False`` leaves all index work to ``save`` (or to an adopted index)."""
    if (store_path / "manifest.json").exists():
        return IndexStore.open(store_path, model_fingerprint=model.fingerprint,
                               background=background)
    return IndexStore.create(
        store_path,
        dim=model.facts.embedding_dim,
        model_fingerprint=model.fingerprint,
        model_name=model.name,
        factory=factory,
        pca_dim=pca_dim,
        background=background,
    )


def plan_build(
    images: Sequence[ImageSource], store: IndexStore, report: BuildReport, prune: bool = False
) -> list[tuple[ImageSource, str | None]]:
    """The images to embed (new, or bytes changed since they were stored), each with its
    sha256; counts the unchanged and the unreadable in ``report`` and, with ``prune``,
    removes the items whose image is gone. Both builds (in process and on Ray) plan alike,
    so they skip and store the same images."""
    known = store.digests()
    todo: list[tuple[ImageSource, str | None]] = []
    for image in images:
        if image.error is not None:
            report.failed[image.key] = image.error
            log.warning("skipped %s: %s", image.path, image.error)
            continue
        digest = _sha256(image.path)
        if digest is not None and known.get(image.key) == digest:
            report.unchanged += 1
        else:
            todo.append((image, digest))
    if prune:
        wanted = {image.key for image in images}
        # Items under a folder that could not be listed are not known to be gone.
        wanted_prefixes = tuple(image.key for image in images if image.error is not None)
        stale = [key for key in known
                 if key not in wanted and not key.startswith(wanted_prefixes)]
        report.removed = store.remove(stale)
    log.info("%d images to embed, %d unchanged", len(todo), report.unchanged)
    return todo


def store_batch(
    store: IndexStore,
    chosen: Sequence[tuple[ImageSource, str | None]],
    vectors: np.ndarray,
    thumbnails: Sequence[bytes | None] | None,
    report: BuildReport,
) -> None:
    """Commit one embedded batch (replacing older versions of its keys) and count it."""
    if not chosen:
        return
    keys = [image.key for image, _ in chosen]
    updated = sum(key in store for key in keys)
    store.add(
        keys,
        vectors,
        paths=[str(image.path) for image, _ in chosen],
        sha256=[digest for _, digest in chosen],
        metadata=[image.metadata for image, _ in chosen],
        thumbnails=thumbnails,
        replace=True,
    )
    report.updated += updated
    report.added += len(chosen) - updated


def finish_build(store: IndexStore, report: BuildReport, images: Sequence[ImageSource]) -> None:
    """Save the store, count it, and fail when not one image could be read."""
    store.save()
    report.total = len(store)
    if report.failed and not report.added and not report.updated and not report.unchanged:
        raise StoreError(
            f"none of the {len(images)} images could be read; e.g. "
            f"{next(iter(report.failed.values()))}"
        )


def build_index(
    source: str | Path | Sequence[ImageSource],
    store_path: str | Path,
    embedder: Embedder,
    *,
    batch_size: int = 16,
    factory: str = "auto",
    pca_dim: int | None = None,
    thumbnails: bool = True,
    prune: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Create or update the store at ``store_path`` from the images of ``source`` (a folder,
    a CSV, or what :func:`discover_images` found in one)."""
    images = discover_images(source) if isinstance(source, str | Path) else list(source)
    store = open_store(Path(store_path), embedder.bundle, factory, pca_dim)
    report = BuildReport()
    try:
        todo = plan_build(images, store, report, prune)
        bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress or not todo)
        paths = [image.path for image, _ in todo]
        for batch in embedder.embed_files(
            paths, batch_size, extra=make_thumbnail if thumbnails else None
        ):
            for index, reason in batch.errors.items():
                report.failed[todo[index][0].key] = reason
                log.warning("skipped %s: %s", todo[index][0].path, reason)
            store_batch(store, [todo[i] for i in batch.indices], batch.vectors,
                        batch.extras if thumbnails else None, report)
            bar.update(len(batch.indices) + len(batch.errors))
        bar.close()
        finish_build(store, report, images)
    finally:
        store.close()
    return report
