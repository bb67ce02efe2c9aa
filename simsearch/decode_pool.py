"""Decoding in worker processes, each file under a time limit.

When indexing, files are read and decoded in forked workers (:class:`DecodePool`), so a
decoder that hangs is stopped after a time limit and one that crashes (a C library fed a
malicious file) costs that file, not the run. Workers call :func:`simsearch.audio.decode`.
"""

from __future__ import annotations

import collections
import gc
import json
import math
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import audio
from .audio import Decoded
from .errors import AudioReadError


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

    def start(self) -> None:
        """Fork every worker now rather than on first need: from a process that has not yet
        loaded torch (forking is cheaper, and no torch threads exist to be copied mid-work)."""
        while len(self._all) < self.workers:
            self._idle.append(self._spawn())

    def run(self, paths: Sequence[str], *, wanted: Callable[[int, str], bool] | None = None) -> list[FileResult]:
        """Read, hash and decode ``paths``; results in the same order.

        ``wanted(i, content_hash)`` is asked once file ``i`` is read; returning False skips
        decoding it (a file already indexed under another name needs no decoding). It is
        asked in the order of ``paths``, whichever worker finishes reading first, so that
        decisions that depend on earlier ones (two copies of one moved file: the first
        takes the move) do not depend on timing. A file waiting for its turn does not use
        up its time limit.
        """
        from multiprocessing.connection import wait

        n = len(paths)
        results = [FileResult(str(p)) for p in paths]
        queue = collections.deque(range(n))
        busy: dict[object, tuple[_Worker, int, float]] = {}
        awaiting: dict[int, object] = {}  # read and hashed, waiting for wanted() in path order
        settled = [False] * n  # decided, or ended before there was anything to decide
        next_up = 0

        def finish(conn, worker: _Worker, i: int) -> None:
            del busy[conn]
            settled[i] = True
            if worker.pid in self._all:
                self._idle.append(worker)

        def decide() -> None:
            nonlocal next_up
            while next_up < n and (next_up in awaiting or settled[next_up]):
                i = next_up
                next_up += 1
                if i not in awaiting:
                    continue
                conn = awaiting.pop(i)
                worker = busy[conn][0]
                go = wanted is None or wanted(i, results[i].content_hash)
                settled[i] = True
                try:
                    worker.conn.send_bytes(b"decode" if go else b"skip")
                except OSError:
                    del busy[conn]
                    results[i].error = self._discard(worker)
                    continue
                if go:
                    busy[conn] = (worker, i, time.monotonic() + self.timeout)
                else:
                    finish(conn, worker, i)

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
                timeout = 1.0 if deadline == math.inf else max(0.0, deadline - time.monotonic())
                for conn in wait(list(busy), timeout=timeout):
                    worker, i, _ = busy[conn]
                    state = self._receive(worker, results[i])
                    if state == "hashed":
                        awaiting[i] = conn
                        busy[conn] = (worker, i, math.inf)  # its turn may depend on slower files
                    else:  # "done"; also a worker that died while waiting for its turn
                        awaiting.pop(i, None)
                        finish(conn, worker, i)
                now = time.monotonic()
                for conn, (worker, i, deadline) in list(busy.items()):
                    if now >= deadline:
                        del busy[conn]
                        settled[i] = True
                        self._discard(worker)
                        results[i].error = f"reading and decoding took longer than {self.timeout:g} s; stopped"
                decide()
        except BaseException:
            for worker, _, _ in busy.values():
                self._discard(worker)
            raise
        return results

    def _receive(self, worker: _Worker, result: FileResult) -> str:
        """Handle one message from ``worker``: "hashed" (it waits to hear whether to decode)
        or "done" (it is done with the file)."""
        try:
            reply = json.loads(worker.conn.recv_bytes())
            if "hash" in reply:
                result.content_hash, result.size, result.mtime_ns = reply["hash"], reply["size"], reply["mtime_ns"]
                return "hashed"
            if "error" in reply:
                result.error = reply["error"]
                return "done"
            samples = np.frombuffer(worker.conn.recv_bytes(), dtype=np.float32)
            result.decoded = Decoded(samples=samples, sample_rate=self.sample_rate, native_rate=reply["native_rate"],
                                     content_hash=result.content_hash)
            return "done"
        except (EOFError, OSError):
            result.error = self._discard(worker)
            return "done"

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

    settle_forked_child(parent, keep={fd})
    conn = Connection(fd)
    while True:
        try:
            path = json.loads(conn.recv_bytes())["path"]
        except (EOFError, OSError):
            os._exit(0)
        try:
            try:
                data, st = audio.read_file(path)
                known = audio.content_hash(data)
            except AudioReadError as e:
                conn.send_bytes(json.dumps({"error": e.reason}).encode())
                continue
            conn.send_bytes(json.dumps({"hash": known, "size": st.st_size, "mtime_ns": st.st_mtime_ns}).encode())
            if conn.recv_bytes() != b"decode":
                continue
            try:
                decoded = audio.decode(data, path=path, sample_rate=sample_rate, max_seconds=max_seconds, known_hash=known)
            except AudioReadError as e:
                conn.send_bytes(json.dumps({"error": e.reason}).encode())
                continue
            except MemoryError:
                conn.send_bytes(json.dumps({"error": "not enough memory to decode it"}).encode())
                continue
            except Exception as e:  # a bug in a decoding library must cost this file only
                conn.send_bytes(json.dumps({"error": f"the decoder failed ({type(e).__name__}: {audio.short_reason(e)})"}).encode())
                continue
            del data
            conn.send_bytes(json.dumps({"native_rate": decoded.native_rate}).encode())
            conn.send_bytes(memoryview(np.ascontiguousarray(decoded.samples, dtype=np.float32)).cast("B"))
        except (EOFError, OSError):  # the parent went away
            os._exit(0)


def settle_forked_child(parent: int, *, keep: set[int]) -> None:
    """First steps of a forked helper (a decoder, or :mod:`simsearch.read_ahead`'s reader).

    The process is a copy of its parent: garbage-collecting a copy of the parent's objects
    could close the parent's database connection behind its back, so nothing is collected
    and the stack is never unwound (the only way out is os._exit). It dies with the parent,
    holds no descriptor but stdio and ``keep``, and ignores Ctrl-C (the parent stops it,
    without tracebacks).
    """
    gc.disable()
    _die_with_parent(parent)
    _close_inherited_fds(keep=keep)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def _close_inherited_fds(keep: set[int]) -> None:
    """Close every descriptor but stdio and ``keep``: a worker must not hold the index lock or
    the database open (they would outlive a killed parent, or be touched from two processes)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass
