"""The weighted nearest-neighbour vote and its "unknown" answer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simsearch.vote import label_weights, vote


def test_majority_of_close_neighbours_wins():
    category = vote([0.9, 0.88, 0.7], ["dog", "dog", "cat"], unknown_threshold=0.5)
    assert category.label == "dog" and category.confidence > 0.9


def test_a_few_very_close_examples_outvote_many_distant_ones():
    category = vote([0.95, 0.94] + [0.6] * 8, ["siren"] * 2 + ["hum"] * 8, unknown_threshold=0.5)
    assert category.label == "siren"


def test_unknown_when_nothing_labelled_is_close():
    assert vote([0.3, 0.25], ["dog", "cat"], unknown_threshold=0.5) is None


def test_unknown_when_there_are_no_labelled_neighbours():
    assert vote([], []) is None


@given(st.lists(st.tuples(st.floats(-1, 1), st.sampled_from("abc")), min_size=1, max_size=30),
       st.floats(0.01, 1.0))
def test_shares_sum_to_one_and_confidence_is_the_winners_share(pairs, temperature):
    similarities, labels = zip(*pairs)
    shares = label_weights(similarities, labels, temperature=temperature)
    assert sum(shares.values()) == pytest.approx(1.0)
    category = vote(similarities, labels, temperature=temperature, unknown_threshold=-1.0)
    assert category.confidence == pytest.approx(max(shares.values()))
    assert 0.0 < category.confidence <= 1.0
