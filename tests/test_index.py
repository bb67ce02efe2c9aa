"""`index`: recursive discovery, labels from folders or a regex, incremental re-runs, prune."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from simsearch import Engine
from conftest import write_wav
from simsearch import audio, synth


def test_index_folder_recursively_with_folder_labels(engine, library):
    report = engine.index([library], label_from_folders=True)
    assert len(report.added) == 16 and not report.failed
    assert engine.labels() == {"bell": 4, "chirp": 4, "clicks": 4, "hum": 4}
    info = engine.info()
    assert info["files"] == 16 and info["segments"] == 16
    assert info["encoder"] == "features-v1"


def test_label_regex_takes_group_one_of_the_file_name(engine, library):
    engine.index([library], label_regex=r"^([a-z]+)_\d")
    assert engine.labels() == {"bell": 4, "chirp": 4, "clicks": 4, "hum": 4}


def test_reindex_unchanged_embeds_nothing(tmp_path, library, counting):
    with Engine(tmp_path / "idx", encoder="counting") as engine:
        engine.index([library])
        first = counting.calls
        report = engine.index([library])
    assert first == 16
    assert counting.calls == first, "unchanged files must not be re-embedded"
    assert len(report.unchanged) == 16 and not report.added


def test_changed_file_is_re_embedded(engine, library):
    engine.index([library])
    target = library / "bell" / "bell_0.wav"
    write_wav(target, synth.make("chirp", 5))
    report = engine.index([library])
    assert report.added == [str(target)]
    assert engine.info()["files"] == 16


def test_renamed_file_keeps_label_without_re_embedding(tmp_path, library, counting):
    with Engine(tmp_path / "idx", encoder="counting") as engine:
        engine.index([library], label_from_folders=True)
        calls = counting.calls
        old, new = library / "hum" / "hum_0.wav", library / "renamed" / "droning.wav"
        new.parent.mkdir()
        os.rename(old, new)
        report = engine.index([library])
        assert report.moved == [(str(old), str(new))]
        assert counting.calls == calls
        result = engine.query([new], k=16)[0]
        assert engine.labels()["hum"] == 4
        assert str(new) not in [n.path for n in result.neighbours]  # itself is never its own neighbour
        [moved] = [n for n in engine.query([library / "hum" / "hum_1.wav"], k=16)[0].neighbours if n.path == str(new)]
        assert moved.label == "hum"


def test_prune_removes_deleted_files_from_sqlite_and_faiss(engine, library):
    engine.index([library])
    shutil.rmtree(library / "clicks")
    report = engine.index([library])
    assert engine.info()["files"] == 16, "without --prune nothing is deleted"
    report = engine.index([library], prune=True)
    assert len(report.pruned) == 4
    assert engine.info()["files"] == 12 and engine.info()["segments"] == 12
    index = engine.store.vector_index()
    assert index.ntotal == 12
    ids = {int(i) for i in engine.store.db.execute("SELECT id FROM segments").fetchall() for i in i}
    assert ids == {int(index.id_map.at(i)) for i in range(index.ntotal)}


def test_unreadable_files_are_reported_and_the_rest_indexed(engine, library):
    (library / "bell" / "broken.wav").write_bytes(b"this is not audio")
    (library / "bell" / "empty.wav").write_bytes(b"")
    report = engine.index([library])
    reasons = dict(report.failed)
    assert len(report.added) == 16
    assert "not a readable audio file" in reasons[str(library / "bell" / "broken.wav")]
    assert "empty file" in reasons[str(library / "bell" / "empty.wav")]
    # remembered: not retried unless they change
    again = engine.index([library])
    assert dict(again.failed) == reasons and not again.added


def test_long_files_become_overlapping_windows(engine, tmp_path):
    long = write_wav(tmp_path / "long" / "walk.wav", np.concatenate(
        [synth.make("hum", 1, seconds=4.0), synth.make("chirp", 2, seconds=4.0), synth.make("rain", 3, seconds=4.0)]))
    engine.index([long])
    bounds, _ = engine.store.file_vectors(engine.store.file_by_path(str(long)).id)
    assert bounds[0] == (0.0, 3.0) and bounds[-1][1] == 12.0
    assert all(b[0] - a[0] == 1.5 for a, b in zip(bounds, bounds[1:-1]))


def test_reindex_unchanged_builds_no_encoder(tmp_path, library, monkeypatch):
    """Nothing to embed, no model to load (the CNN costs a cold re-index about a second);
    a changed file still gets one."""
    from simsearch.encoders import ENCODERS, FeaturesEncoder

    with Engine(tmp_path / "idx", encoder="features") as engine:
        engine.index([library])
    built = []
    monkeypatch.setitem(ENCODERS, "features", lambda: built.append(1) or FeaturesEncoder())
    with Engine(tmp_path / "idx") as engine:
        report = engine.index([library])
        assert len(report.unchanged) == 16 and built == []
        write_wav(library / "bell" / "bell_0.wav", synth.make("chirp", 5))
        assert len(engine.index([library]).added) == 1 and built == [1]


def test_reindex_with_another_encoder_version_fails_before_anything_is_done(tmp_path, library, monkeypatch):
    from simsearch import EncoderMismatchError
    from simsearch.encoders import ENCODERS, FeaturesEncoder

    with Engine(tmp_path / "idx", encoder="features") as engine:
        engine.index([library])

    class FeaturesV2(FeaturesEncoder):
        version = "2"

    monkeypatch.setitem(ENCODERS, "features", FeaturesV2)
    (library / "bell" / "bell_0.wav").unlink()
    with Engine(tmp_path / "idx") as engine, pytest.raises(EncoderMismatchError, match="features v1"):
        engine.index([library], prune=True)
    with Engine(tmp_path / "idx") as engine:
        assert engine.info()["files"] == 16  # nothing pruned


def test_an_index_made_with_an_earlier_cnn_keeps_it_until_reembedded(tmp_path, library, fresh_clip):
    from simsearch import cnn
    from simsearch.encoders import CNNEncoder

    earlier = cnn.SHIPPED_VERSIONS[0]
    assert earlier != cnn.MODEL_VERSION
    with Engine(tmp_path / "idx", encoder="cnn") as engine:
        engine.index([library])
        engine.reembed(CNNEncoder(version=earlier))  # as if an earlier release had built it
    query = fresh_clip("chirp")
    old_model = cnn.load_default(version=earlier)
    with Engine(tmp_path / "idx") as engine:  # a new session of this release
        assert engine.info()["encoder"] == f"cnn-v{earlier}"
        assert len(engine.index([library]).unchanged) == 16  # re-index: nothing to do, no error
        assert engine.encoder.version == earlier
        samples = audio.load(query, sample_rate=16000).samples
        vector = engine.embed(samples)[1][0]
        by_model = {v: cnn.embed_waveforms(m, [samples])[0] for v, m in
                    ((earlier, old_model), (cnn.MODEL_VERSION, cnn.load_default()))}
        by_model = {v: x / np.linalg.norm(x) for v, x in by_model.items()}
        assert np.abs(vector - by_model[earlier]).max() < 1e-5
        assert np.abs(vector - by_model[cnn.MODEL_VERSION]).max() > 1e-2
        engine.index([fresh_clip("hum", seed=5)])  # new files get the earlier model's vectors too
        assert engine.info()["encoder"] == f"cnn-v{earlier}"
        engine.reembed("cnn")  # the upgrade
    with Engine(tmp_path / "idx") as engine:
        assert engine.info()["encoder"] == f"cnn-v{cnn.MODEL_VERSION}" and engine.info()["files"] == 17
