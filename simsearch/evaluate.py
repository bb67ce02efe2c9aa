"""Measure categorisation strategies side by side on a user's own labelled library.

Each strategy (an encoder name) embeds every file once. Files are then split into folds —
leave one *group* out (e.g. one speaker, one recording session) when a group regex is given,
else K stratified random folds — and each held-out file is categorised from the others:

``top1``
    the label of the single nearest file;
``vote``
    the engine's weighted k-NN vote (:func:`simsearch.vote.vote`), forced to answer;
``macro_f1``
    F1 of the vote per class, averaged over classes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import audio
from .config import SegmentConfig, VoteConfig
from .encoders import Encoder, get_encoder
from .errors import AudioReadError, UsageError
from .vote import vote


@dataclass(frozen=True)
class Dataset:
    """Labelled files: ``paths``, ``labels`` and ``groups`` aligned, one entry per file."""

    paths: list[str]
    labels: list[str]
    groups: list[str]


def labelled_files(roots: Sequence[str | Path], *, label_regex: str | None = None, label_from_folders: bool = False,
                   group_regex: str | None = None) -> Dataset:
    """Find audio files and their labels (and groups) from names; unlabelled files are skipped."""
    if not (label_regex or label_from_folders):
        raise UsageError("say where labels come from: --label-from-folders or --label-regex")
    label_pattern = re.compile(label_regex) if label_regex else None
    group_pattern = re.compile(group_regex) if group_regex else None
    paths, labels, groups = [], [], []
    for path in audio.find_audio_files(roots):
        label = path.parent.name if label_from_folders else _group1(label_pattern, path.name)
        group = _group1(group_pattern, path.name) if group_pattern else ""
        if label and group is not None:
            paths.append(str(path))
            labels.append(label)
            groups.append(group)
    if len(set(labels)) < 2:
        raise UsageError(f"evaluation needs at least two labels; found {sorted(set(labels))}")
    return Dataset(paths, labels, groups)


def _group1(pattern: re.Pattern | None, text: str) -> str | None:
    match = pattern.search(text) if pattern else None
    return match.group(1) if match else None


def folds_of(dataset: Dataset, *, folds: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Held-out index arrays: one per group (leave one group out), else ``folds`` stratified folds."""
    if folds is None:
        names = sorted(set(dataset.groups))
        if len(names) < 2:
            raise UsageError("leave-one-group-out needs at least two groups (check --group-regex) or use --folds K")
        groups = np.array(dataset.groups)
        return [np.flatnonzero(groups == name) for name in names]
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(dataset.paths), dtype=int)
    labels = np.array(dataset.labels)
    for label in sorted(set(dataset.labels)):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = np.arange(len(members)) % folds
    return [np.flatnonzero(assignment == f) for f in range(folds)]


def embed_files(encoder: Encoder, paths: Sequence[str], *, segments: SegmentConfig = SegmentConfig(),
                progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Embed files segment by segment: returns ``(vectors (n_seg, dim), owner (n_seg,), failures)``.

    ``owner[i]`` is the index in ``paths`` of segment ``i``'s file.
    """
    vectors, owners, failures = [], [], []
    batch, batch_owner = [], []

    def flush():
        if batch:
            vectors.append(encoder.embed(batch))
            owners.extend(batch_owner)
            batch.clear()
            batch_owner.clear()

    for i, path in enumerate(paths):
        try:
            samples = audio.load(path, sample_rate=encoder.sample_rate).samples
        except AudioReadError as e:
            failures.append((path, e.reason))
            continue
        for s, e in audio.segment_bounds(len(samples), encoder.sample_rate, segments):
            batch.append(samples[s:e])
            batch_owner.append(i)
        if len(batch) >= 256:
            flush()
        if progress:
            progress(i + 1, len(paths))
    flush()
    dim = encoder.dim
    return (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)), np.array(owners, dtype=np.int64), failures


def file_similarity(vectors: np.ndarray, owner: np.ndarray, queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """``(len(queries), len(refs))`` file-to-file similarity: the best pair of their segments."""
    q_rows = np.flatnonzero(np.isin(owner, queries))
    r_rows = np.flatnonzero(np.isin(owner, refs))
    sims = vectors[q_rows] @ vectors[r_rows].T
    # Reduce segment rows to files (owners are contiguous because files are embedded in order).
    q_starts = np.flatnonzero(np.r_[True, np.diff(owner[q_rows]) != 0])
    r_starts = np.flatnonzero(np.r_[True, np.diff(owner[r_rows]) != 0])
    by_query = np.maximum.reduceat(sims, q_starts, axis=0)
    by_file = np.maximum.reduceat(by_query, r_starts, axis=1)
    present_q, present_r = owner[q_rows][q_starts], owner[r_rows][r_starts]
    out = np.full((len(queries), len(refs)), -np.inf, dtype=np.float32)
    out[np.ix_(np.searchsorted(queries, present_q), np.searchsorted(refs, present_r))] = by_file
    return out


def predict(similarity: np.ndarray, ref_labels: Sequence[str], *, vote_config: VoteConfig = VoteConfig()):
    """Top-1 and vote predictions for each query row of ``similarity`` ``(q, n_refs)``."""
    k = min(vote_config.k, similarity.shape[1])
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    top1, voted, best = [], [], []
    for row, neighbours in zip(similarity, order):
        labels = [ref_labels[j] for j in neighbours]
        top1.append(labels[0])
        category = vote(row[neighbours].tolist(), labels, temperature=vote_config.temperature, unknown_threshold=-np.inf)
        voted.append(category.label)
        best.append(float(row[neighbours[0]]))
    return top1, voted, best


def class_report(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class."""
    report = {}
    for label in sorted(set(truth)):
        tp = sum(t == label and p == label for t, p in zip(truth, predicted))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return report


def score_folds(vectors: np.ndarray, owner: np.ndarray, dataset: Dataset, held_out: list[np.ndarray], *,
                vote_config: VoteConfig = VoteConfig()) -> dict:
    """Categorise every held-out fold from the other folds' files. Returns plain data."""
    readable = np.unique(owner)
    labels = np.array(dataset.labels)
    truth, top1, voted, per_fold = [], [], [], []
    for fold in held_out:
        queries = np.intersect1d(fold, readable)
        refs = np.setdiff1d(readable, fold)
        if len(queries) == 0 or len(refs) == 0:
            continue
        fold_top1, fold_vote, _ = predict(file_similarity(vectors, owner, queries, refs), labels[refs].tolist(),
                                          vote_config=vote_config)
        fold_truth = labels[queries].tolist()
        per_fold.append({"group": dataset.groups[queries[0]] or str(len(per_fold)), "files": len(queries),
                         "top1": _accuracy(fold_truth, fold_top1), "vote": _accuracy(fold_truth, fold_vote)})
        truth += fold_truth
        top1 += fold_top1
        voted += fold_vote
    per_class = class_report(truth, voted)
    return {"top1": _accuracy(truth, top1), "vote": _accuracy(truth, voted),
            "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])) if per_class else 0.0,
            "folds": per_fold, "per_class": per_class, "confusion": confusion(truth, voted)}


def confusion(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """Confusion counts: ``{"labels": [...], "matrix": [[count true i predicted j]]}``."""
    labels = sorted(set(truth) | set(predicted))
    position = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(truth, predicted):
        matrix[position[t], position[p]] += 1
    return {"labels": labels, "matrix": matrix.tolist()}


def evaluate(roots: Sequence[str | Path], *, encoders: Sequence[str] = ("cnn", "features"), label_regex: str | None = None,
             label_from_folders: bool = False, group_regex: str | None = None, folds: int | None = None, seed: int = 0,
             vote_config: VoteConfig = VoteConfig(), shots: Sequence[int] = (), unknown: int = 0, repeats: int = 5,
             adapt: bool = False, adapt_config=None, progress=None) -> dict:
    """Compare strategies on a labelled library; see the module docstring. Returns plain data.

    ``shots`` adds a few-shot curve and ``unknown`` (number of hidden classes) an unknown-
    rejection report per strategy (:mod:`simsearch.evaluate_openset`). ``adapt`` adds the
    CNN adapted to each fold's labelled part only (:mod:`simsearch.adapt`).
    """
    from . import evaluate_openset

    dataset = labelled_files(roots, label_regex=label_regex, label_from_folders=label_from_folders,
                             group_regex=group_regex)
    if group_regex is None and folds is None:
        folds = 5
    held_out = folds_of(dataset, folds=folds if group_regex is None else None, seed=seed)
    # one set of rounds for every strategy; an impossible --unknown is refused before embedding anything
    rounds = evaluate_openset.unknown_rounds(dataset, len(held_out), unknown, repeats=repeats, seed=seed) \
        if unknown else []
    results = {}
    for name in encoders:
        encoder = get_encoder(name)
        started = time.perf_counter()
        vectors, owner, failures = embed_files(encoder, dataset.paths, progress=progress)
        result = {"encoder": f"{encoder.name}-v{encoder.version}", "embed_seconds": round(time.perf_counter() - started, 2),
                  **score_folds(vectors, owner, dataset, held_out, vote_config=vote_config),
                  "failed": [{"path": p, "reason": r} for p, r in failures]}
        if shots:
            result["few_shot"] = evaluate_openset.few_shot(vectors, owner, dataset, held_out, shots=shots,
                                                           repeats=repeats, seed=seed, vote_config=vote_config)
        if unknown:
            threshold = vote_config.unknown_threshold if vote_config.unknown_threshold is not None else encoder.unknown_threshold
            result["unknown"] = evaluate_openset.unknown_rejection(vectors, owner, dataset, held_out, rounds,
                                                                   threshold=threshold, vote_config=vote_config)
        results[name] = result
    if adapt:
        from .adapt import evaluate_adapted

        results["cnn+adapt"] = evaluate_adapted(dataset, held_out, config=adapt_config, vote_config=vote_config,
                                                unknown_rounds=rounds, progress=progress)
    return {"files": len(dataset.paths), "labels": len(set(dataset.labels)), "folds": len(held_out),
            "split": "leave-one-group-out" if group_regex else f"{folds}-fold", "strategies": results}


def _accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    return float(np.mean([t == p for t, p in zip(truth, predicted)])) if truth else 0.0
