"""Settings, as frozen dataclasses with readable defaults.

Everything that changes what a vector means (sample rate, windowing) lives here so that the
store can record it and refuse to mix vectors made with different settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc",
     ".au", ".snd", ".caf", ".w64", ".rf64"}
)
"""File suffixes picked up when indexing a folder (what libsndfile reads)."""

DEFAULT_ENCODER = "cnn"


@dataclass(frozen=True)
class SegmentConfig:
    """How a file is cut into segments, one vector each.

    A file no longer than ``single_max_seconds`` is one segment. A longer one is cut into
    windows of ``window_seconds`` every ``hop_seconds``; the last window is aligned to the
    end of the file so no audio is left out.
    """

    window_seconds: float = 3.0
    hop_seconds: float = 1.5
    single_max_seconds: float = 4.0


@dataclass(frozen=True)
class VoteConfig:
    """Weighted k-nearest-neighbour vote over labelled neighbours.

    Each of the ``k`` nearest labelled files votes for its label with weight
    ``exp(similarity / temperature)``; ``confidence`` is the winner's share of the weight.
    The answer is "unknown" (no category) when the winner's best similarity is below
    ``unknown_threshold`` (``None``: the encoder's calibrated default).
    """

    k: int = 10
    temperature: float = 0.05
    unknown_threshold: float | None = None


@dataclass(frozen=True)
class ReadConfig:
    """Limits on decoding one file."""

    max_seconds: float = 3600.0 * 3
    timeout_seconds: float = 120.0


@dataclass(frozen=True)
class EngineConfig:
    """Everything :class:`simsearch.Engine` needs besides the index directory."""

    encoder: str = DEFAULT_ENCODER
    segments: SegmentConfig = field(default_factory=SegmentConfig)
    vote: VoteConfig = field(default_factory=VoteConfig)
    read: ReadConfig = field(default_factory=ReadConfig)
    batch_files: int = 64


def default_index_dir() -> Path:
    """``$SIMSEARCH_INDEX`` if set, else ``./index``."""
    return Path(os.environ.get("SIMSEARCH_INDEX") or "index")
