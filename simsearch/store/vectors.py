"""The FAISS cache of a :class:`~simsearch.store.database.Store`: which index a snapshot
searches, how it is brought up to date, and the search itself.

A mixin of ``Store``, which supplies ``db``, ``directory``, the snapshot and lock helpers,
:meth:`save_vector_index` and the meta helpers. The cache is a pure function of SQLite's
``segments``: loaded when every check passes (:func:`vector_cache.load_cached`), caught up
when it is of an older generation of this same database, else rebuilt.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptIndexError, IndexLockedError, IndexWriteError
from . import vector_cache
from .files import DB_NAME
from .records import chunks
from .rows import guarded


class Vectors:
    @guarded
    def vector_index(self):
        """The FAISS index over all segments: the cached one (caught up if it is older), or
        one rebuilt from SQLite.

        An index that changed is written back to the cache by the writer, or by a reader when
        no writer is active; a reader that cannot write (read-only directory) just uses it.
        """
        with self._snapshot():
            index = self._index_for(self.generation)
        self._flush_cache()
        return index

    def _index_for(self, generation: int):
        """The index of ``generation``, which the caller's snapshot is reading. One that was
        caught up or rebuilt is left in ``_unsaved`` for :meth:`_flush_cache`, once the
        snapshot is over."""
        if self._faiss is not None and self._faiss[0] == generation:
            return self._faiss[1]
        ids = self._segment_ids()
        index, on_disk = None, False  # on_disk: the cache files already hold this index
        if self._faiss is not None and self._faiss[0] < generation:
            # Ours, built from this database: trusted. One that a pinned catalog searches, or
            # that is about to take uncommitted rows, is copied rather than changed in place.
            base = self._faiss[1]
            if self._write_depth or (self._pinned is not None and self._pinned[1] is base):
                base = vector_cache.clone(base)
            index = vector_cache.catch_up(base, ids, self._fetch_vectors)
        if index is None and (loaded := self._load_cached(generation, ids)) is not None:
            index, built_at = loaded
            on_disk = built_at == generation
            if not on_disk:
                index = vector_cache.catch_up(index, ids, self._fetch_vectors)
        if index is None:
            index = self._rebuild()
        if self._write_depth:  # made from uncommitted rows: neither kept nor saved
            return index
        if not on_disk:
            self._unsaved = (generation, index)
        self._faiss = (generation, index)
        return index

    def _flush_cache(self) -> None:
        """Write a caught-up or rebuilt index to the cache files (see :meth:`vector_index`)."""
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
        cursor = self.db.execute("SELECT id FROM segments ORDER BY id")
        return np.fromiter((r[0] for r in cursor), dtype=np.int64)

    def _max_segment_id(self) -> int:
        """The largest segment id ever given (AUTOINCREMENT never gives one twice)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'segments'").fetchone()
        return int(row[0]) if row and isinstance(row[0], int) else 0

    def _cache_about(self) -> dict:
        """What a cache must have been built with to be usable: the current encoder."""
        return {"encoder": self.get_meta("encoder"), "encoder_version": self.get_meta("encoder_version")}

    def _load_cached(self, generation: int, ids: np.ndarray):
        """``(index, generation it was built at)`` from the cache files if every check passes,
        else None."""
        return vector_cache.load_cached(self.directory, generation=generation, instance=self.get_meta("instance"),
                                          ids=ids, dim=self._meta_int("dim"), max_id=self._max_segment_id(),
                                          about=self._cache_about(), fetch=self._fetch_vectors)

    def _dim(self) -> int:
        return self._meta_int("dim", 1) or 1

    def _vectors_from(self, rows: list, dim: int) -> tuple[np.ndarray, np.ndarray]:
        bad = next((r[0] for r in rows if not isinstance(r[1], bytes) or len(r[1]) != 4 * dim), None)
        if bad is not None:
            raise CorruptIndexError(f"{self.directory / DB_NAME}: segment {bad} does not hold a vector of "
                                    f"{dim} float32 values; the database is damaged")
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        return ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)

    def _fetch_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors ``(len(ids), dim)`` of sorted segment ``ids`` (all of which exist)."""
        dim, parts = self._dim(), []
        for chunk in chunks(np.asarray(ids).tolist(), 900):
            rows = self.db.execute(f"SELECT id, vector FROM segments WHERE id IN ({','.join('?' * len(chunk))}) "
                                   "ORDER BY id", chunk).fetchall()
            got, vectors = self._vectors_from(rows, dim)
            if not np.array_equal(got, chunk):
                raise CorruptIndexError(f"{self.directory / DB_NAME}: segments changed while being read")
            parts.append(vectors)
        return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

    def _rebuild(self):
        """A fresh index of every segment in SQLite, of the layout its size calls for."""
        dim = self._dim()
        n = self.db.execute("SELECT count(*) FROM segments").fetchone()[0]
        layout = vector_cache.layout_for(n)
        ids, vectors = np.zeros(n, np.int64), np.zeros((n, dim), np.float32)
        cursor, at = self.db.execute("SELECT id, vector FROM segments ORDER BY id"), 0
        while rows := cursor.fetchmany(65536):
            ids[at:at + len(rows)], vectors[at:at + len(rows)] = self._vectors_from(rows, dim)
            at += len(rows)
        return vector_cache.build(layout, vectors[:at], ids[:at], dim)

    def search(self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
               excluded_ids: np.ndarray | None = None):
        """Top-``k`` segments by inner product for each row of ``queries`` ``(q, dim)``.

        ``allowed_ids`` (sorted) or ``excluded_ids`` restrict the search itself (a FAISS ID
        selector), so filtering happens before the top k are taken. Returns ``(scores, ids)``,
        each ``(q, k)``; missing results have id -1. The vectors searched are those of the
        snapshot the last :meth:`catalog` returned (so every id found is in it), or the
        latest before any.
        """
        index = self._pinned[1] if self._pinned is not None else self.vector_index()
        return vector_cache.search(index, queries, k, allowed_ids, excluded_ids)
