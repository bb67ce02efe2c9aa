"""`label` (few-shot teaching), `labels`, `unlabel`, `remove`."""

from __future__ import annotations

from simsearch import synth
from conftest import write_wav


def test_teach_a_new_category_from_three_clips_not_yet_indexed(engine, library, tmp_path, fresh_clip, counting):
    engine.index([library], label_from_folders=True)
    query = fresh_clip("siren", seed=50)
    before = engine.query([query], k=3)[0]
    assert before.category is None or before.category.label != "siren"
    examples = [write_wav(tmp_path / "sirens" / f"s{i}.wav", synth.make("siren", i)) for i in range(3)]
    report = engine.label("siren", examples)
    assert len(report.added) == 3
    assert engine.labels()["siren"] == 3
    after = engine.query([query], k=3)[0]
    assert after.category.label == "siren"


def test_labelling_indexed_clips_never_re_embeds(tmp_path, library, counting):
    from simsearch import Engine

    with Engine(tmp_path / "idx", encoder="counting") as engine:
        engine.index([library])
        calls = counting.calls
        engine.label("metal", [library / "bell"])
        assert counting.calls == calls
        assert engine.labels() == {"metal": 4}
        assert engine.unlabel([library / "bell" / "bell_0.wav"]) == 1
        assert engine.labels() == {"metal": 3}


def test_remove_deletes_files_and_their_vectors(engine, library):
    engine.index([library], label_from_folders=True)
    removed = engine.remove([library / "hum", library / "bell" / "bell_0.wav"])
    assert len(removed) == 5
    info = engine.info()
    assert info["files"] == 11 and engine.store.vector_index().ntotal == 11
    assert "hum" not in engine.labels() and engine.labels()["bell"] == 3
    assert all("/hum/" not in n.path for n in engine.query([library / "hum" / "hum_0.wav"], k=11)[0].neighbours)
