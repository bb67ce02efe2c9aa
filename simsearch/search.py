"""The query pipeline: embed the query, search inside the allowed ids, group by file, vote.

Filters (``include``/``exclude`` globs, the query itself) become a FAISS ID selector, so
they apply inside the search, before the top k are taken and before the vote.
"""

from __future__ import annotations

import fnmatch
import os
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .store import Catalog, Store
from .vote import Category, vote


def glob_matcher(patterns: Iterable[str]):
    """One compiled test for shell-style ``patterns`` (``~`` expanded; ``*`` also crosses ``/``)."""
    regex = "|".join(fnmatch.translate(os.path.expanduser(p)) for p in patterns)
    return re.compile(regex).match if regex else None


@dataclass(frozen=True)
class _Prepared:
    """What every query on one catalog needs, computed once per catalog: all file ids and
    the labelled ones (sorted, read-only), which file ids are labelled (a mask indexed by
    file id), and the segment selections of searches over either set (filled on first use)."""

    files: np.ndarray
    labelled: np.ndarray
    labelled_files: np.ndarray
    selections: dict


_prepared_for: tuple[weakref.ref, _Prepared] | None = None


def _prepare(catalog: Catalog) -> _Prepared:
    # One slot, keyed by the catalog object itself: a new catalog (a new database
    # generation) is a new object, so nothing stale is ever served.
    global _prepared_for
    if _prepared_for is not None and _prepared_for[0]() is catalog:
        return _prepared_for[1]
    files = np.sort(np.fromiter(catalog.paths, dtype=np.int64, count=len(catalog.paths)))
    size = int(max(files[-1] if len(files) else 0, catalog.segment_files.max(initial=0))) + 1
    labelled = np.zeros(size, dtype=bool)
    labelled[np.fromiter(catalog.labels, dtype=np.int64, count=len(catalog.labels))] = True
    labelled_files = files[labelled[files]]
    files.flags.writeable = labelled.flags.writeable = labelled_files.flags.writeable = False
    prepared = _Prepared(files, labelled, labelled_files, {})
    _prepared_for = (weakref.ref(catalog), prepared)
    return prepared


def allowed_files(catalog: Catalog, *, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> np.ndarray:
    """Ids of the files a search may return: matching any ``include`` (all if none), no ``exclude``. Sorted."""
    if not include and not exclude:
        return _prepare(catalog).files
    included, excluded = glob_matcher(include), glob_matcher(exclude)
    keep = [file_id for file_id, path in catalog.paths.items()
            if (included is None or included(path)) and not (excluded and excluded(path))]
    return np.array(sorted(keep), dtype=np.int64)


SMALL_EXCLUSION = 4096
"""A filter leaving out at most this many segments is passed as the few left out (a hash
set); a wider one as the allowed ones (a bitmap over segment ids)."""


def _selection(catalog: Catalog, file_ids: np.ndarray) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """``(n_allowed, allowed, excluded)``: how many segments of ``file_ids`` there are, and
    which segment ids to pass the search (``None``: no restriction of that kind).

    Two O(segments) passes; a query without filters asks for all files and then all
    labelled files, so those two selections are kept with the catalog (a third of a
    millisecond per query at 100k segments)."""
    prepared = _prepare(catalog)
    key = "all" if file_ids is prepared.files else "labelled" if file_ids is prepared.labelled_files else None
    if key in prepared.selections:
        return prepared.selections[key]
    file_ok = np.zeros(len(prepared.labelled), dtype=bool)
    file_ids = np.asarray(file_ids, dtype=np.int64)
    file_ok[file_ids[(file_ids >= 0) & (file_ids < len(file_ok))]] = True
    segment_ok = file_ok[catalog.segment_files]  # O(segments), no sorting: fast at 1M
    n_allowed = int(np.count_nonzero(segment_ok))
    allowed = excluded = None
    if 0 < n_allowed < len(segment_ok):
        if len(segment_ok) - n_allowed <= SMALL_EXCLUSION:
            excluded = catalog.segment_ids[~segment_ok]
            excluded.flags.writeable = False
        else:
            allowed = catalog.segment_ids[segment_ok]
            allowed.flags.writeable = False
    if key is not None:
        prepared.selections[key] = (n_allowed, allowed, excluded)
    return n_allowed, allowed, excluded


def nearest_files(store: Store, catalog: Catalog, vectors: np.ndarray, k: int,
                  file_ids: np.ndarray) -> list[tuple[int, float, float, float]]:
    """The ``k`` files nearest to any of the query's segment ``vectors`` ``(q, dim)``.

    A file's score is its best segment similarity to any query segment; its time range is
    that segment's. Only segments of ``file_ids`` are searched. Returns
    ``[(file_id, score, start, end), ...]`` best first.
    """
    if k <= 0 or len(file_ids) == 0 or len(catalog.segment_ids) == 0:
        return []
    n_allowed, allowed, excluded = _selection(catalog, file_ids)
    if n_allowed == 0:
        return []
    # Files own several segments; widen the segment search until k distinct files appear.
    n_segments = min(n_allowed, max(4 * k, k + 32))
    while True:
        scores, ids = store.search(vectors, n_segments, allowed, excluded)
        best: dict[int, tuple[float, float, float]] = {}
        found = ids.ravel() >= 0
        rows = np.searchsorted(catalog.segment_ids, ids.ravel()[found])  # segment ids are sorted
        for score, i in zip(scores.ravel()[found].tolist(), rows.tolist()):
            file_id = int(catalog.segment_files[i])
            if file_id not in best or score > best[file_id][0]:
                best[file_id] = (score, float(catalog.starts[i]), float(catalog.ends[i]))
        if len(best) >= k or n_segments >= n_allowed:
            break
        n_segments = min(n_allowed, n_segments * 4)
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
    return [(file_id, score, start, end) for file_id, (score, start, end) in ranked]


def categorise(store: Store, catalog: Catalog, vectors: np.ndarray, file_ids: np.ndarray, *, k: int,
               temperature: float, unknown_threshold: float) -> Category | None:
    """Vote among the ``k`` nearest *labelled* files (unlabelled ones never dilute the vote)."""
    prepared = _prepare(catalog)
    if file_ids is prepared.files:
        labelled = prepared.labelled_files
    else:
        labelled_mask = prepared.labelled
        file_ids = np.asarray(file_ids, dtype=np.int64)
        labelled = file_ids[labelled_mask[np.clip(file_ids, 0, len(labelled_mask) - 1)] & (file_ids >= 0)
                            & (file_ids < len(labelled_mask))]
    voters = nearest_files(store, catalog, vectors, k, labelled)
    return vote([score for _, score, _, _ in voters], [catalog.labels[f] for f, _, _, _ in voters],
                temperature=temperature, unknown_threshold=unknown_threshold)
