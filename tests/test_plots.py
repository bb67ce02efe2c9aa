"""Plots are written and show something (not a blank canvas)."""

from __future__ import annotations

import matplotlib.image
import pytest
from typer.testing import CliRunner

from simsearch.cli import app

runner = CliRunner()


def assert_real_picture(path, min_bytes=15_000):
    assert path.exists() and path.stat().st_size > min_bytes
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.05, "the picture is nearly uniform"


@pytest.fixture
def index_dir(tmp_path, library):
    index = tmp_path / "index"
    assert runner.invoke(app, ["index", str(library), "--label-from-folders", "--encoder", "features", "--quiet",
                               "--index", str(index)]).exit_code == 0
    return index


def test_query_plot(index_dir, fresh_clip, tmp_path):
    out = tmp_path / "query.png"
    result = runner.invoke(app, ["query", str(fresh_clip("chirp")), "-k", "4", "--plot", str(out), "--index", str(index_dir)])
    assert result.exit_code == 0, result.output
    assert_real_picture(out)


def test_query_plot_for_several_clips_numbers_the_files(index_dir, fresh_clip, tmp_path):
    out = tmp_path / "q.png"
    runner.invoke(app, ["query", str(fresh_clip("hum")), str(fresh_clip("bell")), "--plot", str(out),
                        "--index", str(index_dir)])
    assert_real_picture(tmp_path / "q-1.png")
    assert_real_picture(tmp_path / "q-2.png")


def test_show_plot(fresh_clip, tmp_path):
    out = tmp_path / "show.png"
    result = runner.invoke(app, ["show", str(fresh_clip("bell")), "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert_real_picture(out)


def test_show_unreadable_clip_exits_1(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_text("nope")
    result = runner.invoke(app, ["show", str(bad), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "bad.wav" in result.stderr
