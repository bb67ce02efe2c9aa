"""The :class:`Store`: SQLite (the source of truth, via sqlite-utils) and its FAISS cache.

See :mod:`simsearch.store` for the directory layout and the guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

import numpy as np

from ..errors import (
    CorruptIndexError,
    EncoderMismatchError,
    IndexLockedError,
    IndexWriteError,
)
from . import vector_cache
from .files import (
    DB_NAME,
    FAISS_NAME,
    SIDECAR_NAME,
    acquire_lock,
    atomic_write,
    remove_stale_temp_files,
)
from .records import MIGRATIONS, SCHEMA_VERSION, Catalog, from_db, now
from .rows import Rows, guarded
from .vectors import Vectors


class Store(Rows, Vectors):
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
                MIGRATIONS[target](self)
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

    @guarded
    def _generation(self) -> int:
        return self._meta_int("generation")

    @guarded
    def encoder(self) -> tuple[str, str, int] | None:
        """``(name, version, dim)`` of the encoder whose vectors the index holds, or None."""
        name = self.get_meta("encoder")
        if name is None:
            return None
        return name, self.get_meta("encoder_version") or "", self._meta_int("dim")

    @guarded
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
        if self._lock_fd is not None:
            yield
            return
        if self.read_only:  # refused before any work is done, not at the first commit
            raise IndexWriteError(f"cannot use the index in {self.directory} for writing: it is read-only here "
                                  "(is the directory read-only, or not yours?); the index is as it was")
        fd = acquire_lock(self.directory)
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

    @guarded
    def catalog(self) -> Catalog:
        """Everything a search needs to turn segment ids into paths, labels and times.

        It is one snapshot, together with the vectors :meth:`search` will then use.
        """
        with self._snapshot():
            generation = self.generation
            rows = self.db.execute('SELECT id, file_id, start, "end" FROM segments ORDER BY id').fetchall()
            paths = {i: from_db(p) for i, p in self.db.execute("SELECT id, path FROM files").fetchall()}
            labels = {i: from_db(label) for i, label in self.db.execute("SELECT file_id, label FROM labels").fetchall()}
            index = self._index_for(generation)
        self._flush_cache()
        array = np.array(rows, dtype=np.float64).reshape(-1, 4)
        self._pinned = (generation, index)
        return Catalog(array[:, 0].astype(np.int64), array[:, 1].astype(np.int64), array[:, 2], array[:, 3],
                       paths, labels, generation)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())

    # ---- FAISS cache (the rest is in :mod:`.vectors`) ------------------------------
    @guarded
    def save_vector_index(self, index, generation: int | None = None) -> None:
        """Write the FAISS file and its sidecar atomically (temp file, fsync, rename).

        ``generation`` is the database generation ``index`` was built from (default: the
        current one). Hold the lock. Raises :class:`IndexWriteError` if the directory cannot
        be written; the previous files are then left as they were.
        """
        if generation is None:
            generation = self.generation
        blob, sidecar = vector_cache.serialise(index, generation=generation, built_at=now(),
                                               instance=self._instance(), **self._cache_about())
        try:
            remove_stale_temp_files(self.directory)
            # FAISS first: a crash between the two renames leaves a sidecar whose checksum
            # does not match, so the pair is rebuilt, never trusted half-new.
            atomic_write(self.directory / FAISS_NAME, blob)
            atomic_write(self.directory / SIDECAR_NAME, sidecar)
        except OSError as e:
            what = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise IndexWriteError(f"cannot write the vector cache in {self.directory}: {what}; the database is "
                                  "intact and the cache will be rebuilt from it") from None

    def _instance(self) -> str | None:
        """A random id made once per database and named in the sidecar, so that a cache is
        never caught up against another database whose ids happen to match (one recreated in
        the same directory). None inside a transaction that could still roll back."""
        instance = self.get_meta("instance")
        if instance is None and not self.db.conn.in_transaction:
            import uuid

            with self._transaction(bump=False):  # no data changes: readers' snapshots stay valid
                instance = self.get_meta("instance")
                if instance is None:
                    instance = uuid.uuid4().hex
                    self._set_meta("instance", instance)
        return instance

    def close(self) -> None:
        self._faiss = self._pinned = None
        self.db.conn.close()


