"""Batching and parallelism change how fast vectors are made, never which vectors.

The one-at-a-time path is what a query does: decode one file (:func:`simsearch.audio.load`),
cut it, embed its segments (:meth:`Engine.embed`). Indexing decodes in worker processes, one
batch ahead of a thread that embeds the segments of many files in one encoder call and
writes one transaction per batch; every stored vector must be the one-at-a-time vector
(within 1e-5), whatever the batch size, and searching many query rows at once must give
what searching each alone gives.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from conftest import write_wav

from simsearch import Engine, EngineConfig, audio, decode_pool, indexer, read_ahead, synth
from simsearch.config import ReadConfig
from simsearch.errors import CorruptIndexError, SimsearchError

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Short and long files (several windows), at 8, 22.05 and 44.1 kHz, mono and stereo."""
    root = tmp_path_factory.mktemp("mixed")
    rates = (8000, 22050, 44100)
    for i, kind in enumerate(("bell", "chirp", "hum", "clicks", "rain", "whoosh")):
        rate = rates[i % 3]
        short = synth.make(kind, i, seconds=0.3 + 0.4 * i, sample_rate=rate)
        write_wav(root / f"short_{kind}.wav", short, rate)
    for i, kind in enumerate(("hum", "bell")):
        long = np.concatenate([synth.make(kind, 10 + i, seconds=2.0), synth.make("clicks", 20 + i, seconds=3.0)])
        stereo = np.stack([long, synth.make("rain", 30 + i, seconds=5.0)], axis=1) if i else long
        write_wav(root / f"long_{kind}.wav", stereo)
    return root


def one_at_a_time(engine: Engine, path: str) -> tuple[list[tuple[float, float]], np.ndarray]:
    decoded = audio.load(path, sample_rate=engine.encoder.sample_rate)
    return engine.embed(decoded.samples)


@pytest.fixture(scope="module")
def alone(mixed, tmp_path_factory):
    """``{path: (bounds, vectors)}`` the query path gives for each file of ``mixed``."""
    with Engine(tmp_path_factory.mktemp("alone") / "index", encoder="cnn") as engine:
        return {str(p): one_at_a_time(engine, str(p)) for p in sorted(mixed.iterdir())}


@pytest.mark.parametrize("batch_files", [1, 64])
def test_indexed_vectors_are_the_one_at_a_time_vectors(mixed, alone, tmp_path, batch_files):
    with Engine(tmp_path / "index", encoder="cnn", config=EngineConfig(batch_files=batch_files)) as engine:
        report = engine.index([mixed])
        assert len(report.added) == 8 and not report.failed
        for path in report.added:
            bounds, vectors = engine.store.file_vectors(engine.store.file_by_path(path).id)
            expected_bounds, expected = alone[path]
            assert np.allclose(bounds, expected_bounds, atol=1e-9), path
            assert vectors.shape == expected.shape and np.abs(vectors - expected).max() <= 1e-5, path
        assert sum(len(engine.store.file_vectors(engine.store.file_by_path(p).id)[1]) for p in report.added) > 8


def test_the_decode_pool_gives_what_decoding_here_gives(mixed):
    paths = sorted(str(p) for p in mixed.iterdir())
    with decode_pool.DecodePool(sample_rate=16000, max_seconds=ReadConfig().max_seconds, timeout=60, workers=2) as pool:
        results = pool.run(paths)
    for path, result in zip(paths, results):
        here = audio.load(path, sample_rate=16000)
        assert result.error is None and result.content_hash == here.content_hash
        assert np.array_equal(result.decoded.samples, here.samples), path  # bit for bit


def test_segments_of_many_files_in_one_call_are_each_files_own(mixed, alone, tmp_path):
    with Engine(tmp_path / "index", encoder="cnn") as engine:
        paths = sorted(str(p) for p in mixed.iterdir())
        together = indexer.embed_batch(engine, [audio.load(p, sample_rate=16000) for p in paths])
        for path, (bounds, vectors) in zip(paths, together):
            assert bounds == alone[path][0] and np.abs(vectors - alone[path][1]).max() <= 1e-5


def test_many_query_rows_search_as_each_alone(mixed, alone, tmp_path):
    with Engine(tmp_path / "index", encoder="cnn") as engine:
        engine.index([mixed])
        _, queries = alone[str(mixed / "long_bell.wav")]
        scores, ids = engine.store.search(queries, 5)
        for row, query in enumerate(queries):
            alone_scores, alone_ids = engine.store.search(query[None], 5)
            assert np.array_equal(ids[row], alone_ids[0]) and np.allclose(scores[row], alone_scores[0], atol=1e-6)


@pytest.mark.parametrize("ask_all", [False, True], ids=["filtered-questions", "a-question-per-file"])
def test_moves_and_copies_are_decided_the_same_reading_ahead(tmp_path, library, monkeypatch, ask_all):
    """Small batches, so a move and a copy of the same content land in different batches
    than the file they come from, while earlier batches are still being written. The reader
    asks about every file, or only about those whose hash prefix is indexed."""
    if ask_all:
        monkeypatch.setattr(read_ahead, "ASK_ALL_RATIO", 0)
    with Engine(tmp_path / "idx", encoder="features", config=EngineConfig(batch_files=2)) as engine:
        engine.index([library], label_from_folders=True)
        os.rename(library / "bell" / "bell_0.wav", library / "hum" / "zz_moved_bell.wav")
        (library / "chirp" / "chirp_0_copy.wav").write_bytes((library / "chirp" / "chirp_0.wav").read_bytes())
        os.rename(library / "clicks" / "clicks_1.wav", library / "clicks" / "aa_renamed.wav")
        (library / "clicks" / "zz_copy_of_renamed.wav").write_bytes((library / "clicks" / "aa_renamed.wav").read_bytes())
        report = engine.index([library], label_from_folders=True, prune=True)
        moved = dict(report.moved)
        assert moved == {str(library / "bell" / "bell_0.wav"): str(library / "hum" / "zz_moved_bell.wav"),
                         str(library / "clicks" / "clicks_1.wav"): str(library / "clicks" / "aa_renamed.wav")}
        assert sorted(report.added) == [str(library / "chirp" / "chirp_0_copy.wav"),
                                        str(library / "clicks" / "zz_copy_of_renamed.wav")]
        assert engine.info()["files"] == 18 and not report.failed


def test_an_error_while_embedding_stops_the_reader_and_its_workers(tmp_path, library, monkeypatch):
    calls, helpers = [], []

    def failing(engine, decoded):
        calls.append(len(decoded))
        helpers.extend(_descendants(os.getpid()))  # the reader process and its decoders, at work
        raise RuntimeError("the encoder broke")

    monkeypatch.setattr(indexer, "embed_batch", failing)
    with Engine(tmp_path / "idx", encoder="features", config=EngineConfig(batch_files=2)) as engine:
        with pytest.raises(RuntimeError, match="the encoder broke"):
            engine.index([library])
        assert calls == [16] and engine.info()["files"] == 0  # one group: 8 batches of 2
    assert len(helpers) >= 2  # a reader and at least one decoder
    deadline = time.monotonic() + 5
    while (alive := [pid for pid in helpers if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)  # decoders are killed by the kernel when their reader dies: soon, not at once
    assert alive == [], "the reader or its decoders were left running"


def test_a_reader_that_dies_is_a_clear_error_and_keeps_what_was_written(tmp_path, library, monkeypatch):
    real_run, real_embed = decode_pool.DecodePool.run, indexer.embed_batch
    runs, received = [], tmp_path / "first group received"

    def dies_on_the_second_group(self, paths, **kwargs):  # runs in the reader process
        runs.append(paths)
        if len(runs) == 2:
            for _ in range(200):  # once the first group has been handed over
                if received.exists():
                    break
                time.sleep(0.05)
            os._exit(1)  # as if killed for want of memory
        return real_run(self, paths, **kwargs)

    def embed(engine, decoded):
        received.touch()
        return real_embed(engine, decoded)

    monkeypatch.setattr(decode_pool.DecodePool, "run", dies_on_the_second_group)
    monkeypatch.setattr(indexer, "embed_batch", embed)
    real_groups = indexer.groups
    monkeypatch.setattr(indexer, "groups", lambda work: real_groups(work, max_files=4))
    with Engine(tmp_path / "idx", encoder="features", config=EngineConfig(batch_files=2)) as engine:
        with pytest.raises(SimsearchError, match="reading the files stopped unexpectedly"):
            engine.index([library])
        assert engine.info()["files"] == 4  # the first group's two batches were written
        monkeypatch.undo()
        assert len(engine.index([library]).added) == 12  # and the rest comes with the next run


def test_an_error_while_recognising_a_move_is_raised_by_index_and_writes_nothing(tmp_path, library, monkeypatch):
    with Engine(tmp_path / "idx", encoder="features") as engine:
        engine.index([library / "bell"])
        (library / "hum" / "a_copy_of_bell_0.wav").write_bytes((library / "bell" / "bell_0.wav").read_bytes())

        def damaged(*args, **kwargs):  # answered in this process, for the reader process
            raise CorruptIndexError("simsearch.db: database disk image is malformed")

        monkeypatch.setattr(indexer, "find_moved", damaged)
        with pytest.raises(CorruptIndexError, match="malformed"):
            engine.index([library])
        monkeypatch.undo()
        assert engine.info()["files"] == 4
        assert len(engine.index([library]).added) == 13


def _descendants(pid: int) -> list[int]:
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_the_shipped_mel_filter_bank_is_librosas_bit_for_bit():
    """The CNN computes its filter bank itself (importing librosa costs a cold query about a
    second); it must be exactly what training used."""
    import librosa
    import torch

    from simsearch import cnn

    expected = librosa.filters.mel(sr=cnn.SAMPLE_RATE, n_fft=cnn.N_FFT, n_mels=cnn.N_MELS, fmin=cnn.FMIN, fmax=cnn.FMAX)
    assert torch.equal(cnn._mel_basis(), torch.from_numpy(expected.astype(np.float32)))


def test_the_folded_inference_model_gives_the_trained_models_vectors(mixed, alone):
    """The inference copy (BatchNorm folded into the convolutions, channels-last weights),
    in batches or one clip at a time, gives the model as trained (plain layout, unfolded,
    one clip alone), and a model changed in place is folded again."""
    import torch

    from simsearch import cnn

    model = cnn.load_default()
    waves = [audio.load(p, sample_rate=16000).samples for p in sorted(alone)]
    with torch.inference_mode():
        plain = np.concatenate([model(cnn.log_mel(torch.from_numpy(cnn.preprocess(w))[None])).numpy() for w in waves])
    folded = cnn.embed_waveforms(model, waves * 3, batch_frames=100)[:len(waves)]
    one_by_one = np.concatenate([cnn.embed_waveforms(model, [w]) for w in waves])
    assert np.abs(plain - one_by_one).max() <= 1e-5
    assert cnn._FOLDED.get(model) is not None and np.abs(plain - folded).max() <= 1e-5
    changed = cnn.AudioCNN()
    changed.load_state_dict(model.state_dict())
    changed.eval()
    before = cnn.embed_waveforms(changed, waves * 3, batch_frames=100)[:1]
    with torch.no_grad():
        changed.proj.bias.add_(1.0)  # in place, as an optimiser step would
    after = cnn.embed_waveforms(changed, waves * 3, batch_frames=100)[:1]
    assert np.abs(after - cnn.embed_waveforms(changed, waves[:1], batch_frames=10**6)).max() <= 1e-5
    assert np.abs(after - before).max() > 1e-3


def test_the_decode_pool_asks_about_files_in_their_order(mixed, tmp_path):
    """Workers finish reading in any order; ``wanted`` is still asked in path order, so a
    decision that depends on earlier ones (which copy takes a move) never depends on timing."""
    big = write_wav(tmp_path / "big.wav", synth.make("rain", 1, seconds=60.0))
    paths = [str(big)] + sorted(str(p) for p in mixed.iterdir())
    asked = []
    with decode_pool.DecodePool(sample_rate=16000, max_seconds=ReadConfig().max_seconds, timeout=60, workers=2) as pool:
        results = pool.run(paths, wanted=lambda i, content_hash: asked.append(i) or i % 2 == 0)
    assert asked == list(range(len(paths)))
    assert [r.decoded is not None for r in results] == [i % 2 == 0 for i in range(len(paths))]
