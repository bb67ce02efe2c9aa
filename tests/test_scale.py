"""The store picks its FAISS index by size: exact while small, IVF once it outgrows exact search.

Thresholds are shrunk here so that a few thousand vectors exercise what a million would
(``bench/scale.py`` measures the real sizes): the IVF cache is loaded strictly and never
rebuilt when valid, catches up with adds and deletes instead of rebuilding, keeps filters
exact, and a tampered cache is rebuilt from SQLite, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest

from simsearch import Engine
from simsearch.store import FAISS_NAME, SIDECAR_NAME, FileRecord, Store, vector_cache

DIM = 32


def clustered(n: int, seed: int) -> np.ndarray:
    centres = np.random.default_rng(7).standard_normal((40, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def add(store: Store, vectors: np.ndarray, first: int, per_file: int = 2) -> None:
    with store.writing():
        for f in range(len(vectors) // per_file):
            number = first + f
            record = FileRecord(f"/lib/clip_{number:06d}.wav", 1, 1, f"{number:032x}", 2.0, 16000)
            store.add_file(record, [(0.0, 1.0), (1.0, 2.0)][:per_file], vectors[f * per_file:(f + 1) * per_file])


@pytest.fixture
def small(monkeypatch):
    """Exact search up to 1000 vectors, then 16 lists of which 4 are probed."""
    monkeypatch.setattr(vector_cache, "EXACT_MAX", 1000)
    monkeypatch.setattr(vector_cache, "nlist_for", lambda n: 16)
    monkeypatch.setattr(vector_cache, "nprobe_for", lambda nlist: 4)


@pytest.fixture
def ivf_dir(tmp_path, small):
    """An index of 3000 vectors (1500 files of 2 segments) with an IVF cache on disk."""
    store = Store(tmp_path / "index")
    with store.writing():
        store.set_encoder("test", "1", DIM)
    add(store, clustered(3000, 0), 0)
    store.vector_index()
    store.close()
    return tmp_path / "index"


def sidecar(directory) -> dict:
    return json.loads((directory / SIDECAR_NAME).read_text())


def sqlite_ids(store: Store) -> np.ndarray:
    return np.array([r[0] for r in store.db.execute("SELECT id FROM segments ORDER BY id")], dtype=np.int64)


def test_the_index_type_follows_the_size(tmp_path, small):
    store = Store(tmp_path / "index")
    with store.writing():
        store.set_encoder("test", "1", DIM)
    add(store, clustered(600, 0), 0)
    assert vector_cache.describe_index(store.vector_index()) == "IDMap2,Flat"
    assert sidecar(tmp_path / "index")["index_type"] == "IDMap2,Flat"
    add(store, clustered(1000, 1), 300)  # 1600 vectors: past exact search
    assert vector_cache.describe_index(store.vector_index()) == "IVF16,Flat"
    recorded = sidecar(tmp_path / "index")
    assert (recorded["index_type"], recorded["nlist"], recorded["nprobe"], recorded["vectors"]) == ("IVF16,Flat", 16, 4, 1600)
    store.close()
    assert Engine(tmp_path / "index").info()["index_type"] == "IVF16,Flat"


def test_a_valid_ivf_cache_is_loaded_not_rebuilt(ivf_dir, monkeypatch):
    queries = clustered(20, 9)
    store = Store(ivf_dir)
    expected = store.search(queries, 10)
    store.close()
    monkeypatch.setattr(Store, "_rebuild", lambda self: pytest.fail("rebuilt a valid cache"))
    store = Store(ivf_dir)
    got = store.search(queries, 10)
    assert np.array_equal(got[1], expected[1]) and np.allclose(got[0], expected[0])


def test_adds_and_deletes_catch_up_without_rebuilding(ivf_dir, monkeypatch):
    centroids = lambda index: vector_cache.faiss_format.parse(
        (ivf_dir / FAISS_NAME).read_bytes(), "ivf", index.ntotal, DIM, 16).centroids.copy()
    store = Store(ivf_dir)
    before = centroids(store.vector_index())
    monkeypatch.setattr(Store, "_rebuild", lambda self: pytest.fail("rebuilt from scratch"))
    monkeypatch.setattr(vector_cache, "build", lambda *a: pytest.fail("retrained"))
    new = clustered(200, 3)
    add(store, new, 5000)
    with store.writing():
        store.delete_files(list(range(1, 101)))  # 200 segments
    index = store.vector_index()
    assert np.array_equal(vector_cache.index_ids(index), sqlite_ids(store))
    assert np.array_equal(centroids(index), before), "the centroids were retrained"
    scores, _ = store.search(new[:5], 1)
    assert np.allclose(scores[:, 0], 1, atol=1e-5), "a new vector is its own nearest neighbour"
    store.close()
    reopened = Store(ivf_dir)  # the caught-up cache was saved: loaded as is
    assert np.array_equal(vector_cache.index_ids(reopened.vector_index()), sqlite_ids(reopened))


def test_growing_far_past_the_training_size_retrains(ivf_dir, monkeypatch):
    monkeypatch.setattr(vector_cache, "nlist_for", lambda n: 16 if n < 4000 else 64)
    store = Store(ivf_dir)
    add(store, clustered(2000, 4), 5000)
    assert vector_cache.describe_index(store.vector_index()) == "IVF64,Flat"
    with store.writing():  # shrinking well below the exact-search size goes back to exact
        store.delete_files(list(range(1, 2301)))
    assert vector_cache.describe_index(store.vector_index()) == "IDMap2,Flat"


def exact(store: Store, queries: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    ids = sqlite_ids(store)
    vectors = store._fetch_vectors(ids)
    keep = np.isin(ids, allowed)
    order = np.argsort(-(queries @ vectors[keep].T), axis=1, kind="stable")[:, :k]
    return ids[keep][order]


def test_filters_apply_inside_the_approximate_search(ivf_dir):
    store = Store(ivf_dir)
    queries = clustered(30, 11)
    ids = sqlite_ids(store)
    allowed = ids[ids % 100 == 3]  # 1 %: the search probes every list, so it is exact
    _, found = store.search(queries, 10, allowed_ids=allowed)
    assert np.array_equal(found, exact(store, queries, 10, allowed))
    allowed = ids[ids % 10 == 3]  # 10 %: more lists than without a filter
    _, found = store.search(queries, 10, allowed_ids=allowed)
    assert np.isin(found, allowed).all()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact(store, queries, 10, allowed))])
    assert recall >= 0.9, recall
    excluded = ids[:500]
    _, found = store.search(queries, 10, excluded_ids=excluded)
    assert not np.isin(found, excluded).any()
    _, unfiltered = store.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(unfiltered, exact(store, queries, 10, ids))])
    assert recall >= 0.8, recall


def test_queries_through_the_engine_use_the_ivf_index(ivf_dir):
    with Engine(ivf_dir) as engine:
        vectors = clustered(1, 12)
        result = engine.query_vectors(vectors, k=5, include=["/lib/clip_0000*"], unknown_threshold=0.5)
        assert len(result.neighbours) == 5
        assert all(n.path.startswith("/lib/clip_0000") for n in result.neighbours)


def forge(directory, blob: bytes, **changes) -> None:
    """Replace the cache by ``blob`` with a sidecar made to match (checksum included)."""
    record = {**sidecar(directory), **changes, "sha256": hashlib.sha256(blob).hexdigest()}
    (directory / FAISS_NAME).write_bytes(blob)
    (directory / SIDECAR_NAME).write_text(json.dumps(record))


def tampered(blob: bytes) -> dict[str, tuple[bytes, dict]]:
    header = 37  # fourcc, d, ntotal, two unused int64, is_trained, metric
    centroids_at = header + 16 + header + 8
    lists_at = centroids_at + 16 * DIM * 4 + 1 + 8  # after the centroids and the (empty) direct map
    first_ids_at = len(blob) - 8  # the last id of the last list

    def patched(offset: int, value: bytes) -> bytes:
        return blob[:offset] + value + blob[offset + len(value):]

    return {
        "garbage of the right size": (np.random.default_rng(0).bytes(len(blob)), {}),
        "truncated": (blob[:len(blob) // 2], {}),
        "one byte more": (blob + b"\x00", {}),
        "claims 2**40 vectors": (patched(8, struct.pack("<q", 2**40)), {}),
        "another number of lists": (patched(header, struct.pack("<Q", 17)), {}),
        "nprobe past the lists": (patched(header + 8, struct.pack("<Q", 99)), {}),
        "a NaN centroid": (patched(centroids_at, np.full(2, np.nan, np.float32).tobytes()), {}),
        "list sizes that do not add up": (patched(lists_at + 32, struct.pack("<Q", 10**6)), {}),
        "a duplicated id": (patched(first_ids_at, blob[first_ids_at - 8:first_ids_at]), {}),
        "an id never given": (patched(first_ids_at, struct.pack("<q", 10**9)), {}),
        "an IVF file called flat": (blob, {"kind": "flat"}),
        "a sidecar claiming a huge file": (blob, {"vectors": 10**12}),
        "a sidecar with a count that is text": (blob, {"nlist": "16"}),
    }


def test_a_tampered_ivf_cache_is_rebuilt_from_sqlite_never_a_crash(ivf_dir, monkeypatch):
    queries = clustered(10, 9)
    store = Store(ivf_dir)
    expected = store.search(queries, 10)[1]
    store.close()
    good = (ivf_dir / FAISS_NAME).read_bytes()
    for what, (blob, changes) in tampered(good).items():
        forge(ivf_dir, blob, **changes)
        store = Store(ivf_dir)
        assert np.array_equal(store.search(queries, 10)[1], expected), what
        assert np.array_equal(vector_cache.index_ids(store.vector_index()), sqlite_ids(store)), what
        store.close()
        with monkeypatch.context() as patch:  # what was written back is a valid cache again
            patch.setattr(Store, "_rebuild", lambda self, what=what: pytest.fail(f"{what}: the cache was not rewritten"))
            Store(ivf_dir).vector_index()


def test_a_cache_from_another_database_is_never_caught_up(ivf_dir, tmp_path):
    """Same ids, other vectors, an older generation: as if the database had been recreated."""
    other = tmp_path / "other"
    store = Store(other)
    with store.writing():
        store.set_encoder("test", "1", DIM)
    vectors = clustered(3000, 20)
    add(store, vectors, 0)
    store.vector_index()  # its own cache, and its own instance id
    with store.writing():
        store.set_label([1], "x")  # a generation later than either cache
    store.close()
    for name in (FAISS_NAME, SIDECAR_NAME):
        shutil.copy(ivf_dir / name, other / name)
    store = Store(other)
    scores, ids = store.search(vectors[:5], 1)
    assert np.allclose(scores[:, 0], 1, atol=1e-5) and np.array_equal(ids[:, 0], sqlite_ids(store)[:5])
    assert sidecar(other)["instance"] == store.get_meta("instance") != sidecar(ivf_dir)["instance"]


def test_the_cache_is_written_in_faiss_own_format(ivf_dir):
    """What the store writes is byte for byte what ``faiss.serialize_index`` writes (so FAISS's
    own tools can read it), and both index kinds round-trip through the strict reader."""
    import faiss

    store = Store(ivf_dir)
    for index in (store.vector_index(), vector_cache.build(vector_cache.Layout("flat"), clustered(50, 1),
                                                           np.arange(1, 51), DIM)):
        blob = vector_cache.faiss_format.dump(index)
        assert blob.tobytes() == faiss.serialize_index(index).tobytes()
        layout = vector_cache.layout_of(index)
        parsed = vector_cache.faiss_format.parse(blob, layout.kind, index.ntotal, DIM, layout.nlist)
        assert np.array_equal(parsed.sorted_ids, vector_cache.index_ids(index))
