"""The query pipeline: embed the query, search inside the allowed ids, group by file, vote.

Filters (``include``/``exclude`` globs, the query itself) become a FAISS ID selector, so
they apply inside the search, before the top k are taken and before the vote.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from .store import Catalog, Store
from .vote import Category, vote


def glob_matcher(patterns: Iterable[str]):
    """One compiled test for shell-style ``patterns`` (``~`` expanded; ``*`` also crosses ``/``)."""
    regex = "|".join(fnmatch.translate(os.path.expanduser(p)) for p in patterns)
    return re.compile(regex).match if regex else None


def allowed_files(catalog: Catalog, *, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> np.ndarray:
    """Ids of the files a search may return: matching any ``include`` (all if none), no ``exclude``. Sorted."""
    included, excluded = glob_matcher(include), glob_matcher(exclude)
    keep = [file_id for file_id, path in catalog.paths.items()
            if (included is None or included(path)) and not (excluded and excluded(path))]
    return np.array(sorted(keep), dtype=np.int64)


def nearest_files(store: Store, catalog: Catalog, vectors: np.ndarray, k: int,
                  file_ids: np.ndarray) -> list[tuple[int, float, float, float]]:
    """The ``k`` files nearest to any of the query's segment ``vectors`` ``(q, dim)``.

    A file's score is its best segment similarity to any query segment; its time range is
    that segment's. Only segments of ``file_ids`` are searched. Returns
    ``[(file_id, score, start, end), ...]`` best first.
    """
    if k <= 0 or len(file_ids) == 0:
        return []
    segment_mask = np.isin(catalog.segment_files, file_ids)
    allowed = catalog.segment_ids[segment_mask]
    if len(allowed) == 0:
        return []
    # Files own several segments; widen the segment search until k distinct files appear.
    n_segments = min(len(allowed), max(4 * k, k + 32))
    while True:
        scores, ids = store.search(vectors, n_segments, None if segment_mask.all() else allowed)
        best: dict[int, tuple[float, float, float]] = {}
        found = ids.ravel() >= 0
        rows = np.searchsorted(catalog.segment_ids, ids.ravel()[found])  # segment ids are sorted
        for score, i in zip(scores.ravel()[found], rows):
            file_id = int(catalog.segment_files[i])
            if file_id not in best or score > best[file_id][0]:
                best[file_id] = (float(score), float(catalog.starts[i]), float(catalog.ends[i]))
        if len(best) >= k or n_segments >= len(allowed):
            break
        n_segments = min(len(allowed), n_segments * 4)
    ranked = sorted(best.items(), key=lambda item: (-item[1][0], item[0]))[:k]
    return [(file_id, score, start, end) for file_id, (score, start, end) in ranked]


def categorise(store: Store, catalog: Catalog, vectors: np.ndarray, file_ids: np.ndarray, *, k: int,
               temperature: float, unknown_threshold: float) -> Category | None:
    """Vote among the ``k`` nearest *labelled* files (unlabelled ones never dilute the vote)."""
    labelled = file_ids[np.isin(file_ids, np.fromiter(catalog.labels, dtype=np.int64, count=len(catalog.labels)))]
    voters = nearest_files(store, catalog, vectors, k, labelled)
    return vote([score for _, score, _, _ in voters], [catalog.labels[f] for f, _, _, _ in voters],
                temperature=temperature, unknown_threshold=unknown_threshold)
