"""The index on disk: SQLite (source of truth, via sqlite-utils) plus a FAISS cache.

Directory layout (see ``index/README.md``)::

    simsearch.db     files, segments (with their vectors), labels, failures, meta
    vectors.faiss    FAISS index over segment vectors; the FAISS id *is* segments.id
    vectors.json     sidecar: how and from which database generation the FAISS file was built
    lock             held (flock) by the one process allowed to write; holds its PID

Every write transaction bumps ``meta.generation``. The FAISS index is exact (``IDMap2,Flat``)
while the collection is small and an inverted file (``IVF{nlist},Flat``, trained on a sample)
once it outgrows exact search; the sidecar records which. The FAISS file is used only when its
sidecar names this database (``meta.instance``) and its encoder, its checksum matches, its
structure, vector count, dimension and ids agree with SQLite and a random sample of its
vectors is SQLite's byte for byte. One of an older generation is caught up (new segments
added, deleted ones removed) rather than rebuilt; anything else is rebuilt from SQLite, so a
crash between the SQLite commit and the FAISS write loses nothing. The FAISS file is never
handed to FAISS's own parser (it is read as the arrays it must be), and nothing here is ever
unpickled. Both cache files are replaced atomically (temp file, fsync, rename).

Readers see snapshots: the catalog a search uses and the vectors it searches come from the
same database generation, even while a writer commits. This is the only module that touches
SQLite or FAISS; an SQLite failure surfaces as a :class:`~simsearch.errors.SimsearchError`.
"""

from __future__ import annotations

from ..errors import IndexWriteError
from . import vector_cache
from .database import Store
from .files import DB_NAME, FAISS_NAME, LOCK_NAME, SIDECAR_NAME, atomic_write
from .records import SCHEMA_VERSION, Catalog, FileRecord
from .vector_cache import describe_index

__all__ = [
           "DB_NAME",
           "FAISS_NAME",
           "LOCK_NAME",
           "SCHEMA_VERSION",
           "SIDECAR_NAME",
           "Catalog",
           "FileRecord",
           "IndexWriteError",
           "Store",
           "atomic_write",
           "describe_index",
           "vector_cache",
]
