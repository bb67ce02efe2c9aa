"""The FAISS side of the store: build, search, save and (strictly) load the cache file.

The cache holds exactly the vectors of SQLite's ``segments`` with their row ids as FAISS ids.
It is never handed to FAISS's own parser: it is read back as the flat arrays it must be.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from .files import FAISS_NAME, SIDECAR_NAME, read_regular


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


def flat_size(n: int, dim: int) -> int:
    return 2 * _HEADER.size + 8 + 4 * n * dim + 8 + 8 * n


def parse_flat_idmap(blob: bytes, n: int, dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(vectors, ids)`` from a serialised flat inner-product ID map of ``n`` x ``dim``, or
    None if ``blob`` is anything else. Checked field by field, so a damaged or forged file
    is refused here rather than parsed by C++."""
    if len(blob) != flat_size(n, dim):
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




def empty_index(dim: int):
    """An exact inner-product index whose ids are segment row ids."""
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def load_cached(directory: Path, *, generation: int, ids: np.ndarray, dim: int):
    """The cached index if its sidecar names ``generation``, its checksum matches and it holds
    exactly ``ids`` (sorted segment ids) with ``dim``-d vectors; else None (rebuild)."""
    n = len(ids)
    if n == 0 or dim <= 0:
        return None
    raw_sidecar = read_regular(directory / SIDECAR_NAME, max_size=1 << 20)
    try:
        sidecar = json.loads(raw_sidecar) if raw_sidecar is not None else None
    except ValueError:
        return None
    if not isinstance(sidecar, dict) or sidecar.get("generation") != generation \
            or sidecar.get("vectors") != n or sidecar.get("dim") != dim:
        return None
    blob = read_regular(directory / FAISS_NAME, exact_size=flat_size(n, dim))
    if blob is None or sidecar.get("sha256") != hashlib.sha256(blob).hexdigest():
        return None
    parsed = parse_flat_idmap(blob, n, dim)
    if parsed is None or not np.array_equal(parsed[1], ids):
        return None
    index = empty_index(dim)
    index.add_with_ids(parsed[0], parsed[1])
    return index


def serialise(index, *, generation: int, built_at: str, **about) -> tuple[bytes, bytes]:
    """``(faiss_bytes, sidecar_bytes)``: the index and the JSON record of how it was built."""
    import faiss

    blob = faiss.serialize_index(index).tobytes()
    sidecar = {"generation": generation, "index_type": describe_index(index), "vectors": int(index.ntotal),
               "dim": int(index.d), **about, "metric": "inner_product", "faiss_version": faiss.__version__,
               "built_at": built_at, "sha256": hashlib.sha256(blob).hexdigest()}
    return blob, json.dumps(sidecar, indent=2).encode()


def search(index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
    """Top-``k`` ids by inner product per row of ``queries``; ``allowed_ids`` filters inside the search."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if allowed_ids is None:
        return index.search(queries, k)
    params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64)))
    return index.search(queries, k, params=params)
