"""Exceptions raised by simsearch. Every one derives from :class:`SimsearchError`."""

from __future__ import annotations


class SimsearchError(Exception):
    """Root of every error simsearch raises on purpose."""


class AudioReadError(SimsearchError):
    """A file could not be read as audio. ``path`` names it, ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class EncoderMismatchError(SimsearchError):
    """The index holds vectors from another encoder than the one asked for."""


class IndexLockedError(SimsearchError):
    """Another process is writing to the index."""


class CorruptIndexError(SimsearchError):
    """The index database or its FAISS cache is damaged or from an unknown schema."""


class UsageError(SimsearchError):
    """The caller asked for something that cannot be done (bad option, unknown encoder...)."""


class IndexWriteError(SimsearchError):
    """The index directory cannot be written (disk full, read-only, no permission).

    The step that failed changed nothing: the index is as it was before it.
    """
