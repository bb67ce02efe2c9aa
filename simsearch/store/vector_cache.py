"""The FAISS side of the store: pick the index type by size, build, catch up, search, save, load.

Exact search (``IDMap2,Flat``) while the collection is small; an inverted-file index
(``IVF{nlist},Flat``, trained on a sample of the vectors) once it outgrows exact search.
The cache holds the vectors of SQLite's ``segments`` with their row ids as FAISS ids. It is
never handed to FAISS's own parser: :mod:`simsearch.store.faiss_format` reads it back as the
flat arrays it must be, and it is used only when its checksum matches and its ids (and a
random sample of its vectors) agree with SQLite.

A cache of an older database generation is caught up (vectors of new rows added, those of
deleted rows removed) instead of rebuilt: segment ids are never reused (AUTOINCREMENT) and a
segment's vector never changes, so an id names the same vector in every generation.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import faiss_format
from .files import FAISS_NAME, SIDECAR_NAME, read_regular

EXACT_MAX = 65_536
"""Up to this many vectors search is exact; above it an IVF index is trained. Flat search
costs ``n * dim`` multiply-adds per query: at 64k x 128 about a millisecond on one core."""

TRAIN_PER_LIST = 64
"""k-means sample per inverted list: enough for stable centroids, small enough to train a
1M-vector index in seconds."""

SAMPLE_CHECKS = 64
"""Vectors of a loaded cache compared with SQLite's, at random: a cache made from another
database, or another branch of this one, is caught even when its ids happen to match."""

Fetch = Callable[[np.ndarray], np.ndarray]
"""``fetch(ids)``: the vectors ``(len(ids), dim)`` SQLite holds for sorted segment ``ids``."""


@dataclass(frozen=True)
class Layout:
    """What kind of index a collection gets: ``kind`` "flat" or "ivf"; for IVF the number of
    lists and the lists probed per query."""

    kind: str
    nlist: int = 0
    nprobe: int = 0

    def name(self) -> str:
        return "IDMap2,Flat" if self.kind == "flat" else f"IVF{self.nlist},Flat"


def nlist_for(n: int) -> int:
    """A power of two near ``sqrt(n)``, 256 to 4096: lists of about sqrt(n) vectors each."""
    return int(min(4096, max(256, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))


def nprobe_for(nlist: int) -> int:
    """Lists scanned per query: 1/8 of a small index, 1/32 of a large one (recall@10 >= 0.95
    on clustered 128-d vectors; see ``bench/scale.py``)."""
    return min(nlist, max(32, nlist // 32))


def layout_for(n: int, current: Layout | None = None) -> Layout:
    """The layout ``n`` vectors should have, keeping ``current`` while it still fits.

    An IVF index is kept while the number of lists the size calls for is within a factor 2
    of its own (the collection stays within about 4x of the size it was trained at) and the
    collection above half of :data:`EXACT_MAX` (so adding and deleting around the threshold
    does not flip back and forth); outside that it is retrained, which is a rebuild.
    """
    if current is not None and current.kind == "ivf" and EXACT_MAX // 2 <= n and \
            current.nlist // 2 <= nlist_for(n) <= 2 * current.nlist:
        return current
    if n <= EXACT_MAX:
        return Layout("flat")
    nlist = nlist_for(n)
    return Layout("ivf", nlist, nprobe_for(nlist))


def layout_of(index) -> Layout:
    import faiss

    if isinstance(index, faiss.IndexIVFFlat):
        return Layout("ivf", int(index.nlist), int(index.nprobe))
    return Layout("flat")


def describe_index(index) -> str:
    """A short name for a FAISS index in the factory's notation, e.g. ``IVF1024,Flat``."""
    return layout_of(index).name()


def empty_index(dim: int):
    """An exact inner-product index whose ids are segment row ids."""
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def index_ids(index) -> np.ndarray:
    """The ids an index holds, sorted ``(ntotal,)``."""
    import faiss

    if isinstance(index, faiss.IndexIVFFlat):
        invlists = faiss.downcast_InvertedLists(index.invlists)
        parts = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                 for i in range(index.nlist) if invlists.list_size(i)]
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    else:
        ids = faiss.vector_to_array(index.id_map)
    return np.sort(ids)


def build(layout: Layout, vectors: np.ndarray, ids: np.ndarray, dim: int):
    """A new index of ``layout`` holding ``vectors`` ``(n, dim)`` under ``ids`` ``(n,)``.

    IVF centroids are trained on a seeded sample of :data:`TRAIN_PER_LIST` vectors per list.
    """
    import faiss

    if layout.kind == "flat":
        index = empty_index(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, layout.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = TRAIN_PER_LIST
        sample = np.random.default_rng(0).choice(len(vectors), min(len(vectors), TRAIN_PER_LIST * layout.nlist),
                                                 replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = layout.nprobe
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    return index


def catch_up(index, ids: np.ndarray, fetch: Fetch, *, chunk: int = 50_000):
    """Bring ``index`` to hold exactly the sorted segment ``ids``, in place; returns it, or
    None when a fresh build is better: the size calls for another layout, or more than half
    the vectors changed (a re-embedding: IVF centroids trained on the old vectors would no
    longer fit the new ones)."""
    import faiss

    held = index_ids(index)
    if np.array_equal(held, ids):
        return index
    layout = layout_of(index)
    if layout_for(len(ids), layout) != layout:
        return None
    removed = held[~np.isin(held, ids, assume_unique=True)]
    added = ids[~np.isin(ids, held, assume_unique=True)]
    if len(removed) + len(added) > max(len(ids), len(held)) // 2:
        return None
    if len(removed):
        index.remove_ids(faiss.IDSelectorBatch(removed))
    for start in range(0, len(added), chunk):
        part = added[start:start + chunk]
        index.add_with_ids(np.ascontiguousarray(fetch(part), dtype=np.float32), part)
    return index


def from_parsed(parsed: faiss_format.Parsed):
    """The FAISS index holding what :func:`faiss_format.parse` read, through the FAISS API."""
    import faiss

    if parsed.kind == "flat":
        index = empty_index(parsed.dim)
        ids, vectors = parsed.parts[0]
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(ids))
        return index
    quantizer = faiss.IndexFlatIP(parsed.dim)
    quantizer.add(np.ascontiguousarray(parsed.centroids))
    index = faiss.IndexIVFFlat(quantizer, parsed.dim, len(parsed.centroids), faiss.METRIC_INNER_PRODUCT)
    # Each list is filled with exactly the entries it had: no vector is re-assigned, so a
    # load costs a copy, not n x nlist inner products.
    for number, (ids, vectors) in enumerate(parsed.parts):
        if len(ids):
            ids, codes = np.ascontiguousarray(ids), np.ascontiguousarray(vectors).view(np.uint8)
            index.invlists.add_entries(number, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    index.ntotal = parsed.ntotal
    index.nprobe = parsed.nprobe
    return index


def load_cached(directory: Path, *, generation: int, instance: str | None, ids: np.ndarray, dim: int,
                max_id: int, about: dict, fetch: Fetch):
    """The cached index and the generation it was built at, or None (rebuild).

    Used only when the sidecar names this database (``instance``; without one, only the
    current ``generation`` is accepted), the same encoder (``about``), ``dim`` and a
    generation no newer than ``generation``; the file's checksum matches; it parses strictly;
    its ids are distinct, at most ``max_id`` (the largest segment id ever given) and, at the
    current generation, exactly ``ids``; and :data:`SAMPLE_CHECKS` of its vectors, at random,
    are byte for byte SQLite's.
    """
    raw_sidecar = read_regular(directory / SIDECAR_NAME, max_size=1 << 20)
    try:
        sidecar = json.loads(raw_sidecar) if raw_sidecar is not None else None
    except ValueError:
        return None
    if not isinstance(sidecar, dict) or dim <= 0:
        return None
    built_at, n, kind = sidecar.get("generation"), sidecar.get("vectors"), sidecar.get("kind", "flat")
    nlist = sidecar.get("nlist", 0)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (built_at, n, nlist)):
        return None
    same_database = instance is not None and sidecar.get("instance") == instance
    if not (built_at == generation or (same_database and 0 <= built_at < generation)):
        return None
    if sidecar.get("dim") != dim or not 0 < n <= max_id or any(sidecar.get(k) != v for k, v in about.items()):
        return None
    if kind == "flat":
        blob = read_regular(directory / FAISS_NAME, exact_size=faiss_format.flat_size(n, dim))
    elif kind == "ivf" and 1 <= nlist <= 1 << 20:
        blob = read_regular(directory / FAISS_NAME, max_size=faiss_format.ivf_max_size(n, dim, nlist))
    else:
        return None
    if blob is None or sidecar.get("sha256") != hashlib.sha256(blob).hexdigest():
        return None
    parsed = faiss_format.parse(blob, kind, n, dim, nlist)
    if parsed is None:
        return None
    held = parsed.ids()
    if parsed.sorted_ids[-1] > max_id or (built_at == generation and not np.array_equal(parsed.sorted_ids, ids)):
        return None
    kept = np.flatnonzero(np.isin(held, ids, assume_unique=True))
    if len(kept):
        sample = np.sort(np.random.default_rng().choice(kept, min(len(kept), SAMPLE_CHECKS), replace=False))
        order = np.argsort(held[sample])
        if not np.array_equal(parsed.vectors_at(sample[order]), fetch(held[sample[order]])):
            return None
    index = from_parsed(parsed)
    del parsed, blob
    return index, built_at


def serialise(index, *, generation: int, built_at: str, **about) -> tuple[np.ndarray, bytes]:
    """``(faiss_bytes, sidecar_bytes)``: the index in FAISS's own format (a uint8 array) and
    the JSON record of how it was built."""
    import faiss

    blob = faiss_format.dump(index)
    layout = layout_of(index)
    sidecar = {"generation": generation, "index_type": layout.name(), "kind": layout.kind, "vectors": int(index.ntotal),
               "dim": int(index.d), **about, "metric": "inner_product", "faiss_version": faiss.__version__,
               "built_at": built_at, "sha256": hashlib.sha256(blob).hexdigest()}
    if layout.kind == "ivf":
        sidecar.update(nlist=layout.nlist, nprobe=layout.nprobe)
    return blob, json.dumps(sidecar, indent=2).encode()


def clone(index):
    """A deep copy (an index that searches may still be using is never changed in place)."""
    import faiss

    return faiss.clone_index(index)


def search(index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
           excluded_ids: np.ndarray | None = None):
    """Top-``k`` ids by inner product per row of ``queries`` ``(q, dim)``.

    ``allowed_ids`` (sorted) or ``excluded_ids`` filter inside the search, as a FAISS ID
    selector. An IVF index probes more lists when the filter leaves only a fraction ``f`` of
    the vectors (``nprobe / sqrt(f)``: a 10 % filter keeps recall@10 near 0.99 at 1M), and
    every list when that still finds fewer than ``k`` while more are allowed, so a narrow
    filter returns its nearest instead of the few allowed ones in the usual lists.
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    selector, keep, available = None, [], int(index.ntotal)
    if allowed_ids is not None:
        allowed_ids = np.asarray(allowed_ids, dtype=np.int64)
        bits = np.zeros(int(allowed_ids[-1]) + 1 if len(allowed_ids) else 1, dtype=bool)
        bits[allowed_ids] = True
        bitmap = np.packbits(bits, bitorder="little")  # FAISS tests bit (id & 7) of byte id >> 3
        selector, keep = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), [bitmap]
        available = min(available, len(allowed_ids))
    elif excluded_ids is not None and len(excluded_ids):
        inner = faiss.IDSelectorBatch(np.ascontiguousarray(excluded_ids, dtype=np.int64))
        selector, keep = faiss.IDSelectorNot(inner), [inner]
        available = max(0, available - len(excluded_ids))
    if not isinstance(index, faiss.IndexIVFFlat):
        if selector is None:
            return index.search(queries, k)
        return index.search(queries, k, params=faiss.SearchParameters(sel=selector))
    fraction = available / max(1, index.ntotal)
    nprobe = index.nlist if fraction <= 0 else min(index.nlist, math.ceil(index.nprobe / math.sqrt(fraction)))
    params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe) if selector else faiss.SearchParametersIVF(nprobe=nprobe)
    scores, ids = index.search(queries, k, params=params)
    if nprobe < index.nlist and (ids < 0).any() and (ids >= 0).sum(axis=1).min() < min(k, available):
        params.nprobe = index.nlist  # every list: exact, within the filter
        scores, ids = index.search(queries, k, params=params)
    del keep  # the selector's arrays had to outlive the searches
    return scores, ids
