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

from ..errors import IndexWriteError
from .database import Store
from .files import DB_NAME, FAISS_NAME, LOCK_NAME, SIDECAR_NAME, atomic_write
from .records import SCHEMA_VERSION, Catalog, FileRecord
from .vector_cache import describe_index

__all__ = ["Store", "FileRecord", "Catalog", "SCHEMA_VERSION", "DB_NAME", "FAISS_NAME", "SIDECAR_NAME", "LOCK_NAME",
           "IndexWriteError", "atomic_write", "describe_index"]
