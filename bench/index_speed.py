"""Index throughput of `simsearch index` with the default encoder (cnn), end to end.

    python bench/index_speed.py [--fsdd DIR] [--long-files 12] [--long-seconds 120] [--skip-naive]

Two libraries: FSDD (3000 short 8 kHz clips, read in place) and long files generated with
``simsearch.synth`` (22.05 kHz, several kinds of sound in a row; written to a temp dir).
For each, in the same run:

* **cli**: ``simsearch index DIR --index NEW --quiet`` as a subprocess: wall time from
  launch to exit, interpreter start and imports included;
* **api**: ``Engine.index`` in this process with torch already imported (the pipeline alone);
  also into an index that already holds one other file, where every file's content must be
  checked against the indexed ones (a possible move) before it is decoded;
* **naive** (the baseline): ``librosa.load`` + ``librosa.feature.melspectrogram`` + the model,
  one file (for a long file: one window, cut as simsearch cuts it) at a time;

reported as seconds of audio per second of wall time (x real time) and as ratios. The CNN's
cost per second of audio (FLOPs) and the model alone on ready-made batches bound what any
pipeline can reach on this machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fastest_threads, report

FSDD = Path(__file__).resolve().parents[2] / "shared/data/fsdd/recordings"


def long_library(directory: Path, n_files: int, seconds: float) -> Path:
    """``n_files`` files of ``seconds`` each: synth sounds of every kind in a row, 22.05 kHz."""
    import soundfile as sf

    from simsearch import synth

    kinds = sorted(synth.KINDS)
    for f in range(n_files):
        rng, parts, total = np.random.default_rng(f), [], 0.0
        while total < seconds:
            kind = kinds[int(rng.integers(len(kinds)))]
            part = synth.make(kind, f * 1000 + len(parts), seconds=float(rng.uniform(1.0, 4.0)))
            parts += [part, np.zeros(int(rng.uniform(0.1, 0.8) * synth.SAMPLE_RATE), np.float32)]
            total += (len(parts[-2]) + len(parts[-1])) / synth.SAMPLE_RATE
        y = np.concatenate(parts)[:int(seconds * synth.SAMPLE_RATE)]
        sf.write(directory / f"field_{f:03d}.wav", y, synth.SAMPLE_RATE, subtype="PCM_16")
    return directory


def _write_other(path: Path) -> None:
    """One short sound unlike the library's files: an index that is not empty."""
    import soundfile as sf

    from simsearch import synth

    sf.write(path, synth.make("bell", 99, seconds=1.0), synth.SAMPLE_RATE, subtype="PCM_16")


def audio_seconds(files: list[Path]) -> float:
    import soundfile as sf

    return sum(sf.info(str(f)).duration for f in files)


def windowed_seconds(files: list[Path]) -> float:
    """Seconds of audio the encoder is given: the sum of every segment's length."""
    import soundfile as sf

    from simsearch import audio
    from simsearch.config import SegmentConfig

    total = 0.0
    for path in files:
        n = round(sf.info(str(path)).duration * 16000)
        total += sum(e - s for s, e in audio.segment_bounds(n, 16000, SegmentConfig())) / 16000
    return total


def naive(files: list[Path]) -> tuple[float, int]:
    """The baseline: librosa.load + melspectrogram + model, one file (or window) at a time,
    with the torch thread count that suits it best right now. Returns (seconds, threads)."""
    import librosa
    import torch

    from simsearch import audio, cnn
    from simsearch.config import SegmentConfig

    model = cnn.load_default()

    def one(path: Path) -> None:
        y, sr = librosa.load(path, sr=cnn.SAMPLE_RATE)
        y = np.pad(y, (0, max(0, cnn.MIN_SAMPLES - len(y))))  # the CNN needs 16 frames
        for s, e in audio.segment_bounds(len(y), sr, SegmentConfig()):
            mel = librosa.feature.melspectrogram(y=y[s:e], sr=sr, n_fft=cnn.N_FFT, hop_length=cnn.HOP_LENGTH,
                                                 n_mels=cnn.N_MELS, fmin=cnn.FMIN, fmax=cnn.FMAX)
            with torch.inference_mode():
                model(torch.from_numpy(np.log(mel + cnn.LOG_EPS))[None])

    default = torch.get_num_threads()
    threads = fastest_threads(lambda: [one(p) for p in files[:20]])  # also compiles librosa's kernels
    started = time.perf_counter()
    for path in files:
        one(path)
    elapsed = time.perf_counter() - started
    torch.set_num_threads(default)
    return elapsed, threads


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its reaped children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cli(directory: Path, index: Path) -> tuple[float, float]:
    """(wall, CPU seconds) of ``simsearch index`` in a new process (decode workers included)."""
    cpu, started = cpu_seconds(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "simsearch.cli", "index", str(directory), "--index", str(index), "--quiet"],
                   check=True)
    return time.perf_counter() - started, cpu_seconds() - cpu


def api(directory: Path, index: Path, *, already: Path | None = None) -> tuple[float, float]:
    """(wall, CPU seconds) of ``Engine.index`` with the model loaded; with ``already`` (a file),
    into an index that holds it, so that every file's content must be checked for a move."""
    from simsearch import Engine

    with Engine(index) as engine:
        _ = engine.encoder  # loaded before the clock starts: this measures the pipeline
        if already is not None:
            engine.index([already])
        cpu, started = cpu_seconds(), time.perf_counter()
        report = engine.index([directory])
        elapsed = time.perf_counter() - started
    assert not report.failed, report.failed[:3]
    return elapsed, cpu_seconds() - cpu


def model_ceiling() -> tuple[float, float]:
    """(GFLOP per second of audio, x real time of the encoder alone): the CNN's cost, counted
    by torch, and ``embed_waveforms`` on 64 ready 3 s windows (front end + model, nothing
    read, decoded or stored), the most any pipeline could sustain here now."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from simsearch import cnn

    model = cnn.load_default()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(cnn.log_mel(torch.randn(1, 3 * cnn.SAMPLE_RATE)))
    rng = np.random.default_rng(0)
    windows = [(rng.standard_normal(3 * cnn.SAMPLE_RATE) * np.hanning(3 * cnn.SAMPLE_RATE)).astype(np.float32)
               for _ in range(64)]
    cnn.embed_waveforms(model, windows)  # warm-up
    started, runs = time.perf_counter(), 0
    while time.perf_counter() - started < 5:
        cnn.embed_waveforms(model, windows)
        runs += 1
    elapsed = time.perf_counter() - started
    return counter.get_total_flops() / 3 / 1e9, 64 * 3 * runs / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdd", type=Path, default=FSDD)
    parser.add_argument("--long-files", type=int, default=12)
    parser.add_argument("--long-seconds", type=float, default=120.0)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--only", choices=["fsdd", "long"])
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        libraries = {}
        if args.only in (None, "fsdd"):
            libraries["fsdd"] = args.fsdd
        if args.only in (None, "long"):
            (tmp / "long").mkdir()
            libraries["long"] = long_library((tmp / "long").resolve(), args.long_files, args.long_seconds)
        (tmp / "other").mkdir()
        other = tmp / "other" / "other.wav"  # what the "non-empty" index holds before a run
        _write_other(other)
        flops, ceiling = model_ceiling()
        figures = {"torch threads": torch.get_num_threads(), "CNN GFLOP per audio second": round(flops, 3),
                   "encoder alone, 3 s windows (x rt)": round(ceiling, 1)}
        for name, directory in libraries.items():
            files = sorted(p for p in directory.iterdir() if p.suffix == ".wav")
            seconds = audio_seconds(files)
            figures[f"{name}: files, audio"] = f"{len(files)} files, {seconds:.0f} s"
            naive_s, naive_threads = naive(files) if not args.skip_naive else (float("nan"), 0)
            cli_s, cli_cpu = cli(directory, tmp / f"{name}-cli")
            api_s, api_cpu = api(directory, tmp / f"{name}-api")
            nonempty_s, _ = api(directory, tmp / f"{name}-api-nonempty", already=other)
            figures[f"{name}: naive loop (baseline)"] = (f"{naive_s:.1f} s = {seconds / naive_s:.0f}x real time "
                                                         f"({naive_threads} torch thread(s))")
            figures[f"{name}: simsearch index (cli)"] = f"{cli_s:.1f} s = {seconds / cli_s:.0f}x real time"
            figures[f"{name}: Engine.index (api)"] = f"{api_s:.1f} s = {seconds / api_s:.0f}x real time"
            figures[f"{name}: Engine.index into an index holding a file (api)"] = \
                f"{nonempty_s:.1f} s = {seconds / nonempty_s:.0f}x real time ({api_s / nonempty_s:.2f}x the empty index's speed)"
            figures[f"{name}: CPU seconds (cli, api)"] = (round(cli_cpu, 1), round(api_cpu, 1))
            # What 2 otherwise idle cores could do with this much CPU work, if it all ran in
            # parallel: the ceiling the measured wall time approaches as the machine quiets.
            figures[f"{name}: x real time per 2 idle cores (cli, api)"] = (round(2 * seconds / cli_cpu),
                                                                         round(2 * seconds / api_cpu))
            figures[f"{name}: cli vs naive"] = f"{naive_s / cli_s:.1f}x"
            figures[f"{name}: api vs naive"] = f"{naive_s / api_s:.1f}x"
            windows = windowed_seconds(files)  # long files: 3 s windows every 1.5 s embed each second twice
            figures[f"{name}: seconds the CNN embeds"] = round(windows)
            figures[f"{name}: GFLOP/s sustained (cli, api)"] = (round(flops * windows / cli_s, 1),
                                                                 round(flops * windows / api_s, 1))
        report("index throughput", figures)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
