"""The reader stage of indexing: a process that decodes one group of batches ahead.

:class:`ReadAhead` forks a reader process that drives a
:class:`~simsearch.decode_pool.DecodePool` and sends each group's results to the indexing
process, reading the next group meanwhile. A process rather than a thread: the reader's
work is short Python steps between the decoders' messages, and a thread gets none while the
main thread holds the GIL for long stretches. Loading the model is the longest (``import
torch`` runs about a second without letting go of the GIL): a reader *thread* decoded
FSDD's first 512 files in 1.02 s while torch was being imported beside it and in 0.19 s
alone. A reader process keeps the decoders fed, so the first files are ready when the model
is (bench/README.md).

A file whose content is already indexed under a path that is gone is a move and is not
decoded. Only the indexing process opens the database (SQLite connections must not cross a
fork), so the reader asks it about a file once the file is hashed, in the order of the
files, and a thread of the indexing process answers. A question is a round trip through that
process's GIL (about 0.1 ms beside the embedding, 1 s while torch is imported), so the reader
starts with the first 64 bits of every indexed content hash and asks only about a file whose
hash could be one of them, unless reading those (~1.4 us a file) would cost more than asking
about every file to read (an index 100 times larger than the batch). Into an empty index,
the first and longest runs, it asks nothing. Prefixes and answers may come from before the
indexing process wrote the batches ahead of a file, and that changes nothing: a file this run
adds exists, so it is never the origin of a move, and an origin is claimed once; reading ahead
decides exactly as reading in step would.

Messages are JSON headers plus raw float32 bytes, never pickles, as in the decode pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from . import decode_pool, errors
from .audio import Decoded
from .decode_pool import FileResult
from .store import FileRecord

Group = list[list[str]]
"""Paths of one group of batches, batch by batch."""

GroupResults = list[tuple[list[FileResult], dict[int, FileRecord]]]
"""For each batch of a group: what the decode pool made of each file, and which files are
moves (by position in the batch), with the indexed record each moved from."""


class ReadAhead:
    """Iterate over the results of ``work``, one :data:`GroupResults` per group, in order.

    The reader process starts at construction and begins decoding at once; it stays one
    group ahead of the iteration (one decoded and waiting, the next being decoded).
    :meth:`close` stops it and its decoders, also when nothing was iterated.

    Parameters
    ----------
    store : Store
        The index (used from a thread of this process to recognise moves).
    work : list of :data:`Group`
    sample_rate, max_seconds, timeout
        As for :class:`~simsearch.decode_pool.DecodePool`.
    """

    def __init__(self, store, work: Sequence[Group], *, sample_rate: int, max_seconds: float, timeout: float):
        import queue  # noqa: F401  (imported before the fork: the reader then finds them loaded)
        from multiprocessing.connection import Connection

        self._work = [[list(batch) for batch in group] for group in work]
        self._sample_rate = sample_rate
        self._directory = store.directory
        indexed, to_read = store.count("files"), sum(len(batch) for group in work for batch in group)
        known = store.hash_prefixes() if indexed <= ASK_ALL_RATIO * to_read else None
        data, their_data = socket.socketpair()
        asks, their_asks = socket.socketpair()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                data.close()
                asks.close()
                _reader_main(their_data.detach(), their_asks.detach(), parent, known, self._work,
                             dict(sample_rate=sample_rate, max_seconds=max_seconds, timeout=timeout))
            finally:
                os._exit(70)
        their_data.close()
        their_asks.close()
        self._pid: int | None = pid
        self._data = Connection(data.detach())
        self._asks = Connection(asks.detach())
        self._answerer = threading.Thread(target=self._answer, name="simsearch-moves", daemon=True)
        self._answerer.start()

    def __iter__(self) -> Iterator[GroupResults]:
        for group in self._work:
            header = json.loads(self._receive())
            if "raise" in header:
                raise _rebuild(header)
            results = []
            for item in header["results"]:
                result = FileResult(item["path"], item["content_hash"], item["size"], item["mtime_ns"],
                                    error=item["error"])
                if item["native_rate"] is not None:
                    samples = np.frombuffer(self._receive(), dtype=np.float32)
                    result.decoded = Decoded(samples=samples, sample_rate=self._sample_rate,
                                             native_rate=item["native_rate"], content_hash=item["content_hash"])
                results.append(result)
            moves = {int(i): FileRecord(**record) for i, record in header["moves"].items()}
            out, at = [], 0
            for batch in group:
                out.append((results[at:at + len(batch)],
                            {i - at: moved for i, moved in moves.items() if at <= i < at + len(batch)}))
                at += len(batch)
            yield out

    def close(self) -> None:
        """Stop the reader and its decoders (they die with it) and reap it."""
        if self._pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._pid, 0)
        self._pid = None
        self._answerer.join()  # the reader's end of the socket is closed now: it sees EOF
        self._data.close()
        self._asks.close()

    def _receive(self) -> bytes:
        try:
            return self._data.recv_bytes()
        except (EOFError, OSError):
            raise errors.SimsearchError("the process reading the files stopped unexpectedly (out of memory?); "
                                        "every batch written before is kept") from None

    def _answer(self) -> None:
        """Answer the reader's "is this a move?" questions, in the order it asks them."""
        from .indexer import find_moved
        from .store import Store

        claimed: set[int] = set()  # indexed files already taken as the origin of a move in this run
        lookup = None
        try:
            while True:
                try:
                    question = json.loads(self._asks.recv_bytes())
                except (EOFError, OSError):
                    return
                try:
                    lookup = lookup or Store(self._directory, create=False)
                    moved = find_moved(lookup, question["hash"], question["path"], claimed)
                    answer = {"moved": dataclasses.asdict(moved) if moved else None}
                    if moved:
                        claimed.add(moved.id)
                except Exception as e:  # noqa: BLE001  (the reader raises it, and then we do)
                    answer = _raising(e)
                try:
                    self._asks.send_bytes(json.dumps(answer).encode())
                except OSError:
                    return
        finally:
            if lookup is not None:
                lookup.close()


ASK_ALL_RATIO = 100
"""Above this many indexed files per file to read, the reader asks about every file instead
of first reading every indexed hash prefix (see the module docstring)."""


def _may_be_indexed(known: np.ndarray, content_hash: str) -> bool:
    """Whether ``content_hash``'s first 64 bits are among ``known`` (sorted uint64)."""
    try:
        prefix = np.uint64(int(content_hash[:16], 16))
    except ValueError:
        return True
    at = int(np.searchsorted(known, prefix))
    return at < len(known) and known[at] == prefix


def _raising(error: BaseException) -> dict:
    """``error`` as a message for the other process; :func:`_rebuild` makes it again there."""
    return {"raise": type(error).__name__, "message": str(error)}


def _rebuild(header: dict) -> BaseException:
    """The exception a :func:`_raising` message describes, as the same class when it is one of ours."""
    cls = getattr(errors, header["raise"], None)
    if isinstance(cls, type) and issubclass(cls, errors.SimsearchError):
        return cls(header["message"])
    return errors.SimsearchError(f"reading the files failed ({header['raise']}: {header['message']})")


def _reader_main(data_fd: int, asks_fd: int, parent: int, known: np.ndarray | None, work: list[Group],
                 pool_settings: dict) -> None:
    """The reader process: decode group after group, a sender thread handing each over."""
    import queue
    from multiprocessing.connection import Connection

    decode_pool.settle_forked_child(parent, keep={data_fd, asks_fd})
    data, asks = Connection(data_fd), Connection(asks_fd)
    outbox: queue.Queue = queue.Queue(maxsize=1)

    def sender() -> None:
        while (message := outbox.get()) is not None:
            try:
                for part in message:
                    data.send_bytes(part)
            except OSError:
                os._exit(0)  # the indexing process went away

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        with decode_pool.DecodePool(**pool_settings) as pool:
            pool.start()
            for group in work:
                paths = [path for batch in group for path in batch]
                moves: dict[int, FileRecord] = {}

                def wanted(i: int, content_hash: str) -> bool:
                    if known is not None and not _may_be_indexed(known, content_hash):
                        return True
                    asks.send_bytes(json.dumps({"hash": content_hash, "path": paths[i]}).encode())
                    answer = json.loads(asks.recv_bytes())
                    if "raise" in answer:
                        raise _rebuild(answer)
                    if answer["moved"] is None:
                        return True
                    moves[i] = FileRecord(**answer["moved"])
                    return False

                results = pool.run(paths, wanted=wanted)
                header = {"results": [{"path": r.path, "content_hash": r.content_hash, "size": r.size,
                                       "mtime_ns": r.mtime_ns, "error": r.error,
                                       "native_rate": r.decoded.native_rate if r.decoded else None} for r in results],
                          "moves": {str(i): dataclasses.asdict(m) for i, m in moves.items()}}
                outbox.put([json.dumps(header).encode()] + [
                    memoryview(np.ascontiguousarray(r.decoded.samples, dtype=np.float32)).cast("B")
                    for r in results if r.decoded is not None])
    except BaseException as e:  # noqa: BLE001  (the indexing process raises it)
        outbox.put([json.dumps(_raising(e)).encode()])
    outbox.put(None)
    thread.join()
    os._exit(0)
