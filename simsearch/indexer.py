"""The indexing pipeline: plan what changed, read and decode in workers, embed in batches, store.

reader (a :class:`~simsearch.decode_pool.DecodePool`) → mapper (segment + embed a batch) →
writer (one SQLite transaction per batch). Functions of an :class:`~simsearch.Engine`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import audio, decode_pool
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


def run_jobs(engine, jobs: list[Job], report: IndexReport, *, progress: Progress | None, total: int, done: int,
              label_source: str = "manual") -> list[int]:
    """Read, embed and store ``jobs`` in batches, one transaction per batch. Returns file ids."""
    file_ids = []
    if progress:
        progress(done, total)
    if not jobs:
        return file_ids
    claimed: set[int] = set()  # indexed files already taken as the origin of a move in this run
    read = engine.config.read
    with decode_pool.DecodePool(sample_rate=engine.encoder.sample_rate, max_seconds=read.max_seconds,
                          timeout=read.timeout_seconds) as pool:
        for start in range(0, len(jobs), engine.config.batch_files):
            batch = jobs[start:start + engine.config.batch_files]
            file_ids += run_batch(engine, batch, pool, claimed, report, label_source)
            if progress:
                progress(done + start + len(batch), total)
    return file_ids


def run_batch(engine, batch: list[Job], pool: decode_pool.DecodePool, claimed: set[int], report: IndexReport,
               label_source: str) -> list[int]:
    moves: dict[int, FileRecord] = {}

    def wanted(i: int, content_hash: str) -> bool:
        # A file with the content of an indexed file whose own path is gone is a move: it
        # needs no decoding, let alone embedding.
        moved = find_moved(engine, content_hash, batch[i].path, claimed)
        if moved is None:
            return True
        moves[i] = moved
        claimed.add(moved.id)
        return False

    results = pool.run([job.path for job in batch], wanted=wanted)
    failures = [(job, result) for job, result in zip(batch, results) if result.error is not None]
    ready = [(job, result, moves.get(i)) for i, (job, result) in enumerate(zip(batch, results))
             if result.error is None]
    embedded = embed_batch(engine, [result.decoded for _, result, moved in ready if moved is None])
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
                bounds, vectors = embedded.pop(0)
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
    """Segment and embed several files in one encoder call; ``(bounds, vectors)`` per file."""
    waves, owners = [], []
    for i, item in enumerate(decoded):
        cuts = audio.segment_bounds(len(item.samples), item.sample_rate, engine.config.segments)
        waves += [item.samples[s:e] for s, e in cuts]
        owners += [(i, s, e) for s, e in cuts]
    vectors = engine.encoder.embed(waves) if waves else None
    sr = engine.encoder.sample_rate
    out = []
    for i in range(len(decoded)):
        rows = [r for r, owner in enumerate(owners) if owner[0] == i]
        out.append(([(owners[r][1] / sr, owners[r][2] / sr) for r in rows], vectors[rows]))
    return out


def find_moved(engine, content_hash: str, path: str, claimed: set[int] = frozenset()) -> FileRecord | None:
    """An indexed file with this content whose own path is gone (a move), or this very path."""
    for record in engine.store.files_by_hash(content_hash):
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
