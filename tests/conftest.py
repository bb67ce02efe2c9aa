"""Shared fixtures: every test makes its own audio (seeded synthetic sounds) in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from simsearch import Engine, synth
from simsearch.encoders import ENCODERS, FeaturesEncoder

KINDS = ("bell", "chirp", "hum", "clicks")


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = synth.SAMPLE_RATE, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, sample_rate, subtype=subtype)
    return path


@pytest.fixture
def library(tmp_path) -> Path:
    """``library/<kind>/<kind>_<i>.wav``: 4 kinds x 4 clips, labelled by folder."""
    root = tmp_path / "library"
    for k, kind in enumerate(KINDS):
        for i in range(4):
            write_wav(root / kind / f"{kind}_{i}.wav", synth.make(kind, 100 * k + i))
    return root


@pytest.fixture
def fresh_clip(tmp_path):
    """Write a new clip of ``kind`` (not in the library) and return its path."""
    def make(kind: str, seed: int = 999, name: str | None = None) -> Path:
        return write_wav(tmp_path / "queries" / (name or f"{kind}_{seed}.wav"), synth.make(kind, seed))
    return make


class CountingEncoder(FeaturesEncoder):
    """The features encoder, counting how many segments it embedded (registered as ``counting``)."""

    name = "counting"
    calls = 0

    def embed(self, waves):
        CountingEncoder.calls += len(waves)
        return super().embed(waves)


ENCODERS["counting"] = CountingEncoder


@pytest.fixture
def counting():
    CountingEncoder.calls = 0
    return CountingEncoder


@pytest.fixture
def engine(tmp_path):
    """An engine on a fresh index using the fast handcrafted encoder."""
    with Engine(tmp_path / "index", encoder="features") as engine:
        yield engine
