"""The store: SQLite is the truth, the FAISS file a cache that is rebuilt when missing, stale or tampered."""

from __future__ import annotations

import pytest

from simsearch import CorruptIndexError, Engine, IndexLockedError
from simsearch.store import FAISS_NAME, SIDECAR_NAME, Store


@pytest.fixture
def built(tmp_path, library):
    with Engine(tmp_path / "index", encoder="features") as engine:
        engine.index([library], label_from_folders=True)
    return tmp_path / "index"


def neighbours(index_dir, clip):
    with Engine(index_dir) as engine:
        return [n.path for n in engine.query([clip], k=5)[0].neighbours]


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "stale"])
def test_faiss_cache_is_rebuilt_from_sqlite(built, library, damage):
    clip = library / "bell" / "bell_1.wav"
    expected = neighbours(built, clip)
    faiss_file = built / FAISS_NAME
    if damage == "delete":
        faiss_file.unlink()
    elif damage == "truncate":
        faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    elif damage == "garbage":
        faiss_file.write_bytes(b"\x00IxMp" * 1000)
    else:  # a write the FAISS file never saw (as after a crash between the two)
        store = Store(built)
        with store.writing():
            store.set_label([1], "changed")
        store.close()
    assert neighbours(built, clip) == expected
    import json

    store = Store(built)
    assert json.loads((built / SIDECAR_NAME).read_text())["generation"] == store.generation, "cache rewritten"
    store.close()


def test_sidecar_records_how_the_index_was_built(built):
    import json

    sidecar = json.loads((built / SIDECAR_NAME).read_text())
    assert sidecar["vectors"] == 16 and sidecar["encoder"] == "features" and sidecar["index_type"].startswith("IDMap2")


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    (tmp_path / "simsearch.db").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(CorruptIndexError, match="simsearch.db"):
        Store(tmp_path)


def test_second_writer_is_refused_naming_the_pid(built, library):
    import os

    first, second = Store(built), Store(built)
    with first.locked():
        with pytest.raises(IndexLockedError, match=f"PID {os.getpid()}"):
            with second.locked():
                pass
    with second.locked():
        pass
