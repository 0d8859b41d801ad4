"""The store's SQLite item table: schema, connections, and the migration from format 1.

SQLite is the source of truth for which items exist: their int64 ids (the row of each
vector in the vector file), keys, paths, hashes, metadata, thumbnails and the tombstones of
removed ids that a saved FAISS index may still hold. Format 1 also kept every vector as a
BLOB in this table and was loaded by scanning them; format 2 keeps them in the vector file.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np

from .vectors import VectorFile

__all__ = ["SCHEMA", "connect", "has_vector_column", "migrate_vectors_out"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    path TEXT,
    sha256 TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    thumbnail BLOB,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_MIGRATE_BATCH = 10_000


def connect(path: Path, *, schema: bool = True) -> sqlite3.Connection:
    """A connection in WAL mode (readers never block the writer) with full fsync commits;
    with ``schema``, the format-2 tables are created unless this is a format-1 database."""
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    if schema and not has_vector_column(connection):
        connection.executescript(SCHEMA)
    connection.isolation_level = "DEFERRED"
    return connection


def has_vector_column(connection: sqlite3.Connection) -> bool:
    """Whether this is a format-1 table that still holds the vectors as BLOBs."""
    columns = [row[1] for row in connection.execute("PRAGMA table_info(items)")]
    return "vector" in columns


def migrate_vectors_out(connection: sqlite3.Connection, vectors: VectorFile) -> int:
    """Move format-1 BLOB vectors into ``vectors`` and renumber ids ``0..n-1`` in one commit.

    The vector file is written (and fsynced) first; the table swap is one transaction, so a
    crash leaves either the untouched format-1 table (the migration runs again) or the
    finished one. Returns the number of items.
    """
    count = 0
    cursor = connection.execute("SELECT vector FROM items ORDER BY id")
    while batch := cursor.fetchmany(_MIGRATE_BATCH):
        rows = np.stack([np.frombuffer(blob, np.float32) for (blob,) in batch])
        vectors.write(count, rows)
        count += len(rows)
    with connection:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("DROP TABLE IF EXISTS items_v2")
        connection.execute(
            "CREATE TABLE items_v2 (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, path TEXT,"
            " sha256 TEXT, metadata TEXT NOT NULL DEFAULT '{}', thumbnail BLOB,"
            " added REAL NOT NULL)"
        )
        connection.execute(
            "INSERT INTO items_v2 SELECT row_number() OVER (ORDER BY id) - 1, key, path, sha256,"
            " metadata, thumbnail, added FROM items"
        )
        connection.execute("DROP TABLE items")
        connection.execute("ALTER TABLE items_v2 RENAME TO items")
        connection.execute("CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY)")
        connection.execute("INSERT OR REPLACE INTO meta VALUES ('next_id', ?)", (str(count),))
        connection.execute("INSERT OR REPLACE INTO meta VALUES ('format_version', '2')")
    connection.execute("VACUUM")
    return count
