"""Durable file primitives: atomic writes that are fsynced, and content hashes.

Every snapshot, bundle, report and cache file in lookalike is written through
:func:`atomic_write`, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "IMAGE_SUFFIX_ORDER",
    "atomic_write",
    "bytes_sha256",
    "file_sha256",
    "files_sha256",
    "fsync_dir",
    "images_identity",
]

#: Image file name suffixes (lower case) in the order a key without one is looked up.
IMAGE_SUFFIX_ORDER = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
#: File name suffixes treated as images when a folder is scanned (lower case).
IMAGE_SUFFIXES = frozenset(IMAGE_SUFFIX_ORDER)


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    ``data`` is the bytes or text to write, or a callable ``write(tmp_path)`` that writes the
    file itself (``np.save``, ``faiss.write_index``, ``save_file``). The temporary file lives in
    the same directory (so the rename is atomic), is fsynced before the rename, and the
    directory is fsynced after it, so the new name survives a power cut too.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (never the whole file in memory)."""
    return files_sha256(path, chunk_size=chunk_size)


def images_identity(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(path, sha256 of its bytes)`` per image, for a cache key: by content, not by size and
    modification time, so a data set copied or unpacked again (new mtimes, same bytes) keeps
    its caches, and an image edited in place (same size and mtime) does not."""
    return [(str(path), file_sha256(path)) for path in paths]


def files_sha256(*paths: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of several files' bytes one after the other (a model bundle's fingerprint)."""
    sha = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda handle=handle: handle.read(chunk_size), b""):
                sha.update(chunk)
    return sha.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of bytes already in memory (an upload)."""
    return hashlib.sha256(data).hexdigest()
