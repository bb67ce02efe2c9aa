"""The indexing pipeline: plan what changed, read and decode in workers, embed in batches, store.

reader (a process driving a :class:`~simsearch.decode_pool.DecodePool`, one group ahead:
:mod:`simsearch.read_ahead`) →
mapper (segment + embed a whole batch in one encoder call) → writer (one SQLite transaction
per batch). Functions of an :class:`~simsearch.Engine`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import audio, decode_pool
from .read_ahead import ReadAhead
from .store import FileRecord

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` while a long operation runs."""

@dataclass
class IndexReport:
    """What an :meth:`Engine.index` run did, path by path."""

    added: list[str] = field(default_factory=list)
    moved: list[tuple[str, str]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"added": len(self.added), "moved": len(self.moved), "unchanged": len(self.unchanged),
                "pruned": len(self.pruned), "failed": [{"path": p, "reason": r} for p, r in self.failed]}


@dataclass
class Job:
    path: str
    stat: os.stat_result
    label: str | None


def plan(engine, files: list[str], label_for, report: IndexReport) -> list[Job]:
    jobs, relabel, unstattable = [], [], []
    for path in files:
        try:
            stat = os.stat(path)
        except OSError as e:
            reason = f"cannot stat: {e.strerror}"  # a dangling symlink, a symlink loop, a vanished file
            report.failed.append((path, reason))
            known = engine.store.failure(path)
            if known is None or known[2] != reason:
                unstattable.append((path, reason))
            continue
        existing = engine.store.file_by_path(path)
        label = label_for(path)
        if existing and (existing.size, existing.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            report.unchanged.append(path)
            if label is not None:
                relabel.append((existing.id, label))
            continue
        known_bad = engine.store.failure(path)
        if known_bad and tuple(known_bad[:2]) == (stat.st_size, stat.st_mtime_ns):
            report.failed.append((path, known_bad[2]))
            continue
        jobs.append(Job(path, stat, label))
    if relabel or unstattable:
        with engine.store.writing():
            for file_id, label in relabel:
                engine.store.set_label([file_id], label, source="auto")
            for path, reason in unstattable:
                engine.store.record_failure(path, None, None, reason)
    return jobs


BATCH_BYTES = 64 << 20
"""A batch is cut at ``config.batch_files`` files or this many bytes of files, whichever
comes first."""

GROUP_FILES, GROUP_BYTES = 512, 32 << 20
"""Consecutive batches are read and embedded together, up to this many files and bytes of
files: the encoder batches similar lengths better from 512 files than from 64 (a quarter
less CPU on FSDD), while two groups of decoded audio in flight stay a bounded amount of
memory and commits stay one per batch."""


def batches(jobs: list[Job], max_files: int, max_bytes: int = BATCH_BYTES) -> list[list[Job]]:
    """``jobs`` in order, cut into batches of at most ``max_files`` files and about ``max_bytes``."""
    return _cut(jobs, files=lambda job: 1, size=lambda job: job.stat.st_size, max_files=max_files, max_bytes=max_bytes)


def groups(work: list[list[Job]], max_files: int = GROUP_FILES, max_bytes: int = GROUP_BYTES) -> list[list[list[Job]]]:
    """Consecutive batches of ``work`` gathered into groups of about ``max_files`` files and
    ``max_bytes`` (a batch is never split)."""
    return _cut(work, files=len, size=lambda batch: sum(job.stat.st_size for job in batch), max_files=max_files,
                max_bytes=max_bytes)


def _cut(items: list, *, files: Callable, size: Callable, max_files: int, max_bytes: int) -> list[list]:
    """``items`` in order, cut where the next item would take a chunk past ``max_files`` files
    or ``max_bytes`` (a chunk always takes at least one item)."""
    out, current, n_files, n_bytes = [], [], 0, 0
    for item in items:
        item_files, item_bytes = files(item), size(item)
        if current and (n_files + item_files > max_files or n_bytes + item_bytes > max_bytes):
            out.append(current)
            current, n_files, n_bytes = [], 0, 0
        current.append(item)
        n_files, n_bytes = n_files + item_files, n_bytes + item_bytes
    return out + [current] if current else out


def run_jobs(engine, jobs: list[Job], report: IndexReport, *, progress: Progress | None, total: int, done: int,
             label_source: str = "manual") -> list[int]:
    """Read, embed and store ``jobs``: one encoder call per group of batches, one transaction
    per batch. Returns file ids.

    While one group is embedded and written, the next is already being read and decoded (by
    a :class:`~simsearch.read_ahead.ReadAhead` process), so the decoders and the encoder work
    at the same time; the first group is decoded while the encoder loads.
    """
    file_ids = []
    if progress:
        progress(done, total)
    if not jobs:
        return file_ids
    read = engine.config.read
    work = groups(batches(jobs, engine.config.batch_files))
    reader = ReadAhead(engine.store, [[[job.path for job in batch] for batch in group] for group in work],
                       sample_rate=engine.sample_rate, max_seconds=read.max_seconds, timeout=read.timeout_seconds)
    with contextlib.closing(reader):
        engine.encoder  # built (torch imported, model loaded) while the reader decodes the first files
        for group, read_group in zip(work, reader):
            embedded = iter(embed_batch(engine, [result.decoded for results, moves in read_group
                                                 for i, result in enumerate(results)
                                                 if result.error is None and i not in moves]))
            for batch, (results, moves) in zip(group, read_group):
                file_ids += store_batch(engine, batch, results, moves, embedded, report, label_source)
                done += len(batch)
                if progress:
                    progress(done, total)
    return file_ids


def store_batch(engine, batch: list[Job], results: list[decode_pool.FileResult], moves: dict[int, FileRecord],
                embedded, report: IndexReport, label_source: str) -> list[int]:
    """Write a batch in one transaction; ``embedded`` yields ``(bounds, vectors)`` for each of
    its files that was decoded (read without error and not a move), in order."""
    failures = [(job, result) for job, result in zip(batch, results) if result.error is not None]
    ready = [(job, result, moves.get(i)) for i, (job, result) in enumerate(zip(batch, results))
             if result.error is None]
    file_ids = []
    with engine.store.writing():
        for job, result in failures:
            # Remembered with the stat of the bytes judged, so only a change brings a retry
            # (a file that changed while being read keeps the stat it was listed with).
            size, mtime_ns = (result.size, result.mtime_ns) if result.size is not None else \
                (job.stat.st_size, job.stat.st_mtime_ns)
            engine.store.record_failure(job.path, size, mtime_ns, result.error)
            report.failed.append((job.path, result.error))
        for job, result, moved in ready:
            if moved is None:
                bounds, vectors = next(embedded)
                if not np.isfinite(vectors).all():
                    reason = "the encoder produced non-finite values for this audio"
                    engine.store.record_failure(job.path, result.size, result.mtime_ns, reason)
                    report.failed.append((job.path, reason))
                    continue
            engine.store.clear_failure(job.path)
            if moved is not None:
                engine.store.update_file(moved.id, path=job.path, size=result.size, mtime_ns=result.mtime_ns)
                file_id = moved.id
                if moved.path == job.path:
                    report.unchanged.append(job.path)
                else:
                    report.moved.append((moved.path, job.path))
            else:
                record = FileRecord(job.path, result.size, result.mtime_ns, result.content_hash,
                                    result.decoded.duration, result.decoded.native_rate)
                file_id = engine.store.add_file(record, bounds, vectors)
                report.added.append(job.path)
            if job.label is not None:
                engine.store.set_label([file_id], job.label, source=label_source)
            file_ids.append(file_id)
    return file_ids


def embed_batch(engine, decoded: list[audio.Decoded]) -> list[tuple[list[tuple[float, float]], np.ndarray]]:
    """Segment several files and embed all their segments in one encoder call.

    Returns ``(bounds in seconds, vectors (n_segments, dim))`` per file. The encoder sees
    the segments of many files at once, so it can batch them; each vector is what embedding
    that segment alone gives (see ``tests/test_batching.py``).
    """
    waves, cuts = [], []
    for item in decoded:
        bounds = audio.segment_bounds(len(item.samples), item.sample_rate, engine.config.segments)
        waves += [item.samples[s:e] for s, e in bounds]
        cuts.append(bounds)
    vectors = engine.encoder.embed(waves) if waves else None
    sr = engine.encoder.sample_rate
    out, at = [], 0
    for bounds in cuts:
        out.append(([(s / sr, e / sr) for s, e in bounds], vectors[at:at + len(bounds)]))
        at += len(bounds)
    return out


def find_moved(store, content_hash: str, path: str, claimed: set[int] = frozenset()) -> FileRecord | None:
    """An indexed file of ``store`` with this content whose own path is gone (a move), or this very path."""
    for record in store.files_by_hash(content_hash):
        if record.id not in claimed and (record.path == path or not os.path.exists(record.path)):
            return record
    return None


def prune(engine, roots: list[str], report: IndexReport) -> None:
    gone = [r for root in roots for r in engine.store.files_under(root) if not os.path.exists(r.path)]
    stale = [path for path, _ in engine.store.failures()
             if not os.path.lexists(path) and any(path == root or path.startswith(root.rstrip(os.sep) + os.sep)
                                                  for root in roots)]
    if gone or stale:
        with engine.store.writing():
            engine.store.delete_files([r.id for r in gone])
            engine.store.forget_failures(stale)
        report.pruned += [r.path for r in gone]
