"""Few-shot curves and "unknown" rejection, measured on embeddings already computed.

Both work on the output of :func:`simsearch.evaluate.embed_files` and respect groups: the
queries of a round always come from one held-out group, the labelled references from the
others, so a speaker (or session) is never on both sides.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from .config import VoteConfig
from .errors import UsageError
from .evaluate import Dataset, file_similarity, predict
from .vote import vote


def few_shot(vectors: np.ndarray, owner: np.ndarray, dataset: Dataset, held_out: list[np.ndarray], *,
             shots: Sequence[int] = (1, 5, 10), repeats: int = 5, seed: int = 0,
             vote_config: VoteConfig = VoteConfig()) -> dict[str, float]:
    """Vote accuracy when each class has only ``n`` labelled examples, for each ``n`` in ``shots``.

    For every held-out fold and seeded repeat, ``n`` references per class are drawn from the
    other folds; every file of the held-out fold is a query. Returns ``{str(n): accuracy}``.
    """
    labels = np.array(dataset.labels)
    readable = np.unique(owner)
    curve = {}
    for n in shots:
        hits = total = 0
        for repeat in range(repeats):
            rng = np.random.default_rng([seed, n, repeat])
            for fold in held_out:
                queries = np.intersect1d(fold, readable)
                pool = np.setdiff1d(readable, fold)
                refs = np.sort(np.concatenate([rng.permutation(pool[labels[pool] == c])[:n]
                                               for c in sorted(set(labels[pool]))]))
                if len(queries) == 0 or len(refs) == 0:
                    continue
                _, voted, _ = predict(file_similarity(vectors, owner, queries, refs), labels[refs].tolist(),
                                      vote_config=vote_config)
                hits += int(np.sum(np.array(voted) == labels[queries]))
                total += len(queries)
        curve[str(n)] = hits / total if total else 0.0
    return curve


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)) if n_pos and n_neg else 0.0


def unknown_rejection(vectors: np.ndarray, owner: np.ndarray, dataset: Dataset, held_out: list[np.ndarray],
                      rounds: list[tuple[int, set[str]]], *, threshold: float,
                      vote_config: VoteConfig = VoteConfig()) -> dict:
    """How well the vote's "unknown" answer separates classes nobody labelled.

    Every round (``(fold, hidden classes)`` from :func:`unknown_rounds`) hides whole classes
    from the references; queries from the round's fold are *known* (their class is labelled)
    or *unknown*. The score is the one the vote thresholds: the winning label's best
    similarity. See :func:`summarise_unknown` for what is reported.
    """
    scores = UnknownScores()
    for fold, hidden in rounds:
        scores.add(vectors, owner, dataset, held_out[fold], hidden, vote_config=vote_config)
    return summarise_unknown(scores, threshold=threshold, rounds=rounds, n_folds=len(held_out))


def unknown_rounds(dataset: Dataset, n_folds: int, n_unknown: int, *, repeats: int,
                   seed: int) -> list[tuple[int, set[str]]]:
    """The ``(fold, hidden classes)`` of each unknown-rejection round, ``repeats`` per fold.

    Round ``i`` holds out fold ``i % n_folds`` and hides the ``i``-th set of a seeded random
    order of *all* ``n_unknown``-class sets, so no set is hidden twice until every one has
    been (10 digits, 2 hidden: 45 sets). How well "unknown" works depends far more on which
    classes are hidden than on anything else (FSDD, 6 rounds each: AUROC 0.82 with one seed's
    draw, 0.91 with another's), so the rounds spread over as many different sets as they can.
    """
    classes = sorted(set(dataset.labels))
    rounds = n_folds * repeats
    if not 0 < n_unknown < len(classes):
        raise UsageError(f"--unknown {n_unknown}: cannot hide {n_unknown} of {len(classes)} classes and keep "
                         f"one known")
    rng = np.random.default_rng([seed, n_unknown])
    if math.comb(len(classes), n_unknown) <= 100_000:
        sets = list(itertools.combinations(classes, n_unknown))
        order = rng.permutation(len(sets))
        chosen = [sets[order[i % len(sets)]] for i in range(rounds)]
    else:  # too many to list: independent draws rarely repeat anyway
        chosen = [rng.choice(classes, size=n_unknown, replace=False).tolist() for _ in range(rounds)]
    return [(i % n_folds, set(hidden)) for i, hidden in enumerate(chosen)]


class UnknownScores:
    """Vote scores of known and unknown queries, collected fold by fold."""

    def __init__(self):
        self.rounds: list[tuple[list[float], list[float]]] = []  # (known, unknown) scores of each add()
        self.names: list[dict] = []  # each add()'s held-out group and hidden classes
        self.known_right: list[bool] = []  # per known query, pooled in order

    @property
    def known(self) -> list[float]:
        return [score for known, _ in self.rounds for score in known]

    @property
    def unknown(self) -> list[float]:
        return [score for _, unknown in self.rounds for score in unknown]

    def add(self, vectors: np.ndarray, owner: np.ndarray, dataset: Dataset, fold: np.ndarray, hidden: set[str], *,
            vote_config: VoteConfig = VoteConfig()) -> None:
        """Score the queries of ``fold`` against the other folds' files whose class is not ``hidden``."""
        labels = np.array(dataset.labels)
        readable = np.unique(owner)
        queries = np.intersect1d(fold, readable)
        refs = np.array([i for i in np.setdiff1d(readable, fold) if labels[i] not in hidden], dtype=np.int64)
        if len(queries) == 0 or len(refs) == 0:
            return
        similarity = file_similarity(vectors, owner, queries, refs)
        k = min(vote_config.k, len(refs))
        known, unknown = [], []
        for q, row in zip(queries, similarity):
            top = np.argsort(-row, kind="stable")[:k]
            category = vote(row[top].tolist(), labels[refs[top]].tolist(), temperature=vote_config.temperature,
                            unknown_threshold=-np.inf)
            if labels[q] in hidden:
                unknown.append(category.similarity)
            else:
                known.append(category.similarity)
                self.known_right.append(category.label == labels[q])
        self.rounds.append((known, unknown))
        self.names.append({"group": dataset.groups[queries[0]], "hidden": sorted(hidden)})


def summarise_unknown(scores: UnknownScores, *, threshold: float, rounds: list[tuple[int, set[str]]],
                      n_folds: int) -> dict:
    """AUROC (known vs unknown), accuracy of the known/unknown decision and open-set accuracy
    (known: right label and accepted; unknown: rejected) at ``threshold``, and the threshold
    that maximises balanced accuracy (what a default should be calibrated from).

    ``auroc`` pools every round's scores, as one fixed threshold must serve them all;
    ``auroc_per_round`` is the mean over rounds (one held-out group, one set of references
    and, with adaptation, one model each) — what a single library sees."""
    n_unknown, repeats = len(rounds[0][1]), len(rounds) // n_folds
    known, unknown, right = np.array(scores.known), np.array(scores.unknown), np.array(scores.known_right, bool)
    if len(known) == 0 or len(unknown) == 0:
        return {"hidden_classes": n_unknown, "repeats": repeats, "auroc": None, "threshold": threshold}
    candidates = np.unique(np.concatenate([known, unknown]))
    balanced = [_balanced_accuracy(known, unknown, t) for t in candidates]
    best = float(candidates[int(np.argmax(balanced))])
    each_round = [{**name, "auroc": auroc(np.array(k), np.array(u)) if k and u else None}
                  for name, (k, u) in zip(scores.names, scores.rounds)]
    per_round = [r["auroc"] for r in each_round if r["auroc"] is not None]
    return {"hidden_classes": n_unknown, "repeats": repeats, "auroc": auroc(known, unknown),
            "auroc_per_round": float(np.mean(per_round)) if per_round else None, "rounds": each_round,
            "threshold": threshold,
            "decision_accuracy": _decision_accuracy(known, unknown, threshold),
            "balanced_accuracy": _balanced_accuracy(known, unknown, threshold),
            "open_set_accuracy": float((np.sum(right & (known >= threshold)) + np.sum(unknown < threshold))
                                       / (len(known) + len(unknown))),
            "best_threshold": best, "decision_accuracy_at_best": _decision_accuracy(known, unknown, best),
            "balanced_accuracy_at_best": _balanced_accuracy(known, unknown, best)}


def _balanced_accuracy(known: np.ndarray, unknown: np.ndarray, threshold: float) -> float:
    return float(((known >= threshold).mean() + (unknown < threshold).mean()) / 2)


def _decision_accuracy(known: np.ndarray, unknown: np.ndarray, threshold: float) -> float:
    return float((np.sum(known >= threshold) + np.sum(unknown < threshold)) / (len(known) + len(unknown)))
