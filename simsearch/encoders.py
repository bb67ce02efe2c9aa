"""Encoders turn segments of audio into L2-normalised vectors. They are pluggable and named.

An encoder is any object with ``name``, ``version``, ``dim``, ``sample_rate``,
``unknown_threshold`` and ``embed(waves) -> (n, dim) float32``. Two ship:

``cnn``
    The default: our CNN over log-mel spectrograms, trained on free audio
    (see ``simsearch/weights/MODEL_CARD.md``).
``features``
    The handcrafted alternative: MFCC, chroma and spectral-contrast statistics,
    standardised with fixed statistics of the same pre-training corpus.

Every index records ``name`` and ``version`` and refuses vectors from any other. An encoder
class may list in ``versions`` older versions it can still build (its constructor then takes
``version=``), so an index made by an earlier release keeps working with that release's model
until ``simsearch reembed`` moves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from typing import Protocol

import numpy as np

from .errors import UsageError
from .features import HANDCRAFTED_DIM, handcrafted_stats


class Encoder(Protocol):
    name: str
    version: str
    dim: int
    sample_rate: int
    unknown_threshold: float
    """Default similarity below which the vote answers "unknown" (calibrated per encoder)."""

    def embed(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Embed mono float32 signals at ``sample_rate``: returns ``(len(waves), dim)`` float32, unit rows."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Scale each row of an ``(n, d)`` array to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class FeaturesEncoder:
    """Handcrafted statistics (:func:`simsearch.features.handcrafted_stats`), standardised.

    Standardisation uses a fixed per-dimension mean and scale shipped with the package, so a
    vector never depends on what else is in the index.
    """

    name = "features"
    version = "1"
    dim = HANDCRAFTED_DIM
    sample_rate = 16000
    unknown_threshold = 0.6

    def __init__(self, mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        if mean is None or scale is None:
            mean, scale = _shipped_scaler()
        self.mean = np.asarray(mean, dtype=np.float32)
        self.scale = np.asarray(scale, dtype=np.float32)

    def raw(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Unstandardised statistics, ``(n, dim)``."""
        out = np.empty((len(waves), self.dim), dtype=np.float32)
        for i, wave in enumerate(waves):
            out[i] = handcrafted_stats(wave, sample_rate=self.sample_rate)
        return out

    def embed(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        return l2_normalise((self.raw(waves) - self.mean) / self.scale)


@lru_cache(maxsize=1)
def _shipped_scaler() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("simsearch.weights").joinpath("features-v1.npz").open("rb") as f:
        data = np.load(f, allow_pickle=False)
        return data["mean"], data["scale"]


class CNNEncoder:
    """The trained CNN (:mod:`simsearch.cnn`); torch is imported only when this is built.

    Without arguments it is the shipped model; ``model``/``name``/``version`` wrap another
    :class:`~simsearch.cnn.AudioCNN` (an encoder adapted by ``simsearch train``).
    """

    name = "cnn"
    version = "2"  # = cnn.MODEL_VERSION, declared here so an index can be checked without importing torch
    versions = ("1", "2")  # = cnn.SHIPPED_VERSIONS: weights kept so older indexes keep working
    dim = 128  # = cnn.EMBEDDING_DIM
    sample_rate = 16000  # = cnn.SAMPLE_RATE
    unknown_threshold = 0.85
    """Calibrated on FSDD for cnn-v2 (`evaluate --unknown 2`, leave one speaker out, 30 rounds
    hiding 30 different pairs of digits): the threshold with the best balanced accuracy of the
    known/unknown decision, 0.848. (Five draws that repeated pairs gave 0.857 for cnn-v2 and
    0.853 for cnn-v1; one threshold serves both.)"""

    def __init__(self, model=None, *, name: str = "cnn", version: str | None = None,
                 unknown_threshold: float | None = None):
        from . import cnn

        self._cnn = cnn
        self.name = name
        self.version = version or str(cnn.MODEL_VERSION)
        self._model = model if model is not None else cnn.load_default(version=self.version)
        self.dim = int(cnn.EMBEDDING_DIM)
        self.sample_rate = int(cnn.SAMPLE_RATE)
        if unknown_threshold is not None:
            self.unknown_threshold = unknown_threshold

    def embed(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        if not len(waves):
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalise(self._cnn.embed_waveforms(self._model, list(waves)))


ENCODERS: dict[str, Callable[[], Encoder]] = {"cnn": CNNEncoder, "features": FeaturesEncoder}
"""Encoder factories by name; register another by adding to this mapping."""


def get_encoder(name: str, *, version: str | None = None) -> Encoder:
    """Build the encoder registered under ``name`` (raises :class:`UsageError` if unknown).

    With ``version``, an older version the encoder class still lists in ``versions``; any
    other ``version`` builds the current one (and the index then refuses it, as it should).
    """
    try:
        factory = ENCODERS[name]
    except KeyError:
        raise UsageError(f"unknown encoder {name!r}; choose one of: {', '.join(sorted(ENCODERS))}") from None
    wanted = version_to_build(name, version)
    return factory() if wanted == version_to_build(name) else factory(version=wanted)


def version_to_build(name: str, version: str | None = None) -> str | None:
    """The version :func:`get_encoder` builds for ``name`` and ``version``, without building
    it: ``version`` when this release can still build it, else the current one (``None`` when
    the encoder class does not declare it)."""
    if version is not None and version in buildable_versions(name):
        return version
    current = getattr(ENCODERS.get(name), "version", None)
    return current if isinstance(current, str) else None


def buildable_versions(name: str) -> tuple[str, ...]:
    """The versions of encoder ``name`` this release can build (without building any)."""
    factory = ENCODERS.get(name)
    if getattr(factory, "versions", None):
        return tuple(factory.versions)
    version = getattr(factory, "version", None)
    return (version,) if isinstance(version, str) else ()
