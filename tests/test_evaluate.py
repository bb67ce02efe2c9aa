"""`evaluate`: strategies side by side, folds and groups, few-shot curve, unknown rejection."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import write_wav
from simsearch import UsageError, synth
from simsearch.cli import app
from simsearch.evaluate import evaluate
from simsearch.evaluate_openset import auroc


@pytest.fixture
def grouped(tmp_path):
    """4 kinds x 3 'sessions' x 3 takes, named KIND_SESSION_TAKE.wav."""
    root = tmp_path / "grouped"
    for k, kind in enumerate(("bell", "chirp", "hum", "clicks")):
        for s, session in enumerate(("alpha", "beta", "gamma")):
            for take in range(3):
                write_wav(root / f"{kind}_{session}_{take}.wav", synth.make(kind, 1000 * k + 10 * s + take))
    return root


def test_leave_one_group_out_reports_every_metric(grouped):
    result = evaluate([grouped], encoders=["features"], label_regex=r"^([a-z]+)_", group_regex=r"^[a-z]+_([a-z]+)_")
    assert result["folds"] == 3 and result["split"] == "leave-one-group-out" and result["files"] == 36
    features = result["strategies"]["features"]
    assert [f["group"] for f in features["folds"]] == ["alpha", "beta", "gamma"]
    assert features["top1"] >= 0.75, "clearly different synthetic kinds must be told apart"
    assert set(features["per_class"]) == {"bell", "chirp", "hum", "clicks"}
    assert sum(map(sum, features["confusion"]["matrix"])) == 36


def test_few_shot_curve_and_unknown_rejection(grouped):
    result = evaluate([grouped], encoders=["features"], label_regex=r"^([a-z]+)_", group_regex=r"^[a-z]+_([a-z]+)_",
                      shots=[1, 3], unknown=1, repeats=3)
    features = result["strategies"]["features"]
    assert set(features["few_shot"]) == {"1", "3"}
    assert 0.0 <= features["few_shot"]["1"] <= 1.0
    unknown = features["unknown"]
    assert 0.0 <= unknown["auroc"] <= 1.0 and 0.0 <= unknown["decision_accuracy"] <= 1.0


def test_unknown_rounds_hide_every_class_set_before_repeating_one(grouped):
    result = evaluate([grouped], encoders=["features"], label_regex=r"^([a-z]+)_", group_regex=r"^[a-z]+_([a-z]+)_",
                      unknown=2, repeats=4)
    rounds = result["strategies"]["features"]["unknown"]["rounds"]
    assert len(rounds) == 3 * 4  # repeats per held-out group
    assert [r["group"] for r in rounds] == ["alpha", "beta", "gamma"] * 4
    hidden = [tuple(r["hidden"]) for r in rounds]
    assert len(set(hidden[:6])) == 6, "4 kinds, 2 hidden: all 6 pairs before any comes back"
    assert all(len(set(h)) == 2 and set(h) <= {"bell", "chirp", "hum", "clicks"} for h in hidden)
    assert all(0.0 <= r["auroc"] <= 1.0 for r in rounds)
    again = evaluate([grouped], encoders=["features"], label_regex=r"^([a-z]+)_", group_regex=r"^[a-z]+_([a-z]+)_",
                     unknown=2, repeats=4)
    assert again["strategies"]["features"]["unknown"]["rounds"] == rounds, "seeded: the same rounds every time"
    refused = CliRunner().invoke(app, ["evaluate", str(grouped), "--label-regex", "^([a-z]+)_", "--encoder", "features",
                                       "--unknown", "4"])
    assert refused.exit_code != 0 and "cannot hide 4 of 4 classes" in refused.output


def test_k_folds_without_groups(grouped):
    result = evaluate([grouped], encoders=["features"], label_regex=r"^([a-z]+)_", folds=3)
    assert result["split"] == "3-fold" and len(result["strategies"]["features"]["folds"]) == 3


def test_labels_are_required(grouped):
    with pytest.raises(UsageError):
        evaluate([grouped], encoders=["features"])


def test_auroc_matches_its_definition():
    assert auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5, 0.5], [0.5]) == 0.5


def test_cli_json_and_plot(grouped, tmp_path):
    out = tmp_path / "confusion.png"
    result = CliRunner().invoke(app, ["evaluate", str(grouped), "--label-regex", "^([a-z]+)_", "--group-regex",
                                      "^[a-z]+_([a-z]+)_", "--encoder", "features", "--shots", "1,3", "--json",
                                      "--plot", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["strategies"]["features"]["top1"] >= 0.75
    assert out.stat().st_size > 10_000 and (tmp_path / "confusion-fewshot.png").stat().st_size > 10_000


def test_adapted_strategy_reports_unknown_rejection_from_models_that_never_saw_the_hidden_classes(grouped):
    from simsearch.adapt import AdaptConfig

    result = evaluate([grouped], encoders=[], label_regex=r"^([a-z]+)_", group_regex=r"^[a-z]+_([a-z]+)_",
                      unknown=1, repeats=1, adapt=True, adapt_config=AdaptConfig(epochs=1, batch_size=8))
    adapted = result["strategies"]["cnn+adapt"]
    assert len(adapted["folds"]) == 3 and adapted["top1"] >= 0.75
    # one closed-set model per fold, and one per unknown round without that round's hidden class
    assert len(adapted["train_seconds_per_fold"]) == 3 and len(adapted["unknown"]["train_seconds_per_round"]) == 3
    unknown = adapted["unknown"]
    assert len({r["hidden"][0] for r in unknown["rounds"]}) == 3, "each round hides another class"
    assert 0.0 <= unknown["auroc"] <= 1.0 and 0.0 <= unknown["auroc_per_round"] <= 1.0 and unknown["threshold"] > 0
    assert 0.0 <= unknown["open_set_accuracy"] <= 1.0
