"""Reading audio: finding files, decoding, resampling, hashing and cutting into segments.

Decoding goes through libsndfile (``soundfile``: wav, flac, ogg/vorbis/opus, mp3, aiff…)
and resampling through ``soxr``. Everything that can go wrong with a file becomes an
:class:`~simsearch.errors.AudioReadError` naming the file and the reason.

When indexing, files are read and decoded in worker processes (:class:`DecodePool`), so a
decoder that hangs is stopped after a time limit and one that crashes (a C library fed a
malicious file) costs that file, not the run.
"""

from __future__ import annotations

import collections
import gc
import hashlib
import io
import json
import os
import re
import signal
import socket
import stat as stat_module
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    """Read a whole file, turning OS errors into :class:`AudioReadError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise AudioReadError(path, "is a directory, not an audio file") from None
    except PermissionError:
        raise AudioReadError(path, "permission denied") from None
    except FileNotFoundError:
        raise AudioReadError(path, "no such file") from None
    except OSError as e:
        raise AudioReadError(path, f"cannot read: {e.strerror or e}") from None


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
        raise AudioReadError(path, f"not a readable audio file ({_short(e)})") from None
    if info.samplerate < MIN_SAMPLE_RATE:
        raise AudioReadError(path, f"sample rate {info.samplerate} Hz is too low to be audio")
    if info.frames > 0 and info.frames / info.samplerate > max_seconds:
        raise AudioReadError(
            path, f"too long ({info.frames / info.samplerate:.0f} s > {max_seconds:.0f} s limit)"
        )
    try:
        samples, native_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioReadError(path, f"audio data is damaged or truncated ({_short(e)})") from None
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


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # libsndfile names the in-memory buffer ("Error opening <_io.BytesIO object at 0x7f…>: ");
    # the address differs on every run and says nothing, so only the reason is kept.
    text = re.sub(r"^Error opening <[^>]*>: ", "", text).strip()
    if text.startswith("File does not exist or is not a regular file"):
        text = "format not recognised, or its header is cut short"  # what libsndfile means for a buffer
    return text[:200]



# ---- decoding in worker processes ------------------------------------------------------
@dataclass
class FileResult:
    """What :meth:`DecodePool.run` made of one file.

    ``error`` is the reason when it failed. Otherwise ``content_hash``, ``size`` and
    ``mtime_ns`` describe the bytes actually read, and ``decoded`` is the audio (``None``
    when the caller chose to skip decoding after seeing the hash).
    """

    path: str
    content_hash: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    decoded: Decoded | None = None
    error: str | None = None


@dataclass
class _Worker:
    pid: int
    conn: object  # multiprocessing.connection.Connection


class DecodePool:
    """Read and decode files in forked worker processes, each file under a time limit.

    A worker that takes longer than ``timeout`` seconds on one file is killed (the file fails
    with a reason saying so) and a fresh one takes its place; a worker that crashes costs
    only its file. Workers are forked on first need (a few milliseconds each), hold no file
    of the parent open (not the index lock, not the database), and die with the parent.

    Use as a context manager; :meth:`run` may be called many times.

    Parameters
    ----------
    sample_rate : int
        Rate the audio is resampled to.
    max_seconds : float
        Longer files are refused (see :func:`decode`).
    timeout : float
        Seconds one file may take to be read, hashed and decoded.
    workers : int, optional
        Processes decoding at once (default: up to 4, at most the number of CPUs).
    """

    def __init__(self, *, sample_rate: int, max_seconds: float, timeout: float, workers: int | None = None):
        self.sample_rate, self.max_seconds, self.timeout = sample_rate, max_seconds, float(timeout)
        self.workers = max(1, workers or min(4, os.cpu_count() or 1))
        self._idle: list[_Worker] = []
        self._all: dict[int, _Worker] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, paths: Sequence[str], *, wanted: Callable[[int, str], bool] | None = None) -> list[FileResult]:
        """Read, hash and decode ``paths``; results in the same order.

        ``wanted(i, content_hash)`` is asked once file ``i`` is read; returning False skips
        decoding it (a file already indexed under another name needs no decoding).
        """
        from multiprocessing.connection import wait

        results = [FileResult(str(p)) for p in paths]
        queue = collections.deque(range(len(paths)))
        busy: dict[object, tuple[_Worker, int, float]] = {}
        try:
            while queue or busy:
                while queue and (self._idle or len(self._all) < self.workers):
                    i = queue.popleft()
                    worker = self._idle.pop() if self._idle else self._spawn()
                    try:
                        worker.conn.send_bytes(json.dumps({"path": results[i].path}).encode())
                    except OSError:  # died while idle (killed from outside): try again with another
                        self._discard(worker)
                        queue.appendleft(i)
                        continue
                    busy[worker.conn] = (worker, i, time.monotonic() + self.timeout)
                deadline = min(d for _, _, d in busy.values())
                for conn in wait(list(busy), timeout=max(0.0, deadline - time.monotonic())):
                    worker, i, _ = busy[conn]
                    if self._receive(worker, results[i], i, wanted):
                        del busy[conn]
                        if worker.pid in self._all:
                            self._idle.append(worker)
                now = time.monotonic()
                for conn, (worker, i, deadline) in list(busy.items()):
                    if now >= deadline:
                        del busy[conn]
                        self._discard(worker)
                        results[i].error = f"reading and decoding took longer than {self.timeout:g} s; stopped"
        except BaseException:
            for worker, _, _ in busy.values():
                self._discard(worker)
            raise
        return results

    def _receive(self, worker: _Worker, result: FileResult, i: int, wanted) -> bool:
        """Handle one message from ``worker``; True when it is done with the file."""
        try:
            reply = json.loads(worker.conn.recv_bytes())
            if "hash" in reply:
                result.content_hash, result.size, result.mtime_ns = reply["hash"], reply["size"], reply["mtime_ns"]
                go = wanted is None or wanted(i, result.content_hash)
                worker.conn.send_bytes(b"decode" if go else b"skip")
                return not go
            if "error" in reply:
                result.error = reply["error"]
                return True
            samples = np.frombuffer(worker.conn.recv_bytes(), dtype=np.float32)
            result.decoded = Decoded(samples=samples, sample_rate=self.sample_rate, native_rate=reply["native_rate"],
                                     content_hash=result.content_hash)
            return True
        except (EOFError, OSError):
            result.error = self._discard(worker)
            return True

    def _spawn(self) -> _Worker:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        parent = os.getpid()
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a threaded process because the child could
            # need a lock another thread held. The child here runs only our loop over
            # libsndfile, soxr and numpy (no BLAS) and leaves with os._exit, never unwinding.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            try:
                _worker_main(theirs.fileno(), parent, self.sample_rate, self.max_seconds)
            finally:
                os._exit(70)
        theirs.close()
        worker = _Worker(pid, Connection(ours.detach()))
        self._all[pid] = worker
        return worker

    def _discard(self, worker: _Worker) -> str:
        """Kill and reap ``worker``; returns what happened to it, as a failure reason."""
        self._all.pop(worker.pid, None)
        if worker in self._idle:
            self._idle.remove(worker)
        worker.conn.close()
        status = None
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for _ in range(200):  # SIGKILL is immediate unless the process is stuck in the kernel
            try:
                reaped, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if reaped:
                break
            time.sleep(0.005)
        if status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL:
            return f"the decoder crashed on this file ({signal.Signals(os.WTERMSIG(status)).name})"
        if status is not None and os.WIFEXITED(status):
            return f"the decoder exited unexpectedly (status {os.WEXITSTATUS(status)})"
        return "the decoder was killed (out of memory?)"

    def close(self) -> None:
        """Stop every worker."""
        for worker in list(self._all.values()):
            self._discard(worker)


def _worker_main(fd: int, parent: int, sample_rate: int, max_seconds: float) -> None:
    """The loop of a forked decoder: a path in, its hash and then its audio (or a reason) out.

    Messages are JSON headers plus raw float32 bytes, never pickles.
    """
    from multiprocessing.connection import Connection

    # This process is a copy of the parent: garbage-collecting a copy of the parent's objects
    # could close the parent's database connection behind its back, so nothing is collected
    # and the stack is never unwound (the only way out is os._exit).
    gc.disable()
    _die_with_parent(parent)
    _close_inherited_fds(keep=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us, without tracebacks
    conn = Connection(fd)
    while True:
        try:
            path = json.loads(conn.recv_bytes())["path"]
        except (EOFError, OSError):
            os._exit(0)
        try:
            try:
                data, st = read_file(path)
                known = content_hash(data)
            except AudioReadError as e:
                conn.send_bytes(json.dumps({"error": e.reason}).encode())
                continue
            conn.send_bytes(json.dumps({"hash": known, "size": st.st_size, "mtime_ns": st.st_mtime_ns}).encode())
            if conn.recv_bytes() != b"decode":
                continue
            try:
                decoded = decode(data, path=path, sample_rate=sample_rate, max_seconds=max_seconds, known_hash=known)
            except AudioReadError as e:
                conn.send_bytes(json.dumps({"error": e.reason}).encode())
                continue
            except MemoryError:
                conn.send_bytes(json.dumps({"error": "not enough memory to decode it"}).encode())
                continue
            except Exception as e:  # a bug in a decoding library must cost this file only
                conn.send_bytes(json.dumps({"error": f"the decoder failed ({type(e).__name__}: {_short(e)})"}).encode())
                continue
            del data
            conn.send_bytes(json.dumps({"native_rate": decoded.native_rate}).encode())
            conn.send_bytes(memoryview(np.ascontiguousarray(decoded.samples, dtype=np.float32)).cast("B"))
        except (EOFError, OSError):  # the parent went away
            os._exit(0)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the parent dies (so a decoder stuck on a file
    cannot outlive a killed indexer); elsewhere an orphan still exits at its next message."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def _close_inherited_fds(keep: int) -> None:
    """Close every descriptor but stdio and ``keep``: a worker must not hold the index lock or
    the database open (they would outlive a killed parent, or be touched from two processes)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
