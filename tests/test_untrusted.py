"""Untrusted files: an index directory (or a weights file) from elsewhere is data, never code.

Nothing is ever unpickled; a tampered, truncated or forged FAISS file is refused before any
C++ parser sees it and rebuilt from SQLite (even when the sidecar's checksum was forged to
match); a damaged database is a clear error naming it; symlinks planted in the index
directory are not followed; the schema version is checked: a newer one is refused untouched,
an older one migrated.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import sqlite3
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import simsearch
from conftest import KINDS, write_wav
from simsearch import CorruptIndexError, Engine, synth
from simsearch.cli import app
from simsearch.store import DB_NAME, FAISS_NAME, LOCK_NAME, SCHEMA_VERSION, SIDECAR_NAME, Store

PACKAGE = Path(simsearch.__file__).parent


def calls(tree: ast.AST, dotted: set[str]):
    """Calls in ``tree`` whose function is spelled as one of ``dotted`` (e.g. ``torch.load``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in dotted:
                yield name, node


def test_no_code_path_can_unpickle():
    """Read the package's own source: no pickle-family module, torch.load only with
    weights_only=True, numpy.load never with allow_pickle=True, no FAISS file parser."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            problems += [f"{path.name}: imports {n}" for n in names
                         if n.split(".")[0] in {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}]
        for name, call in calls(tree, {"torch.load"}):
            if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords):
                problems.append(f"{path.name}:{call.lineno}: {name} without weights_only=True")
        for name, call in calls(tree, {"np.load", "numpy.load"}):
            if any(k.arg == "allow_pickle" and getattr(k.value, "value", None) is not False for k in call.keywords):
                problems.append(f"{path.name}:{call.lineno}: {name} with allow_pickle")
        for name, call in calls(tree, {"faiss.read_index", "faiss.deserialize_index", "read_index", "deserialize_index"}):
            problems.append(f"{path.name}:{call.lineno}: {name} parses a file from the index directory")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """An index of a 16-clip labelled library, built once, and the answer to one query on it."""
    root = tmp_path_factory.mktemp("untrusted")
    library = root / "library"
    for k, kind in enumerate(KINDS):
        for i in range(4):
            write_wav(library / kind / f"{kind}_{i}.wav", synth.make(kind, 100 * k + i))
    with Engine(root / "index", encoder="features") as engine:
        engine.index([library], label_from_folders=True)
        answer = engine.query([library / "bell" / "bell_1.wav"], k=5)[0]
    return root / "index", answer, library / "bell" / "bell_1.wav"


@pytest.fixture
def built(pristine, tmp_path):
    """A copy of the pristine index for one test to damage."""
    index, answer, clip = pristine
    shutil.copytree(index, tmp_path / "index")
    return tmp_path / "index", answer, clip


class Payload:
    """Unpickling this would create a marker file: proof that something ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def forge(index: Path, blob: bytes) -> None:
    """Replace the FAISS file by ``blob`` with a sidecar made to match it (checksum included):
    what someone who rewrites both files can do."""
    sidecar = json.loads((index / SIDECAR_NAME).read_text())
    sidecar["sha256"] = hashlib.sha256(blob).hexdigest()
    (index / FAISS_NAME).write_bytes(blob)
    (index / SIDECAR_NAME).write_text(json.dumps(sidecar))


def tampered_blobs(blob: bytes, n: int, dim: int, marker: Path) -> dict[str, bytes]:
    header = struct.Struct("<4siqqqBi")
    codes_at = 2 * header.size + 8
    ids_at = codes_at + 4 * n * dim + 8
    rng = np.random.default_rng(0)

    def patched(offset: int, value: bytes) -> bytes:
        return blob[:offset] + value + blob[offset + len(value):]

    return {
        "a pickle": pickle.dumps(Payload(marker)),
        "garbage of the right size": rng.bytes(len(blob)),
        "truncated": blob[:len(blob) // 2],
        "claims 2**40 vectors": patched(8, struct.pack("<q", 2**40)),
        "another dimension": patched(4, struct.pack("<i", dim + 1)),
        "ids that are not the database's": blob[:ids_at + 8] + (np.frombuffer(blob[ids_at + 8:], np.int64) + 1000).tobytes(),
        "NaN vectors": patched(codes_at + 8, np.full(4, np.nan, np.float32).tobytes()),
        "euclidean metric": patched(header.size - 4, struct.pack("<i", 1)),
    }


def test_forged_faiss_files_are_refused_and_rebuilt(built, tmp_path):
    index, answer, clip = built
    good = (index / FAISS_NAME).read_bytes()
    sidecar = json.loads((index / SIDECAR_NAME).read_text())
    marker = tmp_path / "code-ran"
    for what, blob in tampered_blobs(good, sidecar["vectors"], sidecar["dim"], marker).items():
        forge(index, blob)
        with Engine(index) as engine:
            assert engine.query([clip], k=5)[0] == answer, what
        assert not marker.exists(), f"{what}: something was unpickled"
        assert (index / FAISS_NAME).read_bytes() != blob, f"{what}: the forged file was kept"


@pytest.mark.parametrize("plant", ["faiss is /dev/zero", "sidecar is /dev/zero", "sidecar is a list",
                                   "sidecar is not JSON", "faiss is a directory"])
def test_odd_things_planted_as_cache_files_are_ignored(built, plant):
    index, answer, clip = built
    name = FAISS_NAME if plant.startswith("faiss") else SIDECAR_NAME
    (index / name).unlink()
    if plant.endswith("/dev/zero"):  # would be read forever if followed
        os.symlink("/dev/zero", index / name)
    elif plant.endswith("a directory"):
        (index / name).mkdir()
    else:
        (index / name).write_text("[1, 2, 3]" if plant.endswith("list") else "{not json")
    with Engine(index) as engine:
        assert engine.query([clip], k=5)[0] == answer


def test_a_valid_cache_is_used_without_rebuilding(built, monkeypatch):
    """The strict reader must accept what this FAISS version writes, or every open would
    silently rebuild."""
    index, answer, clip = built
    monkeypatch.setattr(Store, "_rebuild", lambda self: pytest.fail("rebuilt a valid cache"))
    with Engine(index) as engine:
        assert engine.query([clip], k=5)[0] == answer


def test_a_lock_file_planted_as_a_symlink_is_not_followed(built, tmp_path):
    index, _, clip = built
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate me")
    (index / LOCK_NAME).unlink()
    os.symlink(victim, index / LOCK_NAME)
    with Engine(index) as engine, pytest.raises(CorruptIndexError, match="symbolic link"):
        engine.index([clip.parent])
    assert victim.read_text() == "do not truncate me"


def damage(index: Path, how: str) -> None:
    db = index / DB_NAME
    if how == "truncated":
        db.write_bytes(db.read_bytes()[:len(db.read_bytes()) // 2])
    elif how == "garbage pages":
        data = bytearray(db.read_bytes())
        data[4096 * 2:4096 * 4] = np.random.default_rng(1).bytes(8192)
        db.write_bytes(bytes(data))
    else:
        conn = sqlite3.connect(db)
        statement = {"a vector of the wrong size": "UPDATE segments SET vector = x'00' WHERE id = 3",
                     "a dimension that is not a number": "UPDATE meta SET value = 'abc' WHERE key = 'dim'",
                     "a table missing": "DROP TABLE labels"}[how]
        conn.execute(statement)
        conn.commit()
        conn.close()
    for name in (FAISS_NAME, SIDECAR_NAME):  # so that the database itself must be read
        (index / name).unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage pages", "a vector of the wrong size",
                                 "a dimension that is not a number", "a table missing"])
def test_a_damaged_database_is_a_clear_error_not_a_crash(built, how):
    index, _, clip = built
    damage(index, how)
    result = CliRunner().invoke(app, ["query", str(clip), "--index", str(index), "--json"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}"
    assert "Error:" in result.stderr and str(index) in result.stderr


def test_an_index_from_a_newer_simsearch_is_refused_untouched(built):
    index, _, _ = built
    conn = sqlite3.connect(index / DB_NAME)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    conn.commit()
    conn.close()
    before = (index / DB_NAME).read_bytes()
    with pytest.raises(CorruptIndexError, match=f"schema {SCHEMA_VERSION + 1} is newer .* upgrade simsearch"):
        Engine(index)
    assert (index / DB_NAME).read_bytes() == before


@pytest.mark.parametrize("version", [0, 1])
def test_an_index_from_an_older_simsearch_is_migrated(built, version):
    """Version 1 had today's tables (version 2 only lets names that are not UTF-8 be BLOBs);
    version 0, before versions were recorded, had no failures table."""
    index, answer, clip = built
    conn = sqlite3.connect(index / DB_NAME)
    if version == 0:
        conn.execute("DELETE FROM meta WHERE key = 'schema_version'")
        conn.execute("DROP TABLE failures")
    else:
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with Engine(index) as engine:
        assert engine.store.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert engine.query([clip], k=5)[0] == answer
        assert engine.labels() == {"bell": 4, "chirp": 4, "clicks": 4, "hum": 4}
        assert engine.failures() == []


def test_an_sqlite_file_that_is_not_an_index_is_refused_untouched(tmp_path):
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    conn.commit()
    conn.close()
    before = (tmp_path / DB_NAME).read_bytes()
    with pytest.raises(CorruptIndexError, match="not a simsearch index"):
        Store(tmp_path)
    assert (tmp_path / DB_NAME).read_bytes() == before
