"""Reading audio: finding files, decoding, resampling, hashing and cutting into segments.

Decoding goes through libsndfile (``soundfile``: wav, flac, ogg/vorbis/opus, mp3, aiff…)
and resampling through ``soxr``. Everything that can go wrong with a file becomes an
:class:`~simsearch.errors.AudioReadError` naming the file and the reason.

When indexing, decoding runs in worker processes with a time limit per file
(:mod:`simsearch.decode_pool`).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat as stat_module
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import AUDIO_EXTENSIONS, SegmentConfig
from .errors import AudioReadError

MIN_SAMPLE_RATE = 1000
"""Below this a file is not audio we can say anything about (the rate is likely corrupt)."""


@dataclass(frozen=True)
class Decoded:
    """A decoded file: mono float32 ``samples`` at ``sample_rate`` plus what we learnt on the way."""

    samples: np.ndarray
    sample_rate: int
    native_rate: int
    content_hash: str

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


def find_audio_files(paths: Iterable[str | os.PathLike], *, extensions=AUDIO_EXTENSIONS) -> Iterator[Path]:
    """Yield the audio files named by ``paths``, walking folders recursively.

    Files named explicitly are yielded whatever their suffix; inside folders only files with
    an audio suffix are taken and hidden entries are skipped. Symlinked folders are not
    followed (so a symlink loop cannot hang the walk). Paths are absolute, not resolved, so
    they are reported as the user sees them. Order is sorted, hence reproducible.
    """
    for raw in paths:
        path = Path(os.path.abspath(os.path.expanduser(os.fspath(raw))))
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                        yield Path(root) / name
        else:
            yield path


def content_hash(data: bytes) -> str:
    """Hex BLAKE2b-128 digest of a file's bytes: the identity that survives renames."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


_FILE_KINDS = {stat_module.S_IFDIR: "a directory", stat_module.S_IFIFO: "a named pipe", stat_module.S_IFSOCK: "a socket",
               stat_module.S_IFCHR: "a character device", stat_module.S_IFBLK: "a block device"}


def read_file(path: str | os.PathLike) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file; returns its bytes and the ``stat`` that describes them.

    Refuses what is not a regular file (a named pipe would block forever, a device never
    end) and a file that changed while it was being read (its bytes would be a mix).
    Every problem is an :class:`AudioReadError`.
    """
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer; it is refused below.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise AudioReadError(path, "is a directory, not an audio file") from None
    except PermissionError:
        raise AudioReadError(path, "permission denied") from None
    except FileNotFoundError:
        raise AudioReadError(path, "no such file") from None
    except OSError as e:
        raise AudioReadError(path, f"cannot open: {e.strerror or e}") from None
    with open(fd, "rb") as f:
        before = os.fstat(fd)
        if not stat_module.S_ISREG(before.st_mode):
            kind = _FILE_KINDS.get(stat_module.S_IFMT(before.st_mode), "a special file")
            raise AudioReadError(path, f"not a regular file ({kind})")
        try:
            data = _read_all(f)
        except OSError as e:
            raise AudioReadError(path, f"cannot read: {e.strerror or e}") from None
        after = os.fstat(fd)
    if _identity(before) != _identity(after) or len(data) != after.st_size:
        raise AudioReadError(path, "the file changed while it was being read (index it again once it is complete)")
    return data, after


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _read_all(f) -> bytes:
    return f.read()


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file (see :func:`read_file`)."""
    return read_file(path)[0]


def decode(data: bytes, *, path: str | os.PathLike, sample_rate: int, max_seconds: float,
           known_hash: str | None = None) -> Decoded:
    """Decode a file's bytes to mono float32 at ``sample_rate``.

    Parameters
    ----------
    data : bytes
        The whole file.
    path : path-like
        Only used in error messages and to pick a decoder by suffix.
    sample_rate : int
        Target rate in Hz.
    max_seconds : float
        Files longer than this are refused (they would exhaust memory).
    known_hash : str, optional
        :func:`content_hash` of ``data`` when the caller has computed it already.

    Returns
    -------
    Decoded
        ``samples`` has shape ``(n,)`` with ``n >= 1``, values finite.
    """
    import soundfile as sf

    if not data:
        raise AudioReadError(path, "empty file (0 bytes)")
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as e:  # libsndfile reports every unknown format as a generic error
        raise AudioReadError(path, f"not a readable audio file ({short_reason(e)})") from None
    if info.samplerate < MIN_SAMPLE_RATE:
        raise AudioReadError(path, f"sample rate {info.samplerate} Hz is too low to be audio")
    if info.frames > 0 and info.frames / info.samplerate > max_seconds:
        raise AudioReadError(
            path, f"too long ({info.frames / info.samplerate:.0f} s > {max_seconds:.0f} s limit)"
        )
    try:
        samples, native_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioReadError(path, f"audio data is damaged or truncated ({short_reason(e)})") from None
    if samples.shape[0] == 0:
        raise AudioReadError(path, "contains no audio samples")
    if not np.isfinite(samples).all():
        raise AudioReadError(path, "contains NaN or infinite samples")
    mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    return Decoded(
        samples=resample(mono, orig_rate=native_rate, target_rate=sample_rate),
        sample_rate=sample_rate,
        native_rate=int(native_rate),
        content_hash=known_hash or content_hash(data),
    )


def load(path: str | os.PathLike, *, sample_rate: int, max_seconds: float = 3 * 3600.0) -> Decoded:
    """Read and decode one file (see :func:`decode`)."""
    return decode(read_bytes(path), path=path, sample_rate=sample_rate, max_seconds=max_seconds)


def resample(y: np.ndarray, *, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a mono signal of shape ``(n,)`` with soxr (deterministic); at least one sample out."""
    if orig_rate == target_rate:
        out = y
    else:
        import soxr

        out = soxr.resample(y, orig_rate, target_rate, quality="HQ")
        if out.size == 0:
            out = y[:1]
    return np.ascontiguousarray(out, dtype=np.float32)


def segment_bounds(n_samples: int, sample_rate: int, config: SegmentConfig) -> list[tuple[int, int]]:
    """Cut ``n_samples`` into segments; returns ``[(start, end), ...]`` in samples.

    A file of at most ``single_max_seconds`` is one segment; longer ones get windows of
    ``window_seconds`` every ``hop_seconds``, the last one aligned to the end.
    """
    window = int(round(config.window_seconds * sample_rate))
    hop = int(round(config.hop_seconds * sample_rate))
    if n_samples <= int(round(config.single_max_seconds * sample_rate)) or n_samples <= window:
        return [(0, n_samples)]
    starts = list(range(0, n_samples - window + 1, hop))
    if starts[-1] + window < n_samples:
        starts.append(n_samples - window)
    return [(s, s + window) for s in starts]


def short_reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # libsndfile names the in-memory buffer ("Error opening <_io.BytesIO object at 0x7f…>: ");
    # the address differs on every run and says nothing, so only the reason is kept.
    text = re.sub(r"^Error opening <[^>]*>: ", "", text).strip()
    if text.startswith("File does not exist or is not a regular file"):
        text = "format not recognised, or its header is cut short"  # what libsndfile means for a buffer
    return text[:200]

