"""Warm query through ``Engine.query`` (decode + embed + search + vote) of a 3 s clip.

    python bench/query_speed.py [--vectors 100000] [--queries 200]

The index holds ``--vectors`` synthetic clustered vectors (files of 4 segments, one file in
10 labelled), populated through the Store API under the shipped CNN's name, so queries
embed with the real CNN. The query is a 3 s synthetic clip at 22.05 kHz. After one warm-up
query, each query is timed, and each of its stages inside it; then each stage alone in a loop
(faster: its data stay in the CPU caches).

Baseline (same run): the naive query: ``librosa.load`` + log-mel + the model, then a
brute-force numpy dot product against every vector and a sort.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import clustered_vectors, fastest_threads, ms, populate, report, timed


def make_clip(path: Path) -> Path:
    import soundfile as sf

    from simsearch import synth

    y = np.concatenate([synth.make("bell", 1, seconds=1.5), synth.make("chirp", 2, seconds=1.5)])
    sf.write(path, y, synth.SAMPLE_RATE, subtype="PCM_16")
    return path


def build_index(directory: Path, n: int) -> None:
    from simsearch import cnn
    from simsearch.store import Store

    store = Store(directory)
    with store.writing():
        store.set_encoder(cnn.MODEL_NAME, cnn.MODEL_VERSION, cnn.EMBEDDING_DIM)
    populate(store, clustered_vectors(n, seed=0), segments_per_file=4, labelled_every=10)
    store.vector_index()
    store.close()


def naive_query(clip: Path, vectors: np.ndarray, model) -> None:
    import librosa
    import torch

    from simsearch import cnn

    y, sr = librosa.load(clip, sr=cnn.SAMPLE_RATE)
    mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=cnn.N_FFT, hop_length=cnn.HOP_LENGTH, n_mels=cnn.N_MELS,
                                         fmin=cnn.FMIN, fmax=cnn.FMAX)
    with torch.inference_mode():
        q = model(torch.from_numpy(np.log(mel + cnn.LOG_EPS))[None]).numpy()
    scores = vectors @ q[0]
    np.argsort(-scores)[:10]


@contextlib.contextmanager
def stage_clocks(engine, stages: dict[str, list[float]]):
    """Time ``engine``'s decode, embed and search+vote steps as :meth:`Engine.query` calls them.

    Stages timed alone in their own loops add up to less than a query: each keeps the
    CPU caches warm for itself, while in a query the search (tens of MB of vectors scanned)
    evicts the CNN's weights and the CNN's activations evict the index."""
    def clocked(name: str, fn):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[name].append(time.perf_counter() - started)
        return call

    engine._decode = clocked("decode", engine._decode)
    engine.embed = clocked("embed", engine.embed)
    engine.query_vectors = clocked("search", engine.query_vectors)
    try:
        yield
    finally:
        del engine._decode, engine.embed, engine.query_vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    import torch

    from simsearch import Engine, audio, cnn, search
    from simsearch.store import vector_cache

    tmp = Path(tempfile.mkdtemp())
    try:
        clip = make_clip(tmp / "clip.wav")
        started = time.perf_counter()
        build_index(tmp / "index", args.vectors)
        figures = {"vectors": args.vectors, "populate + build_s": round(time.perf_counter() - started, 1),
                   "torch threads": torch.get_num_threads()}
        with Engine(tmp / "index") as engine:
            figures["index type"] = vector_cache.describe_index(engine.store.vector_index())
            result = engine.query([clip], k=5)[0]  # warm-up: loads the model, the catalog, the index
            figures["answer"] = f"{len(result.neighbours)} neighbours, category {result.category}"
            stages = {"decode": [], "embed": [], "search": []}
            with stage_clocks(engine, stages):  # each stage timed inside the real queries
                total = timed(lambda: engine.query([clip], k=5), args.queries)
            rest = total - sum(np.asarray(v) for v in stages.values())

            decoded = engine._decode(str(clip))
            decode = timed(lambda: engine._decode(str(clip)), args.queries)
            embed = timed(lambda: engine.embed(decoded.samples), args.queries)
            _, vectors = engine.embed(decoded.samples)
            catalog = engine.catalog()
            allowed = search.allowed_files(catalog)
            search_vote = timed(lambda: engine.query_vectors(vectors, path=str(clip), content_hash=decoded.content_hash,
                                                             k=5, allowed=allowed), args.queries)
        figures.update({"Engine.query (decode+embed+search+vote)": ms(total),
                        "  decode (read, hash, soundfile, soxr)": ms(np.asarray(stages["decode"])),
                        "  embed (CNN, 3 s)": ms(np.asarray(stages["embed"])),
                        "  search + vote": ms(np.asarray(stages["search"])),
                        "  the rest (glue)": ms(rest),
                        "each stage alone in a loop (decode, embed, search+vote)":
                            f"p50 {np.median(decode) * 1e3:.2f}, {np.median(embed) * 1e3:.2f}, "
                            f"{np.median(search_vote) * 1e3:.2f} ms"})
        everything = clustered_vectors(args.vectors, seed=0)
        model = cnn.load_default()
        threads = fastest_threads(lambda: naive_query(clip, everything, model))  # compiles librosa's kernels too
        naive = timed(lambda: naive_query(clip, everything, model), max(20, args.queries // 4))
        figures["naive query (baseline, same run)"] = f"{ms(naive)} ({threads} torch thread(s))"
        figures["speed-up p50 vs naive"] = f"{np.median(naive) / np.median(total):.1f}x"
        report("warm query", figures)
        del audio
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
