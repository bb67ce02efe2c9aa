"""Crashes: `simsearch index` killed with SIGKILL anywhere loses nothing, and a re-run finishes.

Also: the FAISS cache files are replaced atomically (a failed write leaves the old ones), and a
full disk or a read-only index directory is a clear error that leaves the index as it was.

The killed processes run the real CLI through :data:`CLI`, a few lines of test harness that
register a cheap encoder (dozens of runs with librosa's start-up would blow the time budget;
crash safety does not depend on the encoder), use small batches (so a run is many commits),
and can kill themselves at a named point: before the k-th SQL statement that writes,
during a decode, after the n-th commit, in the middle of writing the FAISS file or its
sidecar, or between the two renames.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import pytest

from conftest import write_wav
from simsearch import Engine, synth
from simsearch.store import FAISS_NAME, SIDECAR_NAME, IndexWriteError, Store

ENCODER = r'''
import numpy as np
from simsearch.encoders import ENCODERS, l2_normalise


class SpectrumEncoder:
    """A cheap stand-in encoder for tests that run the CLI many times: a binned spectrum."""

    name, version, dim, sample_rate, unknown_threshold = "spectrum", "1", 32, 16000, 0.5

    def embed(self, waves):
        out = np.zeros((len(waves), self.dim), np.float32)
        for i, wave in enumerate(waves):
            spectrum = np.abs(np.fft.rfft(wave, n=2048))
            out[i] = [band.sum() for band in np.array_split(spectrum, self.dim)]
        return l2_normalise(out + 1e-6)


ENCODERS["spectrum"] = SpectrumEncoder
'''
exec(ENCODER)  # the same encoder in this process, for the in-process checks and re-runs

CLI = ENCODER + r'''
import atexit, contextlib, os, signal, sys, time
import faiss, rich.progress, sqlite_utils  # imported up front, so a kill "after a delay" lands in the work
from simsearch import audio, engine, store
from simsearch.store import database as store_database
from simsearch.config import EngineConfig

# Small batches, so that a run is many commits and a crash can fall between any two.
engine.Engine.__init__.__kwdefaults__["config"] = EngineConfig(batch_files=int(os.environ.get("BATCH", "2")))
point, _, argument = os.environ.get("CRASH_AT", "").partition(":")
pause = float(os.environ.get("PAUSE_AFTER_COMMIT", "0"))


def die():
    os.kill(os.getpid(), signal.SIGKILL)


commits = 0
real_writing = store.Store.writing


@contextlib.contextmanager
def writing(self):
    global commits
    with real_writing(self):
        yield
    commits += 1
    if point == "after_commit" and commits == int(argument):
        die()
    time.sleep(pause)  # stretches the run so that other processes overlap it


store.Store.writing = writing
statements = 0
real_execute = sqlite_utils.Database.execute


def execute(self, sql, parameters=None):  # every statement that writes, BEGIN and COMMIT included
    global statements
    if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "BEGIN IMMEDIATE", "COMMIT")):
        statements += 1
        if point == "statement" and statements == int(argument):
            die()
    return real_execute(self, sql) if parameters is None else real_execute(self, sql, parameters)


sqlite_utils.Database.execute = execute
atexit.register(lambda: print("commits", commits, "statements", statements, flush=True))

real_decode = audio.decode
indexer_pid = os.getpid()


def decode(data, *, path, **kwargs):  # runs in a decode worker (a child of the reader process)
    if point == "decode" and os.path.basename(path) == argument:
        os.kill(indexer_pid, signal.SIGKILL)  # the indexer dies while this file is being decoded
        time.sleep(0.5)
    return real_decode(data, path=path, **kwargs)


audio.decode = decode
real_atomic_write = store_database.atomic_write


def atomic_write(path, data):
    if (point, path.name) in (("faiss_write", store.FAISS_NAME), ("sidecar_write", store.SIDECAR_NAME)):
        # die half-way through writing the temp file, as a power cut would
        with open(path.with_name(f".{path.name}.{os.getpid()}.tmp"), "wb") as f:
            f.write(data[:len(data) // 2])
        die()
    real_atomic_write(path, data)
    if point == "between_renames" and path.name == store.FAISS_NAME:
        die()


store_database.atomic_write = atomic_write
from simsearch.cli import main

sys.argv = ["simsearch", *sys.argv[1:]]
print("ready", flush=True)
main()
'''


def launch(*args, prefix=(), **env) -> subprocess.Popen:
    """Start the CLI harness (after ``prefix``, e.g. ``unshare -U``) with ``args`` and ``env``;
    returns once it has imported everything and is about to run the command."""
    process = subprocess.Popen([*prefix, sys.executable, "-c", CLI, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **{k: str(v) for k, v in env.items()}})
    assert process.stdout.readline() == "ready\n", process.stderr.read()
    return process


def check_consistent(index_dir: Path) -> dict[str, tuple[str, int, str | None]]:
    """Open the index as a user would and check it: returns ``{path: (hash, segments, label)}``.

    SQLite is intact; every segment has its file and every file segments; the FAISS ids are
    exactly the segment ids; the cache files were brought up to date (no writer is active);
    no temp file is left behind.
    """
    store = Store(index_dir, create=False)
    try:
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        files = {r.id: r for r in store.all_files()}
        segments = store.db.execute("SELECT id, file_id FROM segments").fetchall()
        assert {f for _, f in segments} == set(files), "a segment without its file, or a file without segments"
        assert len({r.path for r in files.values()}) == len(files)
        ids = faiss.vector_to_array(store.vector_index().id_map)
        assert sorted(ids) == sorted(s for s, _ in segments), "FAISS ids and SQLite rows disagree"
        sidecar = json.loads((index_dir / SIDECAR_NAME).read_text())
        assert sidecar["generation"] == store.generation and sidecar["vectors"] == len(segments)
        assert not list(index_dir.glob(".*.tmp")), "temp files left behind"
        labels = dict(store.db.execute("SELECT file_id, label FROM labels").fetchall())
        count = {f: 0 for f in files}
        for _, f in segments:
            count[f] += 1
        return {r.path: (r.hash, count[i], labels.get(i)) for i, r in files.items()}
    finally:
        store.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """An index of six labelled clips; then the library changes (a move, an edit, eight new
    clips) and an uninterrupted run records what indexing it should end with."""
    root = tmp_path_factory.mktemp("crash")
    lib = root / "lib"
    for i in range(3):
        write_wav(lib / "a" / f"a_{i}.wav", synth.make("bell", i, seconds=0.5))
        write_wav(lib / "b" / f"b_{i}.wav", synth.make("hum", 10 + i, seconds=0.5))
    with Engine(root / "base", encoder="spectrum") as engine:
        engine.index([lib], label_from_folders=True)
    before = check_consistent(root / "base")
    (lib / "moved").mkdir()
    os.rename(lib / "a" / "a_0.wav", lib / "moved" / "a_0.wav")
    write_wav(lib / "b" / "b_1.wav", synth.make("chirp", 20, seconds=0.5))
    new = [write_wav(lib / "new" / f"n_{i}.wav", synth.make(("rain", "clicks")[i % 2], 30 + i, seconds=0.5)).name
           for i in range(8)]
    shutil.copytree(root / "base", root / "baseline")
    process = launch("index", lib, "--label-from-folders", "--index", root / "baseline", "--quiet",
                     PAUSE_AFTER_COMMIT=0.1)
    started = time.monotonic()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    counts = out.split()
    return {"root": root, "lib": lib, "before": before, "new": new, "seconds": time.monotonic() - started,
            "commits": int(counts[1]), "statements": int(counts[3]), "after": check_consistent(root / "baseline")}


def test_sigkill_at_20_points_loses_nothing_and_a_rerun_finishes_without_duplicates(scene):
    root, lib = scene["root"], scene["lib"]
    rng = random.Random(7)
    # Random points over the whole run, counted in writing SQL statements (a clock would be skewed by
    # the load of running four at once), plus the places where a crash is most dangerous,
    # plus a few plain kills from outside after a random delay.
    points = ([f"statement:{k}" for k in sorted(rng.sample(range(1, scene["statements"] + 1), 8))]
              + [f"decode:{name}" for name in rng.sample(scene["new"], 3)]
              + [f"after_commit:{k}" for k in rng.sample(range(1, scene["commits"]), 3)]
              + ["faiss_write", "between_renames", "sidecar_write"]
              + [f"delay:{rng.uniform(0.0, 0.5) * scene['seconds']:.3f}" for _ in range(3)])
    assert len(points) == 20

    def crash(n: int) -> tuple[str, int, str]:
        index = root / f"run{n}"
        shutil.copytree(root / "base", index)
        point = points[n]
        process = launch("index", lib, "--label-from-folders", "--index", index, "--quiet",
                         CRASH_AT="" if point.startswith("delay") else point, PAUSE_AFTER_COMMIT=0.1)
        if point.startswith("delay"):
            time.sleep(float(point.split(":")[1]))
            process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=120)
        return point, process.returncode, err

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(crash, range(len(points))))
    for point, returncode, err in outcomes:
        assert returncode == -signal.SIGKILL, f"{point}: not killed mid-run ({returncode}): {err}"

    old_paths = set(scene["before"])
    moved_from, moved_to = str(lib / "a" / "a_0.wav"), str(lib / "moved" / "a_0.wav")
    for n, point in enumerate(points):
        index = root / f"run{n}"
        state = check_consistent(index)
        # Nothing indexed before the run is lost: each old clip is there (the moved one under
        # its old or its new name, exactly once).
        assert old_paths - {moved_from} <= set(state), point
        assert (moved_from in state) != (moved_to in state), point
        with Engine(index, encoder="spectrum") as engine:
            report = engine.index([lib], label_from_folders=True)
        assert not report.failed, point
        assert check_consistent(index) == scene["after"], f"{point}: re-run did not finish the job exactly"


def test_a_failed_cache_write_leaves_the_old_files_and_names_the_directory(tmp_path, library, monkeypatch):
    index = tmp_path / "index"
    with Engine(index, encoder="features") as engine:
        engine.index([library / "bell"])
    old = {name: (index / name).read_bytes() for name in (FAISS_NAME, SIDECAR_NAME)}

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the data is written, the flush to disk fails
    with Engine(index) as engine, pytest.raises(IndexWriteError, match=f"{index}.*disk is full"):
        engine.index([library / "hum"])
    monkeypatch.undo()
    assert {name: (index / name).read_bytes() for name in old} == old, "the old cache files were touched"
    assert not list(index.glob(".*.tmp"))
    # SQLite committed the new clips; the stale cache is rebuilt from it on the next open.
    state = check_consistent(index)
    assert len(state) == 8


def test_a_full_disk_during_index_is_a_clear_error_and_loses_nothing(tmp_path, library):
    index = tmp_path / "index"
    with Engine(index, encoder="features") as engine:
        engine.index([library / "bell"], label_from_folders=True)
        expected = engine.query([library / "bell" / "bell_0.wav"], k=3)[0]
        before = check_consistent(index)
        # SQLite's own "database or disk is full" (SQLITE_FULL), for real: no page may be added.
        pages = engine.store.db.execute("PRAGMA page_count").fetchone()[0]
        engine.store.db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(IndexWriteError, match=f"{index}.*disk is full"):
            engine.index([library], label_from_folders=True)
    assert check_consistent(index) == before
    with Engine(index) as engine:
        assert engine.query([library / "bell" / "bell_0.wav"], k=3)[0] == expected
        assert not engine.index([library], label_from_folders=True).failed  # room again: it carries on
        assert engine.info()["files"] == 16


def test_a_read_only_index_directory_refuses_writes_clearly_and_still_answers(tmp_path, library):
    """chmod 555 on the index directory. Root ignores it, so as root the CLI runs in a user
    namespace (``unshare -U``) where it does not; without one the test is skipped."""
    index = tmp_path / "index"
    with Engine(index, encoder="spectrum") as engine:
        engine.index([library / "bell"])
    before = check_consistent(index)
    prefix = []
    if os.geteuid() == 0:
        from test_bad_inputs import unshare_applies_permissions

        if not unshare_applies_permissions(tmp_path):
            pytest.skip("running as root without user namespaces: a read-only directory is writable to root")
        prefix = ["unshare", "-U"]
    index.chmod(0o555)
    try:
        write = launch("index", library, "--index", index, prefix=prefix)
        read = launch("query", library / "bell" / "bell_1.wav", "--index", index, "--json", "-k", 2, prefix=prefix)
        (_, write_err), (read_out, read_err) = write.communicate(timeout=120), read.communicate(timeout=120)
    finally:
        index.chmod(0o755)
    assert write.returncode == 1 and "Traceback" not in write_err
    assert f"Error: cannot use the index in {index}" in write_err and "read-only" in write_err
    assert read.returncode == 0, read_err
    [line] = [json.loads(x) for x in read_out.splitlines() if x.startswith("{")]
    assert len(line["neighbours"]) == 2
    assert check_consistent(index) == before
