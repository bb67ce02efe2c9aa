"""The rows of the index: reading and writing files, segments, labels and failures.

A mixin of :class:`~simsearch.store.database.Store`, which supplies ``db`` (an sqlite-utils
database), ``_translate`` (SQLite errors to simsearch errors) and the meta helpers. Writes
are meant to run inside :meth:`Store.writing`.
"""

from __future__ import annotations

import functools
import os
import sqlite3

import numpy as np

from .records import FILE_COLUMNS, FileRecord, chunks, from_db, now, record, to_db


def guarded(method):
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


class Rows:
    @guarded
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
            [to_db(record.path), record.size, record.mtime_ns, record.hash, record.duration, record.sample_rate, now()])
        file_id = cur.lastrowid
        self._insert_segments(file_id, bounds, vectors)
        if label is not None:
            self.set_label([file_id], from_db(label[0]), source=label[1])
        return file_id

    def _insert_segments(self, file_id: int, bounds: list[tuple[float, float]], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) != len(bounds) or not np.isfinite(vectors).all():
            raise ValueError(f"{len(bounds)} segments need as many finite vectors, got {vectors.shape}")
        rows = [(file_id, float(s), float(e), vectors[i].tobytes()) for i, (s, e) in enumerate(bounds)]
        self.db.conn.executemany('INSERT INTO segments(file_id, start, "end", vector) VALUES (?,?,?,?)', rows)

    @guarded
    def replace_vectors(self, file_id: int, bounds: list[tuple[float, float]], vectors: np.ndarray) -> None:
        """Swap a file's segments for new ones (re-embedding). Inside :meth:`writing`."""
        self.db.execute("DELETE FROM segments WHERE file_id = ?", [file_id])
        self._insert_segments(file_id, bounds, vectors)

    @guarded
    def set_encoder(self, name: str, version: str, dim: int) -> None:
        """Record which encoder made the vectors. Inside :meth:`writing`."""
        self._set_meta("encoder", name)
        self._set_meta("encoder_version", version)
        self._set_meta("dim", str(dim))

    @guarded
    def all_files(self) -> list[FileRecord]:
        rows = self.db.execute(f"SELECT {FILE_COLUMNS} FROM files ORDER BY id")
        return [record(row) for row in rows.fetchall()]

    @guarded
    def update_file(self, file_id: int, *, path: str, size: int, mtime_ns: int) -> None:
        """Record a move/rename or a touched file; vectors and labels stay. Inside :meth:`writing`.

        Another file indexed at ``path`` (one that was overwritten by the move) is deleted.
        """
        other = self.file_by_path(path)
        if other is not None and other.id != file_id:
            self.delete_files([other.id])
        self.db.execute("UPDATE files SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                        [to_db(path), size, mtime_ns, file_id])

    @guarded
    def delete_files(self, file_ids: list[int]) -> None:
        """Delete files with their segments and labels. Inside :meth:`writing`."""
        for chunk in chunks(list(file_ids), 500):
            marks = ",".join("?" * len(chunk))
            for table, column in (("segments", "file_id"), ("labels", "file_id"), ("files", "id")):
                self.db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", chunk)

    @guarded
    def set_label(self, file_ids: list[int], label: str | None, *, source: str = "manual") -> None:
        """Label (or with ``None`` unlabel) whole files. Inside :meth:`writing`."""
        for file_id in file_ids:
            if label is None:
                self.db.execute("DELETE FROM labels WHERE file_id = ?", [file_id])
            else:
                self.db.execute("INSERT OR REPLACE INTO labels(file_id, label, source) VALUES (?,?,?)",
                                [file_id, to_db(label), source])

    @guarded
    def record_failure(self, path: str, size: int | None, mtime_ns: int | None, reason: str) -> None:
        """Remember that ``path`` (as it was at ``size``/``mtime_ns``) could not be read. Inside :meth:`writing`."""
        self.db.execute("INSERT OR REPLACE INTO failures(path, size, mtime_ns, reason, at) VALUES (?,?,?,?,?)",
                        [to_db(path), size, mtime_ns, to_db(reason), now()])

    @guarded
    def clear_failure(self, path: str) -> None:
        self.db.execute("DELETE FROM failures WHERE path = ?", [to_db(path)])

    @guarded
    def count(self, table: str) -> int:
        return self.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    @guarded
    def file_by_path(self, path: str) -> FileRecord | None:
        row = self.db.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE path = ?", [to_db(path)]).fetchone()
        return record(row) if row else None

    @guarded
    def files_by_hash(self, content_hash: str) -> list[FileRecord]:
        rows = self.db.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE hash = ?", [content_hash]).fetchall()
        return [record(row) for row in rows]

    @guarded
    def hash_prefixes(self) -> np.ndarray:
        """The first 64 bits of every indexed file's content hash: sorted, unique, uint64,
        shape (n_distinct,). A compact answer to "could this content be indexed already?"
        that never says no wrongly. About 1.4 s per million files (the reading, mostly)."""
        prefixes = []
        for (digest,) in self.db.execute("SELECT substr(hash, 1, 16) FROM files"):
            try:
                prefixes.append(int(digest, 16))
            except (TypeError, ValueError):
                continue  # not a digest content_hash makes, so no file's content can match it
        return np.unique(np.array(prefixes, dtype=np.uint64))

    @guarded
    def files_under(self, prefix: str) -> list[FileRecord]:
        """Files whose path equals ``prefix`` or lies in the folder ``prefix``."""
        # Compared as bytes, so names stored as BLOBs (not UTF-8) are found under a folder too.
        exact = os.fsencode(prefix)
        folder = os.fsencode(prefix.rstrip(os.sep) + os.sep)
        rows = self.db.execute(
            f"SELECT {FILE_COLUMNS} FROM files WHERE CAST(path AS BLOB) = ? OR substr(CAST(path AS BLOB), 1, ?) = ?",
            [exact, len(folder), folder]).fetchall()
        return [record(row) for row in rows]

    @guarded
    def failure(self, path: str) -> tuple[int, int, str] | None:
        row = self.db.execute("SELECT size, mtime_ns, reason FROM failures WHERE path = ?", [to_db(path)]).fetchone()
        return (row[0], row[1], from_db(row[2])) if row else None

    @guarded
    def failures(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every file recorded as unreadable, by path."""
        rows = self.db.execute("SELECT path, reason FROM failures").fetchall()
        return sorted((from_db(p), from_db(r)) for p, r in rows)

    @guarded
    def forget_failures(self, paths: list[str]) -> None:
        """Drop the failure records of ``paths`` (files that are gone). Inside :meth:`writing`."""
        for path in paths:
            self.clear_failure(path)

    @guarded
    def label_counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT label, count(*) FROM labels GROUP BY label").fetchall()
        return dict(sorted((from_db(label), n) for label, n in rows))

    @guarded
    def file_vectors(self, file_id: int) -> tuple[list[tuple[float, float]], np.ndarray]:
        rows = self.db.execute('SELECT start, "end", vector FROM segments WHERE file_id = ? ORDER BY id', [file_id]).fetchall()
        dim = self._meta_int("dim")
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return [(r[0], r[1]) for r in rows], vectors

