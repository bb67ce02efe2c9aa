"""The index on disk: SQLite (source of truth, via sqlite-utils) plus a FAISS cache.

Directory layout (see ``index/README.md``)::

    simsearch.db     files, segments (with their vectors), labels, failures, meta
    vectors.faiss    FAISS index over segment vectors; the FAISS id *is* segments.id
    vectors.json     sidecar: how and from which database generation the FAISS file was built
    lock             held (flock) by the one process allowed to write; holds its PID

Every write transaction bumps ``meta.generation``. The FAISS file is trusted only when its
sidecar names the current generation, its checksum matches, and its structure, vector count,
dimension and ids agree with SQLite; otherwise it is rebuilt from SQLite, so a crash between
the SQLite commit and the FAISS write loses nothing. The FAISS file is never handed to FAISS's
own parser (it is read as the flat arrays it must be), and nothing here is ever unpickled.
Both cache files are replaced atomically (temp file, fsync, rename).

Readers see snapshots: the catalog a search uses and the vectors it searches come from the
same database generation, even while a writer commits. This is the only module that touches
SQLite or FAISS; an SQLite failure surfaces as a :class:`~simsearch.errors.SimsearchError`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import hashlib
import json
import os
import sqlite3
import stat as stat_module
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptIndexError, EncoderMismatchError, IndexLockedError, SimsearchError

SCHEMA_VERSION = 2
"""History: 1, the first layout; 2, a path (or label) that is not valid UTF-8 is stored as a
BLOB of its raw bytes (version 1 could not store it; a version-1 reader would trip over it)."""
DB_NAME, FAISS_NAME, SIDECAR_NAME, LOCK_NAME = "simsearch.db", "vectors.faiss", "vectors.json", "lock"

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


class IndexWriteError(SimsearchError):
    """The index directory cannot be written (disk full, read-only, no permission).

    The step that failed changed nothing: the index is as it was before it.
    """


def _migrate_to_1(store: "Store") -> None:
    for statement in filter(str.strip, _SCHEMA_V1.split(";")):
        store.db.execute(statement)
    if store.get_meta("generation") is None:
        store._set_meta("generation", "0")


def _migrate_to_2(store: "Store") -> None:
    """No table changes: version 2 only widens what ``path`` and ``label`` may hold (BLOBs for
    names that are not UTF-8), which every version-1 row already satisfies."""


_MIGRATIONS = {1: _migrate_to_1, 2: _migrate_to_2}
"""``version: step`` bringing a database from ``version - 1`` to ``version``."""


def _to_db(text: str) -> str | bytes:
    """SQLite text must be UTF-8; a file name that is not (``os.fsdecode`` leaves lone
    surrogates in it) is stored as a BLOB of its raw bytes, so it round-trips exactly."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text)


def _from_db(value):
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _record(row) -> "FileRecord":
    return FileRecord(_from_db(row[0]), *row[1:])


def _guarded(method):
    """Turn an SQLite error inside ``method`` into the matching :class:`SimsearchError`."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            translated = self._translate(e)
            if translated is e:
                raise
            raise translated from None
    return wrapper


_FILE_COLUMNS = "path, size, mtime_ns, hash, duration, sample_rate, id"


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


class Store:
    """Open (or create) the index in ``directory``.

    Readers never block; a writer takes the directory's lock for the duration of
    :meth:`writing` and raises :class:`IndexLockedError` naming the PID that holds it.
    A database from an older simsearch is migrated on open; one from a newer simsearch is
    refused (:class:`CorruptIndexError`), untouched.
    """

    def __init__(self, directory: str | os.PathLike, *, create: bool = True):
        self.directory = Path(directory)
        if create:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise IndexWriteError(f"cannot create the index directory {self.directory}: {e.strerror}") from None
        elif not (self.directory / DB_NAME).exists():
            raise CorruptIndexError(f"no index in {self.directory} (run `simsearch index DIR` first)")
        self._faiss: tuple[int, object] | None = None  # (generation, index): the latest loaded
        self._pinned: tuple[int, object] | None = None  # what search() uses: the last catalog()'s
        self._unsaved: tuple[int, object] | None = None  # rebuilt, not yet written to the cache
        self._lock_fd: int | None = None
        self._write_depth = 0
        self.read_only = False
        """True when the directory could not be written at open: searches work, writes are refused."""
        try:
            self._connect(read_only=False)
        except IndexWriteError:
            if not (self.directory / DB_NAME).is_file():
                raise
            # A directory we cannot write (read-only media, someone else's index): SQLite
            # cannot create its WAL side files there, but the index can still be searched.
            self._connect(read_only=True)
            self.read_only = True

    def _connect(self, *, read_only: bool) -> None:
        import sqlite_utils

        conn = None
        try:
            if read_only:
                uri = (self.directory / DB_NAME).absolute().as_uri() + "?mode=ro&immutable=1"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(self.directory / DB_NAME, timeout=60, isolation_level=None,
                                       check_same_thread=False)
            self.db = sqlite_utils.Database(conn)
            self.db.execute("PRAGMA foreign_keys=ON")
            self._check_schema()  # first: a database we refuse is left byte for byte as it was
            if not read_only:
                self.db.execute("PRAGMA journal_mode=WAL")
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, sqlite3.Error) and (translated := self._translate(e)) is not e:
                raise translated from None
            raise

    # ---- errors ------------------------------------------------------------------------
    def _translate(self, error: sqlite3.Error) -> Exception:
        """The :class:`SimsearchError` an SQLite error means for the user (or ``error`` itself
        when it is a bug in simsearch rather than a problem with the index)."""
        if isinstance(error, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
            return error
        name = getattr(error, "sqlite_errorname", "")  # Python >= 3.11
        text = str(error)
        where = self.directory / DB_NAME
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
            return CorruptIndexError(f"{where}: not a usable simsearch database ({text}); restore it from a backup, "
                                     f"or move {self.directory} away and index again")
        if name == "SQLITE_FULL" or "disk is full" in text:
            return IndexWriteError(f"cannot write to the index in {self.directory}: the disk is full ({text}); "
                                   "the index is as it was before this step")
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR", "SQLITE_AUTH")) or \
                "readonly" in text or "unable to open" in text or "disk I/O" in text:
            return IndexWriteError(f"cannot use the index in {self.directory}: {text} (is the directory read-only, "
                                   "or not yours?); the index is as it was before this step")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return IndexLockedError(f"index {self.directory} stayed busy for 60 s ({text})")
        return CorruptIndexError(f"{where}: not a usable simsearch database ({text})")

    # ---- schema and meta -------------------------------------------------------------
    def _schema_version(self) -> int:
        tables = set(self.db.table_names())
        if not tables:
            return 0
        if "meta" in tables:
            raw = self.get_meta("schema_version")
            if raw is not None:
                try:
                    return int(raw)
                except ValueError:
                    raise CorruptIndexError(f"{self.directory / DB_NAME}: schema version {raw!r} is not a number") from None
        if "files" not in tables:
            raise CorruptIndexError(f"{self.directory / DB_NAME} is an SQLite file but not a simsearch index")
        return 0  # made before versions were recorded

    def _check_schema(self) -> None:
        version = self._schema_version()
        if version > SCHEMA_VERSION:
            raise CorruptIndexError(
                f"{self.directory}: index schema {version} is newer than this simsearch understands "
                f"({SCHEMA_VERSION}); upgrade simsearch (the index was not touched)")
        if version == SCHEMA_VERSION:
            return
        # A fresh or older database: every step in one transaction, so a crash leaves the old
        # version. BEGIN IMMEDIATE makes a second process wait, then find the work done.
        with self._transaction(bump=False):
            for target in range(self._schema_version() + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[target](self)
                self._set_meta("schema_version", str(target))

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else None

    def _meta_int(self, key: str, default: int = 0) -> int:
        raw = self.get_meta(key)
        try:
            return int(raw) if raw is not None else default
        except ValueError:
            raise CorruptIndexError(f"{self.directory / DB_NAME}: meta {key} = {raw!r} is not a number") from None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [key, value])

    @property
    def generation(self) -> int:
        """Bumped by every committed write."""
        return self._generation()

    @_guarded
    def _generation(self) -> int:
        return self._meta_int("generation")

    @_guarded
    def encoder(self) -> tuple[str, str, int] | None:
        """``(name, version, dim)`` of the encoder whose vectors the index holds, or None."""
        name = self.get_meta("encoder")
        if name is None:
            return None
        return name, self.get_meta("encoder_version") or "", self._meta_int("dim")

    @_guarded
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
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._translate(e) from None
        self._write_depth += 1
        try:
            yield
            if bump:
                self._set_meta("generation", str(self.generation + 1))
            self.db.execute("COMMIT")
        except BaseException as e:
            # SQLite may have rolled back already (disk full does); a failing ROLLBACK must
            # not hide the error that matters.
            if self.db.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                translated = self._translate(e)
                if translated is not e:
                    raise translated from None
            raise
        finally:
            self._write_depth -= 1

    @contextlib.contextmanager
    def locked(self):
        """Hold the writer lock (re-entrant within this Store).

        Raises :class:`IndexLockedError` naming the holder's PID, or :class:`IndexWriteError`
        when the directory cannot be written at all.
        """
        import fcntl

        if self._lock_fd is not None:
            yield
            return
        if self.read_only:  # refused before any work is done, not at the first commit
            raise IndexWriteError(f"cannot use the index in {self.directory} for writing: it is read-only here "
                                  "(is the directory read-only, or not yours?); the index is as it was")
        lock_path = self.directory / LOCK_NAME
        try:
            # O_NOFOLLOW: a lock "file" that is a symlink must not make us truncate its target.
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptIndexError(f"{lock_path} is a symbolic link; refusing to use it as the lock") from None
            raise IndexWriteError(f"cannot write to the index in {self.directory}: {e.strerror} "
                                  "(is the directory read-only, or not yours?)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise IndexLockedError(f"index {self.directory} is locked by PID {pid} (another simsearch is writing to it)") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            os.close(fd)
            raise IndexWriteError(f"cannot write to the index in {self.directory}: {e.strerror}") from None
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.close(fd)

    @contextlib.contextmanager
    def writing(self):
        """One atomic write: the lock, a transaction, a generation bump; FAISS follows it."""
        with self.locked(), self._transaction():
            yield

    @_guarded
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
            [_to_db(record.path), record.size, record.mtime_ns, record.hash, record.duration, record.sample_rate, _now()])
        file_id = cur.lastrowid
        self._insert_segments(file_id, bounds, vectors)
        if label is not None:
            self.set_label([file_id], _from_db(label[0]), source=label[1])
        return file_id

    def _insert_segments(self, file_id: int, bounds: list[tuple[float, float]], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) != len(bounds) or not np.isfinite(vectors).all():
            raise ValueError(f"{len(bounds)} segments need as many finite vectors, got {vectors.shape}")
        rows = [(file_id, float(s), float(e), vectors[i].tobytes()) for i, (s, e) in enumerate(bounds)]
        self.db.conn.executemany('INSERT INTO segments(file_id, start, "end", vector) VALUES (?,?,?,?)', rows)

    @_guarded
    def replace_vectors(self, file_id: int, bounds: list[tuple[float, float]], vectors: np.ndarray) -> None:
        """Swap a file's segments for new ones (re-embedding). Inside :meth:`writing`."""
        self.db.execute("DELETE FROM segments WHERE file_id = ?", [file_id])
        self._insert_segments(file_id, bounds, vectors)

    @_guarded
    def set_encoder(self, name: str, version: str, dim: int) -> None:
        """Record which encoder made the vectors. Inside :meth:`writing`."""
        self._set_meta("encoder", name)
        self._set_meta("encoder_version", version)
        self._set_meta("dim", str(dim))

    @_guarded
    def all_files(self) -> list[FileRecord]:
        rows = self.db.execute(f"SELECT {_FILE_COLUMNS} FROM files ORDER BY id")
        return [_record(row) for row in rows.fetchall()]

    @_guarded
    def update_file(self, file_id: int, *, path: str, size: int, mtime_ns: int) -> None:
        """Record a move/rename or a touched file; vectors and labels stay. Inside :meth:`writing`.

        Another file indexed at ``path`` (one that was overwritten by the move) is deleted.
        """
        other = self.file_by_path(path)
        if other is not None and other.id != file_id:
            self.delete_files([other.id])
        self.db.execute("UPDATE files SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                        [_to_db(path), size, mtime_ns, file_id])

    @_guarded
    def delete_files(self, file_ids: list[int]) -> None:
        """Delete files with their segments and labels. Inside :meth:`writing`."""
        for chunk in _chunks(list(file_ids), 500):
            marks = ",".join("?" * len(chunk))
            for table, column in (("segments", "file_id"), ("labels", "file_id"), ("files", "id")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", chunk)

    @_guarded
    def set_label(self, file_ids: list[int], label: str | None, *, source: str = "manual") -> None:
        """Label (or with ``None`` unlabel) whole files. Inside :meth:`writing`."""
        for file_id in file_ids:
            if label is None:
                self.db.execute("DELETE FROM labels WHERE file_id = ?", [file_id])
            else:
                self.db.execute("INSERT OR REPLACE INTO labels(file_id, label, source) VALUES (?,?,?)",
                                [file_id, _to_db(label), source])

    @_guarded
    def record_failure(self, path: str, size: int | None, mtime_ns: int | None, reason: str) -> None:
        """Remember that ``path`` (as it was at ``size``/``mtime_ns``) could not be read. Inside :meth:`writing`."""
        self.db.execute("INSERT OR REPLACE INTO failures(path, size, mtime_ns, reason, at) VALUES (?,?,?,?,?)",
                        [_to_db(path), size, mtime_ns, _to_db(reason), _now()])

    @_guarded
    def clear_failure(self, path: str) -> None:
        self.db.execute("DELETE FROM failures WHERE path = ?", [_to_db(path)])

    # ---- reading ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _snapshot(self):
        """Run reads inside one read transaction: under WAL they all see the same commit."""
        if self.db.conn.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("COMMIT")

    @_guarded
    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    @_guarded
    def file_by_path(self, path: str) -> FileRecord | None:
        row = self.db.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE path = ?", [_to_db(path)]).fetchone()
        return _record(row) if row else None

    @_guarded
    def files_by_hash(self, content_hash: str) -> list[FileRecord]:
        rows = self.db.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE hash = ?", [content_hash]).fetchall()
        return [_record(row) for row in rows]

    @_guarded
    def files_under(self, prefix: str) -> list[FileRecord]:
        """Files whose path equals ``prefix`` or lies in the folder ``prefix``."""
        # Compared as bytes, so names stored as BLOBs (not UTF-8) are found under a folder too.
        exact = os.fsencode(prefix)
        folder = os.fsencode(prefix.rstrip(os.sep) + os.sep)
        rows = self.db.execute(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE CAST(path AS BLOB) = ? OR substr(CAST(path AS BLOB), 1, ?) = ?",
            [exact, len(folder), folder]).fetchall()
        return [_record(row) for row in rows]

    @_guarded
    def failure(self, path: str) -> tuple[int, int, str] | None:
        row = self.db.execute("SELECT size, mtime_ns, reason FROM failures WHERE path = ?", [_to_db(path)]).fetchone()
        return (row[0], row[1], _from_db(row[2])) if row else None

    @_guarded
    def failures(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every file recorded as unreadable, by path."""
        rows = self.db.execute("SELECT path, reason FROM failures").fetchall()
        return sorted((_from_db(p), _from_db(r)) for p, r in rows)

    @_guarded
    def forget_failures(self, paths: list[str]) -> None:
        """Drop the failure records of ``paths`` (files that are gone). Inside :meth:`writing`."""
        for path in paths:
            self.clear_failure(path)

    @_guarded
    def label_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT label, count(*) FROM labels GROUP BY label").fetchall()
        return dict(sorted((_from_db(label), n) for label, n in rows))

    @_guarded
    def file_vectors(self, file_id: int) -> tuple[list[tuple[float, float]], np.ndarray]:
        rows = self.db.execute('SELECT start, "end", vector FROM segments WHERE file_id = ? ORDER BY id', [file_id]).fetchall()
        dim = self._meta_int("dim")
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return [(r[0], r[1]) for r in rows], vectors

    @_guarded
    def catalog(self) -> Catalog:
        """Everything a search needs to turn segment ids into paths, labels and times.

        It is one snapshot, together with the vectors :meth:`search` will then use.
        """
        with self._snapshot():
            generation = self.generation
            rows = self.db.execute('SELECT id, file_id, start, "end" FROM segments ORDER BY id').fetchall()
            paths = {i: _from_db(p) for i, p in self.db.execute("SELECT id, path FROM files").fetchall()}
            labels = {i: _from_db(label) for i, label in self.db.execute("SELECT file_id, label FROM labels").fetchall()}
            index = self._index_for(generation)
        self._flush_cache()
        array = np.array(rows, dtype=np.float64).reshape(-1, 4)
        self._pinned = (generation, index)
        return Catalog(array[:, 0].astype(np.int64), array[:, 1].astype(np.int64), array[:, 2], array[:, 3],
                       paths, labels, generation)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    # ---- FAISS cache -----------------------------------------------------------------
    @_guarded
    def vector_index(self):
        """The FAISS index over all segments, loaded from the cache file or rebuilt from SQLite.

        A rebuilt index is written back to the cache by the writer, or by a reader when no
        writer is active; a reader that cannot write (read-only directory) just uses it.
        """
        with self._snapshot():
            index = self._index_for(self.generation)
        self._flush_cache()
        return index

    def _index_for(self, generation: int):
        """The index of ``generation``, which the caller's snapshot is reading. A rebuilt one
        is left in ``_unsaved`` for :meth:`_flush_cache`, once the snapshot is over."""
        if self._faiss is not None and self._faiss[0] == generation:
            return self._faiss[1]
        index = self._load_cached(generation)
        if index is None:
            index = self._rebuild()
            if self._write_depth:  # built from uncommitted rows: neither cached nor saved
                return index
            self._unsaved = (generation, index)
        self._faiss = (generation, index)
        return index

    def _flush_cache(self) -> None:
        """Write a rebuilt index to the cache files (see :meth:`vector_index`)."""
        if self._unsaved is None:
            return
        (generation, index), self._unsaved = self._unsaved, None
        if self._lock_fd is not None:  # the writer: failing to write is worth an error
            self.save_vector_index(index, generation=generation)
            return
        try:
            with self.locked():
                if self.generation == generation:  # no writer committed since we read
                    self.save_vector_index(index, generation=generation)
        except (IndexLockedError, IndexWriteError, CorruptIndexError):
            pass  # a reader leaves the stale cache to the next writer

    def _segment_ids(self) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM segments ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def _load_cached(self, generation: int):
        """The cached index if every check passes, else None (the caller rebuilds)."""
        import faiss

        dim = self._meta_int("dim")
        ids = self._segment_ids()
        n = len(ids)
        if n == 0 or dim <= 0:
            return None
        raw_sidecar = _read_regular(self.directory / SIDECAR_NAME, max_size=1 << 20)
        try:
            sidecar = json.loads(raw_sidecar) if raw_sidecar is not None else None
        except ValueError:
            return None
        if not isinstance(sidecar, dict) or sidecar.get("generation") != generation \
                or sidecar.get("vectors") != n or sidecar.get("dim") != dim:
            return None
        blob = _read_regular(self.directory / FAISS_NAME, exact_size=_flat_size(n, dim))
        if blob is None or sidecar.get("sha256") != hashlib.sha256(blob).hexdigest():
            return None
        parsed = _parse_flat_idmap(blob, n, dim)
        if parsed is None or not np.array_equal(parsed[1], ids):
            return None
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(parsed[0], parsed[1])
        return index

    def _rebuild(self):
        import faiss

        dim = self._meta_int("dim", 1) or 1
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        cursor = self.db.execute("SELECT id, vector FROM segments ORDER BY id")
        while rows := cursor.fetchmany(65536):
            bad = next((r[0] for r in rows if not isinstance(r[1], bytes) or len(r[1]) != 4 * dim), None)
            if bad is not None:
                raise CorruptIndexError(f"{self.directory / DB_NAME}: segment {bad} does not hold a vector of "
                                        f"{dim} float32 values; the database is damaged")
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            index.add_with_ids(vectors, ids)
        return index

    @_guarded
    def save_vector_index(self, index, generation: int | None = None) -> None:
        """Write the FAISS file and its sidecar atomically (temp file, fsync, rename).

        ``generation`` is the database generation ``index`` was built from (default: the
        current one). Hold the lock. Raises :class:`IndexWriteError` if the directory cannot
        be written; the previous files are then left as they were.
        """
        import faiss

        if generation is None:
            generation = self.generation
        blob = faiss.serialize_index(index).tobytes()
        sidecar = {"generation": generation, "index_type": describe_index(index), "vectors": int(index.ntotal),
                   "dim": int(index.d), "encoder": self.get_meta("encoder"),
                   "encoder_version": self.get_meta("encoder_version"), "metric": "inner_product",
                   "faiss_version": faiss.__version__, "built_at": _now(), "sha256": hashlib.sha256(blob).hexdigest()}
        try:
            _remove_stale_temp_files(self.directory)
            # FAISS first: a crash between the two renames leaves a sidecar whose checksum
            # does not match, so the pair is rebuilt, never trusted half-new.
            _atomic_write(self.directory / FAISS_NAME, blob)
            _atomic_write(self.directory / SIDECAR_NAME, json.dumps(sidecar, indent=2).encode())
        except OSError as e:
            what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise IndexWriteError(f"cannot write the vector cache in {self.directory}: {what}; the database is "
                                  "intact and the cache will be rebuilt from it") from None

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
        """Top-``k`` segments by inner product for each row of ``queries`` ``(q, dim)``.

        ``allowed_ids`` restricts the search itself (a FAISS ID selector), so filtering
        happens before the top k are taken. Returns ``(scores, ids)``, each ``(q, k)``;
        missing results have id -1. The vectors searched are those of the snapshot the last
        :meth:`catalog` returned (so every id found is in it), or the latest before any.
        """
        import faiss

        index = self._pinned[1] if self._pinned is not None else self.vector_index()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed_ids is None:
            return index.search(queries, k)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
        return index.search(queries, k, params=params)

    def close(self) -> None:
        self._faiss = self._pinned = None
        self.db.conn.close()


def describe_index(index) -> str:
    """A short name for a FAISS index, e.g. ``IDMap2,Flat``."""
    inner = getattr(index, "index", None)
    import faiss

    base = faiss.downcast_index(inner) if inner is not None else index
    prefix = "IDMap2," if inner is not None else ""
    return prefix + type(base).__name__.removeprefix("Index")


# The FAISS serialisation of IndexIDMap2(IndexFlatIP(d)) holding n vectors: "IxM2" and an index
# header, "IxFI" and the same header, the n*d float32 codes (count first), the n int64 ids
# (count first). Header: d int32, ntotal int64, two int64 FAISS ignores, is_trained uint8,
# metric int32 (0 = inner product).
_HEADER = struct.Struct("<4siqqqBi")


def _flat_size(n: int, dim: int) -> int:
    return 2 * _HEADER.size + 8 + 4 * n * dim + 8 + 8 * n


def _parse_flat_idmap(blob: bytes, n: int, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(vectors, ids)`` from a serialised flat inner-product ID map of ``n`` x ``dim``, or
    None if ``blob`` is anything else. Checked field by field, so a damaged or forged file
    is refused here rather than parsed by C++."""
    if len(blob) != _flat_size(n, dim):
        return None
    for offset, magic in ((0, b"IxM2"), (_HEADER.size, b"IxFI")):
        fourcc, d, ntotal, _, _, trained, metric = _HEADER.unpack_from(blob, offset)
        if (fourcc, d, ntotal, trained, metric) != (magic, dim, n, 1, 0):
            return None
    at = 2 * _HEADER.size
    if struct.unpack_from("<q", blob, at)[0] != n * dim:
        return None
    vectors = np.frombuffer(blob, dtype=np.float32, count=n * dim, offset=at + 8).reshape(n, dim)
    at += 8 + 4 * n * dim
    if struct.unpack_from("<q", blob, at)[0] != n:
        return None
    ids = np.frombuffer(blob, dtype=np.int64, count=n, offset=at + 8)
    if not np.isfinite(vectors).all():
        return None
    return vectors, ids


def _read_regular(path: Path, *, exact_size: int | None = None, max_size: int | None = None) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a symlink, pipe or device) of the
    expected size, else None: a planted ``/dev/zero`` or a huge file is never read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat_module.S_ISREG(st.st_mode) or (exact_size is not None and st.st_size != exact_size) \
            or (max_size is not None and st.st_size > max_size):
        os.close(fd)
        return None
    with open(fd, "rb") as f:
        data = f.read(st.st_size + 1)
    return data if len(data) == st.st_size else None


def _remove_stale_temp_files(directory: Path) -> None:
    """Temp files of writers that died mid-write (only the lock holder writes, so any found
    now are orphans)."""
    for name in (FAISS_NAME, SIDECAR_NAME):
        for tmp in directory.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that it holds the old or the new bytes, never a mix:
    a temp file in the same directory, fsynced, renamed over ``path``, the directory fsynced.
    On failure the temp file is removed and ``path`` is untouched."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    # O_EXCL | O_NOFOLLOW: never write through a planted symlink.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                 | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
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
