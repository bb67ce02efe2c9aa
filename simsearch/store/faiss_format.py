"""Strict readers for the two FAISS files the cache may hold, field by field, in numpy.

A cache file comes from disk, so it is data, never code: FAISS's own C++ parser never sees
it (a forged length field could make it allocate or read anything). These readers accept
exactly the layout ``faiss.serialize_index`` writes for

* ``IndexIDMap2(IndexFlatIP(d))`` (exact search), and
* ``IndexIVFFlat(IndexFlatIP(d), d, nlist, METRIC_INNER_PRODUCT)`` with no direct map and
  array inverted lists (approximate search),

and return plain arrays, or None for anything else. The index is then rebuilt from the
arrays through the FAISS API (:func:`simsearch.store.vector_cache.from_parsed`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

# Index header: fourcc, d int32, ntotal int64, two int64 FAISS ignores, is_trained uint8,
# metric int32 (0 = inner product).
HEADER = struct.Struct("<4siqqqBi")
_U64 = struct.Struct("<Q")


@dataclass
class Parsed:
    """The content of a cache file.

    ``parts`` holds ``(ids (m,) int64, vectors (m, dim) float32)`` views into the file's
    bytes: one part for a flat index, one per inverted list (empty ones included) for IVF.
    ``centroids`` is ``(nlist, dim)`` for IVF, else None.
    """

    kind: str  # "flat" or "ivf"
    dim: int
    parts: list[tuple[np.ndarray, np.ndarray]]
    centroids: np.ndarray | None = None
    nprobe: int = 0
    sorted_ids: np.ndarray | None = None
    """All ids, sorted (set by :func:`parse`, which checks they are distinct)."""

    @property
    def ntotal(self) -> int:
        return sum(len(ids) for ids, _ in self.parts)

    def ids(self) -> np.ndarray:
        """All ids, ``(ntotal,)``, in storage order."""
        return np.concatenate([ids for ids, _ in self.parts]) if self.parts else np.zeros(0, np.int64)

    def vectors_at(self, positions: np.ndarray) -> np.ndarray:
        """Vectors ``(len(positions), dim)`` at ``positions`` of :meth:`ids`."""
        ends = np.cumsum([len(ids) for ids, _ in self.parts])
        out = np.empty((len(positions), self.dim), np.float32)
        for row, at in enumerate(np.asarray(positions)):
            part = int(np.searchsorted(ends, at, side="right"))
            out[row] = self.parts[part][1][at - (ends[part] - len(self.parts[part][0]))]
        return out


class _Refused(Exception):
    pass


class _Reader:
    def __init__(self, blob: bytes | memoryview):
        self.blob, self.at = memoryview(blob), 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.at + n > len(self.blob):
            raise _Refused
        view = self.blob[self.at:self.at + n]
        self.at += n
        return view

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def expect(self, value: bytes) -> None:
        if bytes(self.take(len(value))) != value:
            raise _Refused

    def header(self, fourcc: bytes, dim: int, ntotal: int) -> None:
        got, d, n, _, _, trained, metric = HEADER.unpack(self.take(HEADER.size))
        if (got, d, n, trained, metric) != (fourcc, dim, ntotal, 1, 0):
            raise _Refused

    def array(self, dtype, count: int, expected_count: int | None = None) -> np.ndarray:
        """A FAISS ``std::vector``: its element count (checked) then the elements."""
        if expected_count is not None and count != expected_count:
            raise _Refused
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * size), dtype=dtype, count=count)

    def flat_codes(self, n: int, dim: int) -> np.ndarray:
        """The float32 ``(n, dim)`` vectors of an ``IxFI`` index, after its header."""
        return self.array(np.float32, self.u64(), n * dim).reshape(n, dim)


def flat_size(n: int, dim: int) -> int:
    """Bytes of a serialised ``IDMap2,Flat`` of ``n`` x ``dim``."""
    return 2 * HEADER.size + 8 + 4 * n * dim + 8 + 8 * n


def ivf_max_size(n: int, dim: int, nlist: int) -> int:
    """An upper bound on the bytes of a serialised ``IVF{nlist},Flat`` of ``n`` x ``dim``."""
    return 2 * HEADER.size + 64 + 4 * nlist * dim + 16 * nlist + 28 + n * (4 * dim + 8)


def parse(blob: bytes | memoryview, kind: str, n: int, dim: int, nlist: int = 0) -> Parsed | None:
    """The content of a serialised ``kind`` index of ``n`` vectors of ``dim`` (and ``nlist``
    lists), or None when ``blob`` is anything else, down to the last byte. Vectors and
    centroids must be finite, ids distinct and positive."""
    try:
        reader = _Reader(blob)
        parsed = _parse_flat(reader, n, dim) if kind == "flat" else _parse_ivf(reader, n, dim, nlist)
        if reader.at != len(reader.blob):
            return None
        ids = np.sort(parsed.ids())  # sorting (not a hash set) finds duplicates fastest
        if len(ids) and (ids[0] < 1 or not (np.diff(ids) > 0).all()):
            return None
        parsed.sorted_ids = ids
        if not all(np.isfinite(v).all() for _, v in parsed.parts):
            return None
        if parsed.centroids is not None and not np.isfinite(parsed.centroids).all():
            return None
        return parsed
    except (_Refused, struct.error, ValueError):
        return None


def _parse_flat(reader: _Reader, n: int, dim: int) -> Parsed:
    reader.header(b"IxM2", dim, n)
    reader.header(b"IxFI", dim, n)
    vectors = reader.flat_codes(n, dim)
    ids = reader.array(np.int64, reader.u64(), n)
    return Parsed("flat", dim, [(ids, vectors)])


def _parse_ivf(reader: _Reader, n: int, dim: int, nlist: int) -> Parsed:
    reader.header(b"IwFl", dim, n)
    if reader.u64() != nlist or nlist < 1:
        raise _Refused
    nprobe = reader.u64()
    if not 1 <= nprobe <= nlist:
        raise _Refused
    reader.header(b"IxFI", dim, nlist)  # the coarse quantizer: the centroids, exactly
    centroids = reader.flat_codes(nlist, dim)
    if bytes(reader.take(1)) != b"\x00" or reader.u64() != 0:  # no direct map
        raise _Refused
    reader.expect(b"ilar")
    if reader.u64() != nlist or reader.u64() != 4 * dim:
        raise _Refused
    sizes = np.zeros(nlist, np.int64)
    layout = bytes(reader.take(4))
    if layout == b"full":
        sizes[:] = reader.array(np.uint64, reader.u64(), nlist)
    elif layout == b"sprs":  # FAISS writes (list, size) pairs when most lists are empty
        count = reader.u64()
        if count % 2:
            raise _Refused
        pairs = reader.array(np.uint64, count).reshape(-1, 2)
        if len(pairs) and (pairs[:, 0].max() >= nlist or len(np.unique(pairs[:, 0])) != len(pairs)):
            raise _Refused
        sizes[pairs[:, 0].astype(np.int64)] = pairs[:, 1]
    else:
        raise _Refused
    if sizes.min(initial=0) < 0 or int(sizes.sum()) != n:
        raise _Refused
    parts = []
    for size in sizes.tolist():
        vectors = np.frombuffer(reader.take(size * 4 * dim), dtype=np.float32).reshape(size, dim)
        ids = np.frombuffer(reader.take(size * 8), dtype=np.int64)
        parts.append((ids, vectors))
    return Parsed("ivf", dim, parts, centroids=centroids, nprobe=nprobe)


class _Writer:
    def __init__(self, size: int):
        self.out, self.at = np.empty(size, dtype=np.uint8), 0

    def put(self, data) -> None:
        raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else \
            np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        self.out[self.at:self.at + len(raw)] = raw
        self.at += len(raw)

    def header(self, fourcc: bytes, dim: int, ntotal: int) -> None:
        self.put(HEADER.pack(fourcc, dim, ntotal, 1 << 20, 1 << 20, 1, 0))

    def vector(self, array: np.ndarray) -> None:
        """A FAISS ``std::vector``: element count, then the elements."""
        self.put(_U64.pack(array.size))
        self.put(array)


def dump(index) -> np.ndarray:
    """The bytes ``faiss.serialize_index(index)`` gives for the two kinds :func:`parse` reads,
    written straight from the index's own arrays into one buffer: a million vectors cost
    one copy, where FAISS's serialiser makes two (and holds both at once)."""
    import faiss

    dim, n = int(index.d), int(index.ntotal)
    if isinstance(index, faiss.IndexIVFFlat):
        invlists = faiss.downcast_InvertedLists(index.invlists)
        nlist = int(index.nlist)
        sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.uint64)
        nonzero = np.flatnonzero(sizes)
        full = len(nonzero) > nlist // 2  # FAISS's own choice between its two layouts
        table = sizes if full else np.stack([nonzero.astype(np.uint64), sizes[nonzero]], axis=1).reshape(-1)
        size = 2 * HEADER.size + 16 + 8 + 4 * nlist * dim + 9 + 4 + 16 + 4 + 8 + 8 * table.size + n * (4 * dim + 8)
        writer = _Writer(size)
        writer.header(b"IwFl", dim, n)
        writer.put(_U64.pack(nlist) + _U64.pack(int(index.nprobe)))
        quantizer = faiss.downcast_index(index.quantizer)
        writer.header(b"IxFI", dim, nlist)
        writer.vector(faiss.rev_swig_ptr(quantizer.get_xb(), nlist * dim))
        writer.put(b"\x00" + _U64.pack(0))  # no direct map
        writer.put(b"ilar" + _U64.pack(nlist) + _U64.pack(4 * dim) + (b"full" if full else b"sprs"))
        writer.vector(table)
        for i in nonzero.tolist():
            count = int(sizes[i])
            writer.put(faiss.rev_swig_ptr(invlists.get_codes(i), count * 4 * dim))
            writer.put(faiss.rev_swig_ptr(invlists.get_ids(i), count))
    else:
        writer = _Writer(flat_size(n, dim))
        writer.header(b"IxM2", dim, n)
        writer.header(b"IxFI", dim, n)
        flat = faiss.downcast_index(index.index)
        writer.vector(faiss.rev_swig_ptr(flat.get_xb(), n * dim) if n else np.zeros(0, np.float32))
        writer.vector(faiss.vector_to_array(index.id_map))
    if writer.at != len(writer.out):
        raise AssertionError(f"wrote {writer.at} of {len(writer.out)} bytes")  # a layout this module does not know
    return writer.out
