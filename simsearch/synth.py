"""Seeded synthetic sounds: the demo library, the tests and the benchmarks make their audio here.

Each function returns mono float32 samples in [-1, 1] of shape ``(round(seconds * sample_rate),)``
and takes a ``numpy.random.Generator`` so every sound is reproducible from a seed.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 22050


def _time(seconds: float, sample_rate: int) -> np.ndarray:
    return np.arange(max(1, int(round(seconds * sample_rate)))) / sample_rate


def _finish(y: np.ndarray, rng: np.random.Generator, peak: float | None = None) -> np.ndarray:
    y = y / max(1e-9, float(np.max(np.abs(y))))
    return (y * (peak if peak is not None else rng.uniform(0.3, 0.9))).astype(np.float32)


def bell(rng: np.random.Generator, *, seconds: float = 1.5, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Inharmonic partials with exponential decay (a struck metal bar)."""
    t = _time(seconds, sample_rate)
    f0 = rng.uniform(300, 900)
    y = sum(np.exp(-t * rng.uniform(2, 5) * r) * np.sin(2 * np.pi * f0 * r * t + rng.uniform(0, 6))
            for r in (1.0, 2.76, 5.4, 8.93))
    return _finish(y, rng)


def chirp(rng: np.random.Generator, *, seconds: float = 1.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A rising sine sweep (a bird-like or sci-fi chirp)."""
    t = _time(seconds, sample_rate)
    f_start, f_end = rng.uniform(300, 800), rng.uniform(2500, 5000)
    phase = 2 * np.pi * (f_start * t + (f_end - f_start) * t**2 / (2 * seconds))
    return _finish(np.sin(phase) * np.hanning(len(t)), rng)


def hum(rng: np.random.Generator, *, seconds: float = 1.5, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A low harmonic drone with slow wobble (an engine or transformer hum)."""
    t = _time(seconds, sample_rate)
    f0 = rng.uniform(45, 110)
    wobble = 1 + 0.02 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)
    y = sum(np.sin(2 * np.pi * f0 * h * wobble * t) / h for h in range(1, 8))
    return _finish(y + 0.02 * rng.standard_normal(len(t)), rng)


def rain(rng: np.random.Generator, *, seconds: float = 1.5, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Dense random droplets: short decaying noise bursts over soft broadband noise."""
    n = len(_time(seconds, sample_rate))
    y = 0.05 * rng.standard_normal(n)
    drop = np.exp(-np.arange(200) / 30.0) * rng.standard_normal(200)
    for start in rng.integers(0, max(1, n - 200), size=int(seconds * rng.uniform(80, 160))):
        y[start:start + 200] += drop * rng.uniform(0.2, 1.0)
    return _finish(y, rng)


def whoosh(rng: np.random.Generator, *, seconds: float = 1.2, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Noise whose band sweeps down with a swelling envelope (something passing by)."""
    import scipy.signal

    n = len(_time(seconds, sample_rate))
    noise = rng.standard_normal(n)
    out = np.zeros(n)
    edges = np.linspace(0, n, 9).astype(int)
    centres = np.geomspace(rng.uniform(3000, 6000), rng.uniform(300, 700), 8)
    for (a, b), centre in zip(zip(edges[:-1], edges[1:]), centres):
        sos = scipy.signal.butter(2, [centre * 0.7, min(centre * 1.4, sample_rate / 2 - 1)], "bandpass",
                                  fs=sample_rate, output="sos")
        out[a:b] = scipy.signal.sosfilt(sos, noise)[a:b]
    return _finish(out * np.hanning(n), rng)


def clicks(rng: np.random.Generator, *, seconds: float = 1.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A regular click train (a ticking clock or a ratchet)."""
    n = len(_time(seconds, sample_rate))
    y = np.zeros(n)
    period = int(sample_rate / rng.uniform(6, 14))
    click = np.exp(-np.arange(60) / 8.0) * np.sign(rng.standard_normal(60))
    for start in range(int(rng.integers(0, period)), n - 60, period):
        y[start:start + 60] += click
    return _finish(y + 0.005 * rng.standard_normal(n), rng)


def siren(rng: np.random.Generator, *, seconds: float = 2.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A two-tone wailing siren: a square-ish tone whose pitch swings slowly up and down."""
    t = _time(seconds, sample_rate)
    centre, depth, rate = rng.uniform(650, 850), rng.uniform(150, 250), rng.uniform(0.8, 1.6)
    freq = centre + depth * np.sin(2 * np.pi * rate * t)
    phase = 2 * np.pi * np.cumsum(freq) / sample_rate
    return _finish(np.tanh(3 * np.sin(phase)), rng)


def tone(rng: np.random.Generator, *, seconds: float = 1.0, sample_rate: int = SAMPLE_RATE,
         frequency: float | None = None) -> np.ndarray:
    """A steady sine tone."""
    t = _time(seconds, sample_rate)
    return _finish(np.sin(2 * np.pi * (frequency or rng.uniform(200, 2000)) * t), rng)


def noise_burst(rng: np.random.Generator, *, seconds: float = 0.5, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """White noise with a fast attack and decay."""
    n = len(_time(seconds, sample_rate))
    return _finish(rng.standard_normal(n) * np.exp(-np.linspace(0, 6, n)), rng)


KINDS = {"bell": bell, "chirp": chirp, "hum": hum, "rain": rain, "whoosh": whoosh, "clicks": clicks}
"""The demo library's categories; ``siren`` is kept apart to be taught later."""


def make(kind: str, seed: int, **options) -> np.ndarray:
    """One sound of ``kind`` (a key of :data:`KINDS`, or ``siren``/``tone``/``noise_burst``) from ``seed``."""
    generator = {**KINDS, "siren": siren, "tone": tone, "noise_burst": noise_burst}[kind]
    return generator(np.random.default_rng(seed), **options)
