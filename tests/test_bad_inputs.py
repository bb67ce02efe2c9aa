"""Bad inputs: `index` gets through a corpus of malformed and awkward files (tests/badfiles.py).

Every good file is indexed, every bad one is reported with its path and a specific reason and
remembered (not retried until it changes), the exit code is 1, and nothing already in the
index is lost. Decoding runs in worker processes, so a decoder that hangs is stopped by the
per-file timeout and one that crashes costs only its file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from badfiles import write_corpus
from conftest import write_wav
from simsearch import Engine, EngineConfig, audio, decode_pool, indexer, synth
from simsearch.config import ReadConfig
from test_crash_safety import CLI, launch


def unshare_applies_permissions(tmp_path) -> bool:
    """As root, chmod 000 does not stop us; inside a user namespace (``unshare -U``) root
    loses that privilege over the files outside it. True when that works here."""
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        result = subprocess.run(["unshare", "-U", "cat", str(probe)], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        probe.chmod(0o600)
    return result.returncode != 0 and b"Permission denied" in result.stderr


def check_report(expected, added, failed) -> None:
    """Compare an index report with the corpus expectations, naming every mismatch."""
    added, failed = set(added), dict(failed)
    problems = []
    for e in expected:
        if e.outcome == "indexed" and e.path not in added:
            problems.append(f"{e.why}: expected indexed, got {failed.get(e.path, 'nothing')!r} ({e.path!r})")
        elif e.outcome == "failed" and e.reason not in failed.get(e.path, ""):
            problems.append(f"{e.why}: expected failure {e.reason!r}, got {failed.get(e.path, 'indexed?')!r}")
        elif e.outcome == "ignored" and (e.path in added or e.path in failed):
            problems.append(f"{e.why}: expected to be ignored ({e.path!r})")
    known = {e.path for e in expected}
    problems += [f"unexpected path in the report: {p!r}" for p in (added | set(failed)) - known]
    assert not problems, "\n".join(problems)


@pytest.fixture
def indexed_library(tmp_path, library):
    """An index already holding the 16-clip library (labelled), to show nothing is lost."""
    with Engine(tmp_path / "index", encoder="features") as engine:
        engine.index([library], label_from_folders=True)
    return tmp_path / "index"


def test_corpus_good_files_indexed_bad_ones_reported_and_remembered(tmp_path, library, indexed_library, monkeypatch):
    expected = write_corpus(tmp_path / "corpus")
    assert len(expected) >= 30
    with Engine(indexed_library) as engine:
        library_only = [f"{library}/*"]  # the corpus has bells too; compare like with like
        before = engine.query([library / "bell" / "bell_1.wav"], k=5, include=library_only)[0]
        report = engine.index([tmp_path / "corpus"])
        check_report(expected, report.added, report.failed)

        # Nothing already in the index is lost: the library is all there, with its labels.
        assert engine.labels() == {"bell": 4, "chirp": 4, "clicks": 4, "hum": 4}
        assert engine.query([library / "bell" / "bell_1.wav"], k=5, include=library_only)[0] == before
        n_indexed = sum(e.outcome == "indexed" for e in expected)
        assert engine.info()["files"] == 16 + n_indexed

        # Remembered: a second run decodes nothing and reports the same failures.
        decoded = []
        real_reader = indexer.ReadAhead
        monkeypatch.setattr(indexer, "ReadAhead", lambda store, work, **kw: decoded.extend(
            path for group in work for batch in group for path in batch) or real_reader(store, work, **kw))
        again = engine.index([tmp_path / "corpus"])
        assert dict(again.failed) == dict(report.failed) and not again.added
        assert decoded == []
        assert dict(engine.failures()).keys() == dict(report.failed).keys()

        # ...unless it changed: a broken file replaced by good audio is indexed and forgotten as a failure.
        fixed = next(e.path for e in expected if e.why == "text renamed .wav")
        write_wav(tmp_path / "fixed.wav", synth.make("siren", 3))
        os.replace(tmp_path / "fixed.wav", fixed)
        third = engine.index([tmp_path / "corpus"])
        assert third.added == [fixed] and fixed not in dict(engine.failures())
        assert decoded == [fixed]  # and only it was read again


def test_names_that_are_not_utf8_survive_storage_labels_json_and_remove(tmp_path, engine):
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")  # Latin-1 folder name: not UTF-8
    os.makedirs(folder)
    for i in range(2):
        write_wav(tmp_path / "tmp.wav", synth.make("bell", i))
        os.replace(tmp_path / "tmp.wav", os.path.join(folder, b"\xff%d.wav" % i))
    report = engine.index([tmp_path], label_from_folders=True)
    paths = sorted(report.added)
    assert len(paths) == 2 and all(os.path.exists(p) for p in paths)
    assert [os.fsencode(p) for p in paths] == [os.path.join(folder, b"\xff%d.wav" % i) for i in range(2)]
    assert list(engine.labels()) == [os.fsdecode(b"caf\xe9")]
    result = engine.query([paths[0]], k=1)[0]
    assert result.neighbours[0].path == paths[1]
    assert json.loads(json.dumps(result.to_dict()))["neighbours"][0]["path"] == paths[1]
    assert sorted(engine.remove([os.fsdecode(folder)])) == paths  # found under its folder, stored as bytes
    assert engine.info()["files"] == 0


def hang_on(name):
    """A stand-in decoder that never returns for files called ``name`` (the worker processes
    are forked, so they inherit this patch)."""
    real = audio.decode

    def decode(data, *, path, **kwargs):
        if os.path.basename(path) == name:
            time.sleep(3600)
        return real(data, path=path, **kwargs)
    return decode


def test_a_hanging_decoder_is_stopped_by_the_per_file_timeout(tmp_path, library, monkeypatch):
    monkeypatch.setattr(audio, "decode", hang_on("hum_2.wav"))
    config = EngineConfig(read=ReadConfig(timeout_seconds=1.0))
    started = time.monotonic()
    with Engine(tmp_path / "index", encoder="features", config=config) as engine:
        report = engine.index([library])
    assert time.monotonic() - started < 30, "the hang was not stopped"
    assert len(report.added) == 15
    [(path, reason)] = report.failed
    assert path.endswith("hum_2.wav") and "longer than 1 s" in reason


def test_a_crashing_decoder_costs_only_its_file(tmp_path, library, monkeypatch):
    real = audio.decode

    def segfault_on_bell_0(data, *, path, **kwargs):
        if os.path.basename(path) == "bell_0.wav":
            os.kill(os.getpid(), signal.SIGSEGV)  # what a C decoder fed a malicious file may do
        return real(data, path=path, **kwargs)

    monkeypatch.setattr(audio, "decode", segfault_on_bell_0)
    with Engine(tmp_path / "index", encoder="features") as engine:
        report = engine.index([library])
    assert len(report.added) == 15
    [(path, reason)] = report.failed
    assert path.endswith("bell_0.wav") and "crashed" in reason and "SIGSEGV" in reason


def test_a_file_that_changes_while_it_is_read_is_refused_then_retried(tmp_path, engine, monkeypatch):
    clip = write_wav(tmp_path / "lib" / "growing.wav", synth.make("rain", 1))
    real_read = audio._read_all

    def read_while_someone_appends(f):
        head = f.read(100)
        with open(clip, "ab") as other:  # another program writing to the file mid-read
            other.write(b"\0" * 64)
        return head + real_read(f)

    monkeypatch.setattr(audio, "_read_all", read_while_someone_appends)
    report = engine.index([clip.parent])
    assert report.failed == [(str(clip), report.failed[0][1])] and "changed while it was being read" in report.failed[0][1]
    monkeypatch.setattr(audio, "_read_all", real_read)
    assert engine.index([clip.parent]).added == [str(clip)], "a file that changed is retried"


def test_unreadable_file_is_reported_as_permission_denied(tmp_path):
    """chmod 000 with a reason. As root the test runs the CLI in a user namespace, where root
    is refused like anyone else; where that is impossible it is skipped, saying why."""
    clip = write_wav(tmp_path / "lib" / "secret.wav", synth.make("bell", 1))
    write_wav(tmp_path / "lib" / "open.wav", synth.make("hum", 1))
    clip.chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if not unshare_applies_permissions(tmp_path):
            pytest.skip("running as root without user namespaces: nothing can make chmod 000 unreadable to root")
        prefix = ["unshare", "-U"]
    process = launch("index", tmp_path / "lib", "--index", tmp_path / "index", "--encoder", "spectrum", "--json",
                     prefix=prefix)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    [report] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert report["added"] == 1
    assert report["failed"] == [{"path": str(clip), "reason": "permission denied"}]
    assert f"skipped {clip}: permission denied" in err


def test_cli_on_the_corpus_exits_1_and_names_every_failure(tmp_path):
    """The CLI end to end, in real processes: JSON report, stderr lines, exit code, and the
    odd names (not UTF-8, newlines, quotes) in `failures` and `query --json`. (The CLI runs
    through the crash tests' harness, for its cheap encoder; the in-process corpus test above
    covers the features encoder on these files.)"""
    as_root = os.geteuid() == 0
    namespace = as_root and unshare_applies_permissions(tmp_path)
    expected = write_corpus(tmp_path / "corpus", permissions_apply=not as_root or namespace)
    prefix = ["unshare", "-U"] if namespace else []
    index = ["--index", tmp_path / "index"]

    def cli(*args):
        process = subprocess.Popen([*prefix, sys.executable, "-c", CLI, *map(str, args)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env={**os.environ, "BATCH": "64"})
        out, err = process.communicate(timeout=120)
        assert out.startswith(b"ready\n")
        return process.returncode, out[len(b"ready\n"):], err

    code, out, err = cli("index", tmp_path / "corpus", *index, "--encoder", "spectrum", "--json")
    assert code == 1, err.decode(errors="replace")
    report = json.loads(out.splitlines()[0])
    assert report["added"] == sum(e.outcome == "indexed" for e in expected)
    failed = {f["path"]: f["reason"] for f in report["failed"]}
    check_report([e for e in expected if e.outcome != "indexed"], [], failed)
    for path, reason in failed.items():  # each on stderr, with its path
        assert os.fsencode(f"skipped {path}: {reason}") in err

    code, out, _ = cli("failures", *index)
    assert code == 0 and all(os.fsencode(path) in out for path in failed)
    odd = next(e.path for e in expected if e.why == "a name that is not UTF-8")
    code, out, err = cli("query", odd, *index, "--json", "-k", "40")
    assert code == 0, err
    line = json.loads(out.splitlines()[0])
    assert line["path"] == odd
    assert {n["path"] for n in line["neighbours"]} >= {e.path for e in expected if e.outcome == "indexed"} - {odd}


def test_an_hour_long_file_is_decoded_and_cut_into_windows(tmp_path):
    """A real hour (8 kHz PCM16, 58 MB: silence with a tone every minute) goes through a decode
    worker well within the default time limit; it becomes 2399 windows. (Embedding 2399
    windows is the encoder's business and would take minutes here, so it is not done.)"""
    import soundfile as sf

    path = tmp_path / "hour.wav"
    minute = np.zeros(8000 * 60, dtype=np.int16)
    minute[:8000] = (np.sin(np.arange(8000) * 0.3) * 8000).astype(np.int16)
    with sf.SoundFile(path, "w", samplerate=8000, channels=1, subtype="PCM_16") as f:
        for _ in range(60):
            f.write(minute)
    with decode_pool.DecodePool(sample_rate=16000, max_seconds=ReadConfig().max_seconds,
                          timeout=ReadConfig().timeout_seconds) as pool:
        [result] = pool.run([str(path)])
    assert result.error is None, result.error
    assert result.decoded.duration == pytest.approx(3600, abs=0.01)
    assert len(audio.segment_bounds(len(result.decoded.samples), 16000, EngineConfig().segments)) == 2399
