"""Concurrency: queries run while `index` writes, and a second writer is refused.

Real processes: the writer is the CLI (through the harness of test_crash_safety, with a pause
after each commit so that the run spans many commits); the readers are CLI processes and
`Engine` objects in this process. Every query must succeed and see one consistent snapshot:
the neighbours it returns, and their scores, agree with what SQLite holds for those files.
"""

from __future__ import annotations

import fcntl
import json
import time

import numpy as np
import pytest

from conftest import write_wav
from simsearch import Engine, IndexLockedError, audio, synth
from test_crash_safety import check_consistent, launch

KINDS = ("bell", "hum", "chirp", "clicks")


@pytest.fixture
def scene(tmp_path):
    """40 short clips in four labelled folders; the index already holds the bells."""
    lib = tmp_path / "lib"
    for k, kind in enumerate(KINDS):
        for i in range(10):
            write_wav(lib / kind / f"{kind}_{i}.wav", synth.make(kind, 100 * k + i, seconds=0.5))
    with Engine(tmp_path / "index", encoder="spectrum") as engine:
        engine.index([lib / "bell"], label_from_folders=True)
    return lib, tmp_path / "index"


def lock_is_held(index_dir) -> bool:
    with open(index_dir / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def check_snapshot(engine: Engine, result, query_vectors: np.ndarray, library: set[str]) -> None:
    """The neighbours are distinct library files and each score is the best similarity of the
    query to that file's vectors in SQLite: ids were resolved in the snapshot they came from."""
    paths = [n.path for n in result.neighbours]
    assert len(paths) == 3 and len(set(paths)) == 3 and set(paths) <= library
    for neighbour in result.neighbours:
        _, vectors = engine.store.file_vectors(engine.store.file_by_path(neighbour.path).id)
        assert neighbour.score == pytest.approx(float((query_vectors @ vectors.T).max()), abs=1e-5)
    assert result.category is None or result.category.label in KINDS


def test_queries_while_index_writes_never_fail_and_see_consistent_snapshots(scene):
    lib, index = scene
    library = {str(p) for p in lib.rglob("*.wav")}
    # Not in the index and like the clips being added: its search is unfiltered, and what a
    # commit adds ranks first, so ids from a newer generation would surface at once.
    clip = str(write_wav(lib.parent / "query" / "chirp.wav", synth.make("chirp", 999, seconds=0.5)))
    writer = launch("index", lib, "--label-from-folders", "--index", index, "--quiet", PAUSE_AFTER_COMMIT=0.08)
    clis, generations, answered = [], set(), 0
    with Engine(index) as engine:  # one long-lived reader that sees each new commit...
        query_vectors = engine.embed(audio.load(clip, sample_rate=engine.encoder.sample_rate).samples)[1]
        while writer.poll() is None:
            if len(clis) < 3 and answered >= 5 * len(clis):
                clis.append(launch("query", clip, "--index", index, "--json", "-k", 3))
            result = engine.query([clip], k=3)[0]
            check_snapshot(engine, result, query_vectors, library)
            generations.add(engine.store.generation)
            with Engine(index) as fresh:  # ...and new ones, opened mid-write
                check_snapshot(fresh, fresh.query([clip], k=3)[0], query_vectors, library)
            answered += 1
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert len(generations) >= 3, "the queries did not overlap the writes"
    for process in clis:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        [line] = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert len(line["neighbours"]) == 3 and {n["path"] for n in line["neighbours"]} <= library
    assert set(check_consistent(index)) == library


def test_a_second_writer_is_refused_naming_the_first(scene):
    lib, index = scene
    first = launch("index", lib, "--label-from-folders", "--index", index, "--quiet", PAUSE_AFTER_COMMIT=0.1)
    deadline = time.monotonic() + 60
    while not lock_is_held(index):
        assert first.poll() is None and time.monotonic() < deadline, "the first writer never took the lock"
        time.sleep(0.01)
    second = launch("index", lib, "--index", index, "--quiet")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1
    assert f"index {index} is locked by PID {first.pid}" in err and "Traceback" not in err
    with Engine(index) as engine:  # the API too, for every kind of write
        for write in (lambda: engine.index([lib]), lambda: engine.remove([lib / "bell"]),
                      lambda: engine.label("x", [lib / "hum" / "hum_0.wav"])):
            with pytest.raises(IndexLockedError, match=f"PID {first.pid}"):
                write()
    assert first.poll() is None, "the first writer must still be running (or the test proves nothing)"
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    state = check_consistent(index)
    assert set(state) == {str(p) for p in lib.rglob("*.wav")}
