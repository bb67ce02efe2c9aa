"""What the index stores: the schema (and its migrations) and the rows as plain data."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .database import Store

SCHEMA_VERSION = 2
"""History: 1, the first layout; 2, a path (or label) that is not valid UTF-8 is stored as a
BLOB of its raw bytes (version 1 could not store it; a version-1 reader would trip over it)."""
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, hash TEXT NOT NULL, duration REAL NOT NULL,
    sample_rate INTEGER NOT NULL, added_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS files_hash ON files(hash);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, file_id INTEGER NOT NULL REFERENCES files(id),
    start REAL NOT NULL, "end" REAL NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS segments_file ON segments(file_id);
CREATE TABLE IF NOT EXISTS labels (
    file_id INTEGER PRIMARY KEY REFERENCES files(id), label TEXT NOT NULL, source TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS labels_label ON labels(label);
CREATE TABLE IF NOT EXISTS failures (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, reason TEXT NOT NULL, at TEXT NOT NULL);
"""


def _migrate_to_1(store: Store) -> None:
    for statement in filter(str.strip, _SCHEMA_V1.split(";")):
        store.db.execute(statement)
    if store.get_meta("generation") is None:
        store._set_meta("generation", "0")


def _migrate_to_2(store: Store) -> None:
    """No table changes: version 2 only widens what ``path`` and ``label`` may hold (BLOBs for
    names that are not UTF-8), which every version-1 row already satisfies."""


MIGRATIONS = {1: _migrate_to_1, 2: _migrate_to_2}
"""``version: step`` bringing a database from ``version - 1`` to ``version``."""


def to_db(text: str) -> str | bytes:
    """SQLite text must be UTF-8; a file name that is not (``os.fsdecode`` leaves lone
    surrogates in it) is stored as a BLOB of its raw bytes, so it round-trips exactly."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text)


def from_db(value):
    return os.fsdecode(value) if isinstance(value, bytes) else value


def record(row) -> "FileRecord":
    return FileRecord(from_db(row[0]), *row[1:])


FILE_COLUMNS = "path, size, mtime_ns, hash, duration, sample_rate, id"


@dataclass(frozen=True)
class FileRecord:
    """One indexed file as stored in ``files``."""

    path: str
    size: int
    mtime_ns: int
    hash: str
    duration: float
    sample_rate: int
    id: int | None = None


@dataclass(frozen=True)
class Catalog:
    """Every segment's id, file and time range, aligned arrays of shape ``(n_segments,)``,
    plus each file's path and label. Loaded once per search session."""

    segment_ids: np.ndarray
    segment_files: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    paths: dict[int, str]
    labels: dict[int, str]
    generation: int = -1
    """The database generation this catalog is a snapshot of."""



def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
