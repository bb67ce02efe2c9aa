"""`train`: adapt the CNN to an index's labels, switch atomically, reproducibly; survive SIGKILL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from simsearch import CorruptIndexError, Engine, cnn
from simsearch.adapt import (ADAPTED_UNKNOWN_THRESHOLD, LEGACY_ADAPTED_UNKNOWN_THRESHOLD, AdaptConfig,
                             adapted_recipe_path)


@pytest.fixture
def cnn_index(tmp_path, library):
    with Engine(tmp_path / "index", encoder="cnn") as engine:
        engine.index([library], label_from_folders=True)
    return tmp_path / "index"


def test_train_switches_the_index_to_the_adapted_encoder(cnn_index, library, fresh_clip):
    with Engine(cnn_index) as engine:
        summary = engine.train(config=AdaptConfig(epochs=1, seed=0))
        assert summary["encoder"].startswith("cnn+adapt-v") and summary["trained_on"] == 16
        info = engine.info()
        assert info["encoder"] == summary["encoder"] and info["files"] == 16 and info["segments"] == 16
        assert engine.labels() == {"bell": 4, "chirp": 4, "clicks": 4, "hum": 4}
    with Engine(cnn_index) as engine:  # a new session loads the adapted model from the index
        result = engine.query([fresh_clip("chirp")], k=3, unknown_threshold=0.0)[0]
        assert result.category.label == "chirp"
        engine.index([fresh_clip("hum", seed=7)])  # new clips are embedded with the adapted model
        assert engine.info()["encoder"] == summary["encoder"]


def test_same_seed_same_model(cnn_index, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cnn_index, copy)
    versions = []
    for index in (cnn_index, copy):
        with Engine(index) as engine:
            versions.append(engine.train(config=AdaptConfig(epochs=1, seed=3))["encoder"])
    assert versions[0] == versions[1]


def test_an_adapted_model_keeps_the_unknown_threshold_of_the_recipe_that_made_it(cnn_index):
    with Engine(cnn_index) as engine:
        version = engine.train(config=AdaptConfig(epochs=1, seed=0, margin=0.3))["encoder"].split("-v")[1]
    recipe = json.loads(adapted_recipe_path(cnn_index, version).read_text())
    assert recipe["config"]["margin"] == 0.3 and recipe["config"]["epochs"] == 1
    assert recipe["unknown_threshold"] == ADAPTED_UNKNOWN_THRESHOLD and recipe["base"] == f"cnn-v{cnn.MODEL_VERSION}"
    with Engine(cnn_index) as engine:
        assert engine.encoder.unknown_threshold == ADAPTED_UNKNOWN_THRESHOLD
    adapted_recipe_path(cnn_index, version).unlink()  # as a model adapted before recipes were recorded
    with Engine(cnn_index) as engine:
        assert engine.encoder.unknown_threshold == LEGACY_ADAPTED_UNKNOWN_THRESHOLD
        assert engine.query([next(iter(engine.catalog().paths.values()))], k=1)[0].neighbours
    adapted_recipe_path(cnn_index, version).write_text("{not json")
    with Engine(cnn_index) as engine, pytest.raises(CorruptIndexError, match="unreadable recipe"):
        engine.query([next(iter(engine.catalog().paths.values()))], k=1)


def _state(index):
    with Engine(index) as engine:
        info = engine.info()
        ids = set(np.asarray(engine.store.catalog().segment_ids).tolist())
        index_ids = engine.store.vector_index()
        faiss_ids = {int(index_ids.id_map.at(i)) for i in range(index_ids.ntotal)}
        return info, ids == faiss_ids


def test_sigkill_during_train_leaves_the_previous_model_working(cnn_index, library, tmp_path):
    before, _ = _state(cnn_index)
    command = [sys.executable, "-m", "simsearch.cli", "train", "--epochs", "3", "--quiet", "--index", str(cnn_index)]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=tmp_path, timeout=300)  # once to completion, to time it
    duration = time.perf_counter() - started
    completed, _ = _state(cnn_index)
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(0.2, duration, size=3)):
        process = subprocess.Popen(command, cwd=tmp_path)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        info, consistent = _state(cnn_index)
        assert consistent, "every FAISS id has its SQLite row and vice versa"
        assert info["files"] == before["files"] and info["labels"] == before["labels"]
        assert info["encoder"] == completed["encoder"], "the same seed always gives the same model"
        with Engine(cnn_index) as engine:
            assert engine.query([library / "bell" / "bell_0.wav"], k=3)[0].neighbours
    with Engine(cnn_index) as engine, engine.store.locked():
        pass  # a lock file left by the killed process is harmless: its flock died with it


def test_train_from_the_command_line_with_a_choice_of_augmentation(cnn_index):
    from typer.testing import CliRunner

    from simsearch.cli import app

    runner = CliRunner()
    wrong = runner.invoke(app, ["train", "--index", str(cnn_index), "--augment", "heavy"])
    assert wrong.exit_code == 2 and "heavy" in wrong.output
    with Engine(cnn_index) as engine:
        assert engine.info()["encoder"] == f"cnn-v{cnn.MODEL_VERSION}"  # a refused command changed nothing
    done = runner.invoke(app, ["train", "--index", str(cnn_index), "--epochs", "1", "--augment", "full", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    assert summary["epochs"] == 1 and summary["augmentation"] == "full" and summary["encoder"].startswith("cnn+adapt-v")
