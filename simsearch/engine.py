"""The engine composes the stages: read → segment → embed → store, and search → vote.

:class:`Engine` is the public API; the CLI is a thin layer over it. Plain data in, plain
data out: paths and strings in, dataclasses with ``to_dict()`` out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import audio, indexer, search
from .indexer import IndexReport, Progress
from .config import EngineConfig, default_index_dir
from .adapt import ADAPTED_NAME, AdaptConfig, load_adapted
from .encoders import ENCODERS, CNNEncoder, Encoder, get_encoder, version_to_build
from .errors import AudioReadError, UsageError
from .store import Catalog, Store
from .vote import Category



@dataclass(frozen=True)
class Neighbour:
    """An indexed file similar to the query; ``start``/``end`` (s) is its best-matching segment."""

    path: str
    label: str | None
    score: float
    start: float
    end: float

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "score": round(self.score, 6),
                "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass(frozen=True)
class QueryResult:
    """Answer for one query clip: its category (``None`` = unknown) and neighbours, best first."""

    path: str
    category: Category | None
    neighbours: list[Neighbour]

    def to_dict(self) -> dict:
        return {"path": self.path, "category": self.category.to_dict() if self.category else None,
                "neighbours": [n.to_dict() for n in self.neighbours]}


class Engine:
    """An index directory plus the encoder that fills it.

    Parameters
    ----------
    index_dir : path, optional
        Where the index lives (default ``$SIMSEARCH_INDEX`` or ``./index``).
    encoder : str, optional
        Encoder name for a new index. An existing index keeps the encoder it was built with;
        naming another raises :class:`~simsearch.errors.EncoderMismatchError`.
    config : EngineConfig
    """

    def __init__(self, index_dir: str | os.PathLike | None = None, *, encoder: str | None = None,
                 config: EngineConfig = EngineConfig()):
        self.config = config
        self.store = Store(index_dir if index_dir is not None else default_index_dir())
        self._encoder_name = encoder
        self._encoder: Encoder | None = None
        self._catalog: tuple[int, Catalog] | None = None

    # ---- encoder -----------------------------------------------------------------------
    @property
    def encoder(self) -> Encoder:
        """The encoder in use, built on first need (so ``info`` never imports torch)."""
        if self._encoder is None:
            recorded = self.store.encoder()
            name = self._wanted_name(recorded)
            if recorded and name == recorded[0] == ADAPTED_NAME:
                encoder = load_adapted(self.store.directory, recorded[1])  # made by `simsearch train`
            else:  # an index made by an earlier release keeps its model while this one still ships it
                encoder = get_encoder(name, version=recorded[1] if recorded and recorded[0] == name else None)
            self.store.claim_encoder(encoder.name, encoder.version, encoder.dim)
            self._encoder = encoder
        return self._encoder

    def _wanted_name(self, recorded: tuple[str, str, int] | None) -> str:
        """The encoder asked for: the one named when opening, else the index's, else the default."""
        return self._encoder_name or (recorded[0] if recorded else self.config.encoder)

    @property
    def sample_rate(self) -> int:
        """Hz: the rate the encoder wants its audio at, read from the encoder's class when it
        declares one, so asking does not build the encoder (nor import torch)."""
        if self._encoder is None:
            recorded = self.store.encoder()
            name = self._wanted_name(recorded)
            factory = CNNEncoder if name == ADAPTED_NAME else ENCODERS.get(name)
            rate = getattr(factory, "sample_rate", None)
            if isinstance(rate, int):
                return rate
        return self.encoder.sample_rate

    def _check_encoder(self) -> None:
        """Raise :class:`~simsearch.errors.EncoderMismatchError` now if the encoder asked for
        is not the one that made the index's vectors, judged by the recorded name (and
        version, where the encoder's class declares one) without building it: re-indexing an
        unchanged library then never loads a model (about a second with torch). A new or
        empty index records its encoder here, from the encoder's class where it declares its
        version, dimension and rate (else by building it); any other version difference is
        caught when the encoder is first built, before anything is written."""
        recorded = self.store.encoder()
        if self._encoder is not None:
            self.encoder
            return
        if recorded is None or self.store.count("segments") == 0:
            # A new or emptied index: record the encoder from its class when the class declares
            # all of it, so the model is loaded (and torch imported) only once the decoders are
            # already busy with the first files (indexer.run_jobs).
            name = self._wanted_name(recorded)
            factory = ENCODERS.get(name) if name != ADAPTED_NAME else None
            dim = getattr(factory, "dim", None)
            version = version_to_build(name, recorded[1] if recorded and recorded[0] == name else None)
            if version is None or not isinstance(dim, int) or getattr(factory, "sample_rate", None) is None:
                self.encoder
                return
            self.store.claim_encoder(name, version, dim)
            return
        name = self._wanted_name(recorded)
        if name == recorded[0] == ADAPTED_NAME:
            return  # its version is the checksum of the model file it was recorded with
        if name not in ENCODERS:
            get_encoder(name)  # raises the usual UsageError
        version = version_to_build(name, recorded[1] if name == recorded[0] else None)
        self.store.claim_encoder(name, version if version is not None else recorded[1], recorded[2])

    def embed(self, samples: np.ndarray, *, encoder: Encoder | None = None) -> tuple[list[tuple[float, float]], np.ndarray]:
        """Cut a decoded signal (at the encoder's rate) into segments and embed them.

        Returns ``(bounds, vectors)``: segment times in seconds and ``(n_segments, dim)`` vectors.
        """
        encoder = encoder or self.encoder
        sr = encoder.sample_rate
        cuts = audio.segment_bounds(len(samples), sr, self.config.segments)
        vectors = encoder.embed([samples[s:e] for s, e in cuts])
        return [(s / sr, e / sr) for s, e in cuts], vectors

    def _decode(self, path: str, data: bytes | None = None) -> audio.Decoded:
        if data is None:
            data = audio.read_bytes(path)
        return audio.decode(data, path=path, sample_rate=self.encoder.sample_rate,
                            max_seconds=self.config.read.max_seconds)

    # ---- indexing ----------------------------------------------------------------------
    def index(self, paths: Iterable[str | os.PathLike], *, label_from_folders: bool = False,
              label_regex: str | None = None, prune: bool = False, progress: Progress | None = None) -> IndexReport:
        """Add new and changed audio files under ``paths``; skip unchanged ones.

        A file is unchanged when size and mtime match; a file whose content hash matches a
        vanished file is a move (path updated, labels kept, nothing re-embedded). With
        ``prune``, files under ``paths`` that no longer exist are deleted from the index.
        Unreadable files are reported in ``failed`` (and remembered until they change).

        Files are decoded in worker processes, each under ``config.read.timeout_seconds``,
        and committed in batches of ``config.batch_files``: an interrupted run keeps every
        batch it committed and the next run carries on from there.
        """
        pattern = re.compile(label_regex) if label_regex else None
        if pattern is not None and pattern.groups < 1:
            raise UsageError(f"--label-regex {label_regex!r} needs a capture group, e.g. '^([a-z]+)_'")
        roots = [os.path.abspath(os.path.expanduser(os.fspath(p))) for p in paths]
        report = IndexReport()
        for root in roots:
            if not os.path.lexists(root):
                report.failed.append((root, "no such file or directory"))

        def label_for(path: str) -> str | None:
            if label_from_folders:
                return Path(path).parent.name or None
            if pattern is not None:
                match = pattern.search(Path(path).name)
                return match.group(1) if match else None
            return None

        with self.store.locked():
            self._check_encoder()  # fail early on a mismatch, without loading a model
            files = [str(p) for p in audio.find_audio_files(r for r in roots if os.path.lexists(r))]
            jobs = indexer.plan(self, files, label_for, report)
            indexer.run_jobs(self, jobs, report, progress=progress, total=len(files), done=len(files) - len(jobs),
                           label_source="folder" if label_from_folders else "regex")
            if prune:
                indexer.prune(self, roots, report)
            self.store.vector_index()  # bring the FAISS cache up to date once per run
        return report

    # ---- labels and removal ---------------------------------------------------------------
    def label(self, label: str, clips: Iterable[str | os.PathLike], *, progress: Progress | None = None) -> IndexReport:
        """Give ``label`` to whole files, embedding and adding those not indexed yet. Never re-embeds."""
        if not label or not label.strip():
            raise UsageError("a label must be a non-empty string")
        report = IndexReport()
        with self.store.locked():
            known, jobs = [], []
            for path in map(str, audio.find_audio_files(clips)):
                record = self.store.file_by_path(path)
                try:
                    stat = os.stat(path)
                except OSError as e:
                    if record is None:
                        report.failed.append((path, f"cannot stat: {e.strerror}"))
                        continue
                if record is not None:
                    known.append(record.id)
                    report.unchanged.append(path)
                else:
                    jobs.append(indexer.Job(path, stat, label))
            if known:
                with self.store.writing():
                    self.store.set_label(known, label)
            indexer.run_jobs(self, jobs, report, progress=progress, total=len(jobs), done=0)
            self.store.vector_index()
        return report

    def reembed(self, encoder: str | Encoder, *, drop_unreadable: bool = False,
                progress: Progress | None = None) -> IndexReport:
        """Re-embed every indexed file with another encoder, atomically; labels are kept.

        All files are read and embedded first, then swapped in with the new encoder's name in
        one transaction, so an interruption leaves the old vectors working. If some files
        cannot be read any more nothing changes, unless ``drop_unreadable`` (they are removed).
        """
        new = get_encoder(encoder) if isinstance(encoder, str) else encoder
        report = IndexReport()
        with self.store.locked():
            records = self.store.all_files()
            staged = []
            for done, record in enumerate(records, 1):
                try:
                    decoded = audio.load(record.path, sample_rate=new.sample_rate, max_seconds=self.config.read.max_seconds)
                    staged.append((record, *self.embed(decoded.samples, encoder=new)))
                except AudioReadError as e:
                    report.failed.append((record.path, e.reason))
                if progress:
                    progress(done, len(records))
            if report.failed and not drop_unreadable:
                return report
            with self.store.writing():
                self.store.delete_files([self.store.file_by_path(path).id for path, _ in report.failed])
                for record, bounds, vectors in staged:
                    self.store.replace_vectors(record.id, bounds, vectors)
                    report.added.append(record.path)
                self.store.set_encoder(new.name, new.version, new.dim)
            self._encoder, self._encoder_name = new, new.name
            self.store.vector_index()
        return report

    def train(self, *, config: AdaptConfig = AdaptConfig(), progress=None) -> dict:
        """Adapt the CNN to this index's labels, re-embed everything and switch atomically.

        See :func:`simsearch.adapt.train_index`; ``progress(stage, done, total)``.
        """
        from .adapt import train_index

        return train_index(self, config=config, progress=progress)

    def unlabel(self, clips: Iterable[str | os.PathLike]) -> int:
        """Remove the label of these indexed files; returns how many had one."""
        ids = [r.id for p in audio.find_audio_files(clips) if (r := self.store.file_by_path(str(p)))]
        with self.store.writing():
            before = self.store.count("labels")
            self.store.set_label(ids, None)
            return before - self.store.count("labels")

    def labels(self) -> dict[str, int]:
        """Category → number of labelled files."""
        return self.store.label_counts()

    def remove(self, paths: Iterable[str | os.PathLike]) -> list[str]:
        """Delete files (or everything under folders) from SQLite and FAISS; returns removed paths."""
        with self.store.locked():
            records = {}
            for raw in paths:
                for record in self.store.files_under(os.path.abspath(os.path.expanduser(os.fspath(raw)))):
                    records[record.id] = record
            if records:
                with self.store.writing():
                    self.store.delete_files(list(records))
                self.store.vector_index()
        return [r.path for r in records.values()]

    # ---- information -------------------------------------------------------------------
    def info(self) -> dict:
        """Counts, encoder, FAISS index type and bytes on disk (never loads the encoder)."""
        from .store import describe_index

        recorded = self.store.encoder()
        segments = self.store.count("segments")
        return {"files": self.store.count("files"), "segments": segments, "labels": self.labels(),
                "encoder": f"{recorded[0]}-v{recorded[1]}" if recorded else None,
                "index_type": describe_index(self.store.vector_index()) if segments else "empty",
                "bytes": self.store.disk_bytes()}

    def failures(self) -> list[tuple[str, str]]:
        """Files that could not be read, with the reason, as recorded by the last runs."""
        return self.store.failures()

    def catalog(self) -> Catalog:
        generation = self.store.generation
        if self._catalog is None or self._catalog[0] != generation:
            self._catalog = (generation, self.store.catalog())
        return self._catalog[1]

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- query ---------------------------------------------------------------------------
    def query(self, clips: Iterable[str | os.PathLike], *, k: int = 5, include: Sequence[str] = (),
              exclude: Sequence[str] = (), unknown_threshold: float | None = None,
              errors: list | None = None) -> list[QueryResult]:
        """Nearest indexed files and a category for each clip (files or folders of clips).

        The query file itself (same path or identical content) is never its own neighbour.
        ``include``/``exclude`` are shell globs over indexed paths applied inside the search.
        Clips that cannot be read raise, unless ``errors`` is a list: then ``(path, reason)``
        is appended to it and the rest are answered.
        """
        results = []
        allowed = search.allowed_files(self.catalog(), include=include, exclude=exclude)
        for path in map(str, audio.find_audio_files(clips)):
            try:
                decoded = self._decode(path)
            except AudioReadError as e:
                if errors is None:
                    raise
                errors.append((path, e.reason))
                continue
            _, vectors = self.embed(decoded.samples)
            results.append(self.query_vectors(vectors, path=path, content_hash=decoded.content_hash, k=k,
                                              allowed=allowed, unknown_threshold=unknown_threshold))
        return results

    def query_vectors(self, vectors: np.ndarray, *, path: str = "", content_hash: str | None = None, k: int = 5,
                      include: Sequence[str] = (), exclude: Sequence[str] = (), allowed: np.ndarray | None = None,
                      unknown_threshold: float | None = None) -> QueryResult:
        """:meth:`query` for already embedded segment ``vectors`` ``(n_segments, dim)``.

        ``allowed`` (file ids from :func:`simsearch.search.allowed_files`) replaces
        ``include``/``exclude`` when a caller has already resolved them.
        """
        catalog = self.catalog()
        itself = {r.id for r in self.store.files_by_hash(content_hash)} if content_hash else set()
        if (record := self.store.file_by_path(path)) is not None:
            itself.add(record.id)
        if allowed is None:
            allowed = search.allowed_files(catalog, include=include, exclude=exclude)
        file_ids = allowed[~np.isin(allowed, list(itself))] if itself else allowed
        nearest = search.nearest_files(self.store, catalog, vectors, k, file_ids)
        vote_config = self.config.vote
        threshold = unknown_threshold if unknown_threshold is not None else (
            vote_config.unknown_threshold if vote_config.unknown_threshold is not None else self.encoder.unknown_threshold)
        category = search.categorise(self.store, catalog, vectors, file_ids, k=vote_config.k,
                                     temperature=vote_config.temperature, unknown_threshold=threshold)
        neighbours = [Neighbour(catalog.paths[f], catalog.labels.get(f), score, start, end)
                      for f, score, start, end in nearest]
        return QueryResult(path=path, category=category, neighbours=neighbours)
