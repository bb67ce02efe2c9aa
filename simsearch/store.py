"""The index on disk: SQLite (source of truth, via sqlite-utils) plus a FAISS cache.

Directory layout (see ``index/README.md``)::

    simsearch.db     files, segments (with their vectors), labels, failures, meta
    vectors.faiss    FAISS index over segment vectors; the FAISS id *is* segments.id
    vectors.json     sidecar: how and from which database generation the FAISS file was built
    lock             held (flock) by the one process allowed to write; holds its PID

Every write transaction bumps ``meta.generation``. The FAISS file is trusted only when its
sidecar names the current generation and its checksum matches; otherwise it is rebuilt from
SQLite, so a crash between the SQLite commit and the FAISS write loses nothing, and a
tampered FAISS file is never parsed. This is the only module that touches SQLite or FAISS.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptIndexError, EncoderMismatchError, IndexLockedError

SCHEMA_VERSION = 1
DB_NAME, FAISS_NAME, SIDECAR_NAME, LOCK_NAME = "simsearch.db", "vectors.faiss", "vectors.json", "lock"

_SCHEMA = """
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


class Store:
    """Open (or create) the index in ``directory``.

    Readers never block; a writer takes the directory's lock for the duration of
    :meth:`writing` and raises :class:`IndexLockedError` naming the PID that holds it.
    """

    def __init__(self, directory: str | os.PathLike, *, create: bool = True):
        import sqlite_utils

        self.directory = Path(directory)
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not (self.directory / DB_NAME).exists():
            raise CorruptIndexError(f"no index in {self.directory} (run `simsearch index DIR` first)")
        try:
            conn = sqlite3.connect(self.directory / DB_NAME, timeout=60, isolation_level=None,
                                   check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._check_schema()
        except sqlite3.DatabaseError as e:
            raise CorruptIndexError(f"{self.directory / DB_NAME}: not a usable simsearch database ({e})") from None
        self._faiss = None
        self._faiss_generation = None
        self._lock_file = None

    # ---- schema and meta -------------------------------------------------------------
    def _check_schema(self) -> None:
        tables = set(self.db.table_names())
        if "meta" in tables:
            version = int(self.get_meta("schema_version") or 0)
            if version > SCHEMA_VERSION:
                raise CorruptIndexError(
                    f"index schema {version} is newer than this simsearch understands ({SCHEMA_VERSION}); upgrade simsearch")
            if version == SCHEMA_VERSION:
                return
        if tables - {"meta"} and "files" not in tables:
            raise CorruptIndexError(f"{self.directory / DB_NAME} is an SQLite file but not a simsearch index")
        # Fresh database, or an older schema: both are brought up to date in one transaction.
        with self._transaction(bump=False):
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self.db.execute(statement)
            self._set_meta("schema_version", str(SCHEMA_VERSION))
            if self.get_meta("generation") is None:
                self._set_meta("generation", "0")

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [key, value])

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def encoder(self) -> tuple[str, str, int] | None:
        """``(name, version, dim)`` of the encoder whose vectors the index holds, or None."""
        name = self.get_meta("encoder")
        if name is None:
            return None
        return name, self.get_meta("encoder_version") or "", int(self.get_meta("dim") or 0)

    def claim_encoder(self, name: str, version: str, dim: int) -> None:
        """Record the encoder of a new index, or check it matches the recorded one."""
        current = self.encoder()
        if current is None or self.count("segments") == 0:
            if current != (name, version, dim):
                with self.writing():
                    self.set_encoder(name, version, dim)
            return
        if current[:2] != (name, version):
            raise EncoderMismatchError(
                f"the index in {self.directory} holds vectors from encoder {current[0]} v{current[1]}, "
                f"not {name} v{version}; keep using {current[0]} or re-embed everything with "
                f"`simsearch reembed --encoder {name} --index {self.directory}`")

    # ---- writing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self, *, bump: bool = True):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            if bump:
                self._set_meta("generation", str(self.generation + 1))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def locked(self):
        """Hold the writer lock (re-entrant within this Store)."""
        import fcntl

        if self._lock_file is not None:
            yield
            return
        lock_path = self.directory / LOCK_NAME
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            handle.close()
            raise IndexLockedError(f"index {self.directory} is locked by PID {pid} (another simsearch is writing to it)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle
        try:
            yield
        finally:
            self._lock_file = None
            handle.close()

    @contextlib.contextmanager
    def writing(self):
        """One atomic write: the lock, a transaction, a generation bump; FAISS follows it."""
        with self.locked(), self._transaction():
            yield

    def add_file(self, record: FileRecord, bounds: list[tuple[float, float]], vectors: np.ndarray) -> int:
        """Insert (or replace, by path) a file and its segment vectors ``(len(bounds), dim)``.

        Call inside :meth:`writing`. Returns the file id.
        """
        old = self.file_by_path(record.path)
        label = None
        if old is not None:
            label = self.db.execute("SELECT label, source FROM labels WHERE file_id = ?", [old.id]).fetchone()
            self.delete_files([old.id])
        cur = self.db.execute(
            "INSERT INTO files(path, size, mtime_ns, hash, duration, sample_rate, added_at) VALUES (?,?,?,?,?,?,?)",
            [record.path, record.size, record.mtime_ns, record.hash, record.duration, record.sample_rate, _now()])
        file_id = cur.lastrowid
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows = [(file_id, float(s), float(e), vectors[i].tobytes()) for i, (s, e) in enumerate(bounds)]
        self.db.conn.executemany('INSERT INTO segments(file_id, start, "end", vector) VALUES (?,?,?,?)', rows)
        if label is not None:
            self.set_label([file_id], label[0], source=label[1])
        return file_id

    def replace_vectors(self, file_id: int, bounds: list[tuple[float, float]], vectors: np.ndarray) -> None:
        """Swap a file's segments for new ones (re-embedding). Inside :meth:`writing`."""
        self.db.execute("DELETE FROM segments WHERE file_id = ?", [file_id])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.db.conn.executemany('INSERT INTO segments(file_id, start, "end", vector) VALUES (?,?,?,?)',
                                 [(file_id, float(s), float(e), vectors[i].tobytes()) for i, (s, e) in enumerate(bounds)])

    def set_encoder(self, name: str, version: str, dim: int) -> None:
        """Record which encoder made the vectors. Inside :meth:`writing`."""
        self._set_meta("encoder", name)
        self._set_meta("encoder_version", version)
        self._set_meta("dim", str(dim))

    def all_files(self) -> list[FileRecord]:
        rows = self.db.execute("SELECT path, size, mtime_ns, hash, duration, sample_rate, id FROM files ORDER BY id")
        return [FileRecord(*row) for row in rows.fetchall()]

    def update_file(self, file_id: int, *, path: str, size: int, mtime_ns: int) -> None:
        """Record a move/rename or a touched file; vectors and labels stay. Inside :meth:`writing`."""
        self.db.execute("UPDATE files SET path = ?, size = ?, mtime_ns = ? WHERE id = ?", [path, size, mtime_ns, file_id])

    def delete_files(self, file_ids: list[int]) -> None:
        """Delete files with their segments and labels. Inside :meth:`writing`."""
        for chunk in _chunks(list(file_ids), 500):
            marks = ",".join("?" * len(chunk))
            for table, column in (("segments", "file_id"), ("labels", "file_id"), ("files", "id")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", chunk)

    def set_label(self, file_ids: list[int], label: str | None, *, source: str = "manual") -> None:
        """Label (or with ``None`` unlabel) whole files. Inside :meth:`writing`."""
        for file_id in file_ids:
            if label is None:
                self.db.execute("DELETE FROM labels WHERE file_id = ?", [file_id])
            else:
                self.db.execute("INSERT OR REPLACE INTO labels(file_id, label, source) VALUES (?,?,?)",
                                [file_id, label, source])

    def record_failure(self, path: str, size: int | None, mtime_ns: int | None, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO failures(path, size, mtime_ns, reason, at) VALUES (?,?,?,?,?)",
                        [path, size, mtime_ns, reason, _now()])

    def clear_failure(self, path: str) -> None:
        self.db.execute("DELETE FROM failures WHERE path = ?", [path])

    # ---- reading ---------------------------------------------------------------------
    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def file_by_path(self, path: str) -> FileRecord | None:
        row = self.db.execute("SELECT path, size, mtime_ns, hash, duration, sample_rate, id FROM files WHERE path = ?",
                              [path]).fetchone()
        return FileRecord(*row) if row else None

    def files_by_hash(self, content_hash: str) -> list[FileRecord]:
        rows = self.db.execute("SELECT path, size, mtime_ns, hash, duration, sample_rate, id FROM files WHERE hash = ?",
                               [content_hash]).fetchall()
        return [FileRecord(*row) for row in rows]

    def files_under(self, prefix: str) -> list[FileRecord]:
        """Files whose path equals ``prefix`` or lies in the folder ``prefix``."""
        folder = prefix.rstrip(os.sep) + os.sep
        rows = self.db.execute(
            "SELECT path, size, mtime_ns, hash, duration, sample_rate, id FROM files "
            "WHERE path = ? OR substr(path, 1, ?) = ?", [prefix, len(folder), folder]).fetchall()
        return [FileRecord(*row) for row in rows]

    def failure(self, path: str) -> tuple[int, int, str] | None:
        row = self.db.execute("SELECT size, mtime_ns, reason FROM failures WHERE path = ?", [path]).fetchone()
        return tuple(row) if row else None

    def label_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT label, count(*) FROM labels GROUP BY label ORDER BY label").fetchall()
        return {label: n for label, n in rows}

    def file_vectors(self, file_id: int) -> tuple[list[tuple[float, float]], np.ndarray]:
        rows = self.db.execute('SELECT start, "end", vector FROM segments WHERE file_id = ? ORDER BY id', [file_id]).fetchall()
        dim = int(self.get_meta("dim") or 0)
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return [(r[0], r[1]) for r in rows], vectors

    def catalog(self) -> Catalog:
        """Everything a search needs to turn segment ids into paths, labels and times."""
        rows = self.db.execute('SELECT id, file_id, start, "end" FROM segments ORDER BY id').fetchall()
        array = np.array(rows, dtype=np.float64).reshape(-1, 4)
        paths = dict(self.db.execute("SELECT id, path FROM files").fetchall())
        labels = dict(self.db.execute("SELECT file_id, label FROM labels").fetchall())
        return Catalog(array[:, 0].astype(np.int64), array[:, 1].astype(np.int64), array[:, 2], array[:, 3],
                       paths, labels)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    # ---- FAISS cache -----------------------------------------------------------------
    def vector_index(self):
        """The FAISS index over all segments, loaded from the cache file or rebuilt from SQLite."""
        generation = self.generation
        if self._faiss is not None and self._faiss_generation == generation:
            return self._faiss
        index = self._load_cached(generation)
        if index is None:
            index = self._rebuild()
            if self._lock_file is not None or self._try_lock_for_cache():
                self.save_vector_index(index)
        self._faiss, self._faiss_generation = index, generation
        return index

    def _try_lock_for_cache(self) -> bool:
        """Readers may refresh a stale cache file only when no writer is active."""
        try:
            with self.locked():
                return True
        except (IndexLockedError, OSError):
            return False

    def _load_cached(self, generation: int):
        import faiss

        try:
            sidecar = json.loads((self.directory / SIDECAR_NAME).read_text())
            blob = (self.directory / FAISS_NAME).read_bytes()
        except (OSError, ValueError):
            return None
        if sidecar.get("generation") != generation or sidecar.get("sha256") != hashlib.sha256(blob).hexdigest():
            return None
        try:
            return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except RuntimeError:
            return None

    def _rebuild(self):
        import faiss

        dim = int(self.get_meta("dim") or 1)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        cursor = self.db.execute("SELECT id, vector FROM segments ORDER BY id")
        while rows := cursor.fetchmany(65536):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            index.add_with_ids(vectors, ids)
        return index

    def save_vector_index(self, index) -> None:
        """Write the FAISS file and its sidecar atomically (temp file, fsync, rename)."""
        import faiss

        blob = faiss.serialize_index(index).tobytes()
        sidecar = {"generation": self.generation, "index_type": describe_index(index), "vectors": int(index.ntotal),
                   "dim": int(index.d), "encoder": self.get_meta("encoder"),
                   "encoder_version": self.get_meta("encoder_version"), "metric": "inner_product",
                   "faiss_version": faiss.__version__, "built_at": _now(), "sha256": hashlib.sha256(blob).hexdigest()}
        _atomic_write(self.directory / FAISS_NAME, blob)
        _atomic_write(self.directory / SIDECAR_NAME, json.dumps(sidecar, indent=2).encode())

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
        """Top-``k`` segments by inner product for each row of ``queries`` ``(q, dim)``.

        ``allowed_ids`` restricts the search itself (a FAISS ID selector), so filtering
        happens before the top k are taken. Returns ``(scores, ids)``, each ``(q, k)``;
        missing results have id -1.
        """
        import faiss

        index = self.vector_index()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed_ids is None:
            return index.search(queries, k)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
        return index.search(queries, k, params=params)

    def close(self) -> None:
        self.db.conn.close()


def describe_index(index) -> str:
    """A short name for a FAISS index, e.g. ``IDMap2,Flat``."""
    inner = getattr(index, "index", None)
    import faiss

    base = faiss.downcast_index(inner) if inner is not None else index
    prefix = "IDMap2," if inner is not None else ""
    return prefix + type(base).__name__.removeprefix("Index")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
