"""Shared pieces of the benchmarks: synthetic vectors with realistic clustering, populating a
store through its API, timing, memory.

Every benchmark prints ratios against a baseline measured in the same run, because absolute
timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable

import numpy as np

DIM = 128  # the CNN's embedding size


def clustered_vectors(n: int, *, seed: int = 0, dim: int = DIM, n_clusters: int = 4096, latent: int = 32,
                      spread: float = 0.6, isotropic: float = 0.08) -> np.ndarray:
    """``(n, dim)`` unit float32 vectors that cluster like audio embeddings do.

    Cluster centres lie in a ``latent``-dimensional subspace with a decaying spectrum
    (embeddings use few directions), cluster sizes are heavy-tailed (a few common kinds of
    sound, many rare ones), and points spread inside the subspace plus a little isotropic
    noise. The nearest neighbour of a fresh point is at cosine ~0.9 and its 10th at ~0.85
    (as FSDD's are with the CNN). The centres depend only on the fixed centre seed, so
    vectors drawn with different ``seed`` come from the same distribution.
    """
    centre_rng = np.random.default_rng(7)
    scale = (1 / np.arange(1, latent + 1) ** 0.5).astype(np.float32)
    basis = np.linalg.qr(centre_rng.standard_normal((dim, latent)))[0].T.astype(np.float32)  # (latent, dim)
    centres = (centre_rng.standard_normal((n_clusters, latent)).astype(np.float32) * scale) @ basis
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = centre_rng.pareto(1.2, n_clusters) + 1
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.choice(n_clusters, m, p=weights / weights.sum())
        noise = (rng.standard_normal((m, latent)).astype(np.float32) * scale) @ basis / np.sqrt((scale ** 2).sum())
        x = centres[which] + spread * noise + isotropic * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def populate(store, vectors: np.ndarray, *, segments_per_file: int = 8, prefix: str = "/bench/lib",
             labelled_every: int = 0, files_per_commit: int = 5000, first: int = 0) -> list[int]:
    """Add ``vectors`` to ``store`` through its API as files of ``segments_per_file``
    segments (3 s windows every 1.5 s); every ``labelled_every``-th file gets a label.
    Returns the new file ids."""
    from simsearch.store import FileRecord

    per = segments_per_file
    bounds = [(1.5 * i, 1.5 * i + 3.0) for i in range(per)]
    ids = []
    n_files = len(vectors) // per
    for start in range(0, n_files, files_per_commit):
        with store.writing():
            for f in range(start, min(n_files, start + files_per_commit)):
                number = first + f
                record = FileRecord(f"{prefix}/{number // 1000:04d}/clip_{number:07d}.wav", 1000 + number, number,
                                    f"{number:032x}", 1.5 * per + 1.5, 16000)
                file_id = store.add_file(record, bounds, vectors[f * per:(f + 1) * per])
                if labelled_every and number % labelled_every == 0:
                    store.set_label([file_id], f"kind{number % 17}")
                ids.append(file_id)
    return ids


def timed(fn: Callable, repeat: int) -> np.ndarray:
    """Seconds each of ``repeat`` calls of ``fn()`` took."""
    out = np.empty(repeat)
    for i in range(repeat):
        started = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - started
    return out


def fastest_threads(probe: Callable[[], object]) -> int:
    """The torch thread count (1 or all) under which ``probe()`` runs faster, now; it is left
    set. Baselines get whichever suits them: on a busy machine torch's default (layers split
    across all cores) can be 30x slower than one thread, which would flatter our ratios."""
    import torch

    best = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        probe()  # warm-up
        best[threads] = min(timed(probe, 3))
    choice = min(best, key=best.get)
    torch.set_num_threads(choice)
    return choice


def ms(seconds: np.ndarray) -> str:
    return f"p50 {np.percentile(seconds, 50) * 1e3:.2f} ms, p99 {np.percentile(seconds, 99) * 1e3:.2f} ms"


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    ``VmHWM`` of ``/proc/self/status``, not ``getrusage``: Linux carries ``ru_maxrss`` over
    ``exec``, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` ``(q, k)`` present in the same row of ``found``."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def machine() -> str:
    load = os.getloadavg()[0]
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f}"


def report(title: str, figures: dict) -> None:
    """Print ``figures`` under ``title`` as aligned lines and as one JSON line (for the README)."""
    print(f"== {title} ({machine()})")
    for key, value in figures.items():
        print(f"  {key:<38} {value}")
    print("json " + json.dumps(figures, default=str))
