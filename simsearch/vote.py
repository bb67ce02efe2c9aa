"""Categorising a clip by a weighted vote of its nearest labelled neighbours.

There is no classifier head: a category is just labelled vectors in the index, so teaching a
new one is adding a few labelled clips. Pure functions over plain data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    """The vote's answer: ``label`` with ``confidence`` in [0, 1] (the winner's share of the vote)."""

    label: str
    confidence: float
    similarity: float
    """Best cosine similarity between the query and a neighbour of the winning label."""

    def to_dict(self) -> dict:
        return {"label": self.label, "confidence": round(self.confidence, 6)}


def label_weights(similarities: Sequence[float], labels: Sequence[str], *, temperature: float) -> dict[str, float]:
    """Each label's share of the vote, ``exp(similarity / temperature)`` weighted; shares sum to 1.

    A low temperature lets a few very close examples of a small class outvote many distant
    examples of a big one, which is what few-shot categories need.
    """
    if not labels:
        return {}
    top = max(similarities)
    totals: dict[str, float] = {}
    for similarity, label in zip(similarities, labels):
        totals[label] = totals.get(label, 0.0) + math.exp((similarity - top) / temperature)
    whole = sum(totals.values())
    return {label: weight / whole for label, weight in totals.items()}


def vote(similarities: Sequence[float], labels: Sequence[str], *, temperature: float = 0.05,
         unknown_threshold: float = 0.0) -> Category | None:
    """Weighted k-NN vote over the nearest labelled neighbours.

    Parameters
    ----------
    similarities : sequence of float, length k
        Cosine similarity of the query to each labelled neighbour.
    labels : sequence of str, length k
        Each neighbour's label.
    temperature : float
        Softness of the similarity weighting (smaller: the closest neighbours dominate).
    unknown_threshold : float
        If the winning label's best similarity is below this, the answer is ``None``
        ("none of the known categories"): the nearest-neighbour distance is the signal that
        a clip is unlike anything labelled, whatever the vote shares say.

    Returns
    -------
    Category or None
    """
    shares = label_weights(similarities, labels, temperature=temperature)
    if not shares:
        return None
    winner = max(shares, key=lambda label: (shares[label], label))
    best = max(s for s, label in zip(similarities, labels) if label == winner)
    if best < unknown_threshold:
        return None
    return Category(label=winner, confidence=shares[winner], similarity=best)
