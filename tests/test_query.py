"""`query`: neighbours, categories, include/exclude inside the search, long-file time ranges."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_wav
from simsearch import AudioReadError, synth


@pytest.fixture
def indexed(engine, library):
    engine.index([library], label_from_folders=True)
    return engine


@pytest.mark.parametrize("kind", ["bell", "chirp", "hum", "clicks"])
def test_fresh_clip_is_categorised_by_its_kind(indexed, fresh_clip, kind):
    result = indexed.query([fresh_clip(kind)], k=3, unknown_threshold=0.0)[0]
    assert result.category is not None and result.category.label == kind
    assert 0.5 < result.category.confidence <= 1.0
    assert result.neighbours[0].label == kind
    scores = [n.score for n in result.neighbours]
    assert scores == sorted(scores, reverse=True)


def test_exclude_filters_inside_the_search_before_top_k(indexed, fresh_clip):
    clip = fresh_clip("bell")
    result = indexed.query([clip], k=4, exclude=["*/bell/*"])[0]
    assert len(result.neighbours) == 4, "filtering must happen before the top k are taken"
    assert all("/bell/" not in n.path for n in result.neighbours)
    assert result.category is None or result.category.label != "bell"


def test_include_restricts_neighbours_and_voters(indexed, fresh_clip):
    result = indexed.query([fresh_clip("bell")], k=10, include=["*/hum/*", "*/clicks/*"])[0]
    assert len(result.neighbours) == 8
    assert {n.label for n in result.neighbours} == {"hum", "clicks"}
    assert result.category is None or result.category.label in {"hum", "clicks"}


def test_query_with_an_indexed_file_does_not_return_itself(indexed, library):
    clip = library / "chirp" / "chirp_0.wav"
    result = indexed.query([clip], k=3, unknown_threshold=0.0)[0]
    assert str(clip) not in [n.path for n in result.neighbours]
    assert result.category.label == "chirp"


def test_json_schema(indexed, fresh_clip):
    data = indexed.query([fresh_clip("hum")], k=2, unknown_threshold=0.0)[0].to_dict()
    assert set(data) == {"path", "category", "neighbours"}
    assert set(data["category"]) == {"label", "confidence"}
    for n in data["neighbours"]:
        assert set(n) == {"path", "label", "score", "start", "end"}
        assert isinstance(n["score"], float) and n["end"] > n["start"] >= 0


def test_long_file_reports_the_best_matching_time_range(engine, tmp_path, fresh_clip):
    long = write_wav(tmp_path / "long.wav", np.concatenate(
        [synth.make("rain", 1, seconds=6.0), synth.make("chirp", 7, seconds=3.0), synth.make("rain", 2, seconds=6.0)]))
    engine.index([long])
    best = engine.query([fresh_clip("chirp", seed=8)], k=1)[0].neighbours[0]
    assert best.path == str(long)
    assert best.end - best.start == 3.0
    assert 3.0 <= best.start <= 7.5 and best.end >= 7.5, "the window must cover the chirp at 6-9 s"


def test_unreadable_query_raises_or_is_collected(indexed, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF")
    with pytest.raises(AudioReadError, match="bad.wav"):
        indexed.query([bad])
    errors = []
    assert indexed.query([bad], errors=errors) == [] and errors[0][0] == str(bad)


def test_empty_index_answers_unknown_with_no_neighbours(engine, fresh_clip):
    result = engine.query([fresh_clip("bell")], k=3)[0]
    assert result.category is None and result.neighbours == []


def test_no_filter_answers_as_a_filter_that_keeps_everything(engine, library, fresh_clip):
    """Unfiltered queries reuse the segment selections kept with the catalog; they must
    answer exactly as a filter computed afresh for the same files (some files unlabelled)."""
    engine.index([library], label_regex=r"^(bell|chirp)_")
    for kind in ("bell", "hum"):
        clip = fresh_clip(kind)
        for _ in range(2):  # the second query is served from the kept selections
            plain = engine.query([clip], k=6, unknown_threshold=0.0)[0]
            everything = engine.query([clip], k=6, unknown_threshold=0.0, include=["*"])[0]
            assert plain == everything and plain.category is not None
