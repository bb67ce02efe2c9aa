"""The command line: every command through typer's CliRunner, JSON contracts, exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from conftest import write_wav
from simsearch import synth

runner = CliRunner()


@pytest.fixture
def index_dir(tmp_path, library):
    index = tmp_path / "index"
    result = runner.invoke(app, ["index", str(library), "--label-from-folders", "--encoder", "features",
                                 "--index", str(index), "--quiet"])
    assert result.exit_code == 0, result.output
    return index


def run(*args, index=None):
    return runner.invoke(app, [*map(str, args)] + (["--index", str(index)] if index else []))


def test_query_json_is_one_object_per_clip(index_dir, fresh_clip):
    a, b = fresh_clip("chirp"), fresh_clip("hum")
    result = run("query", a, b, "-k", 3, "--json", "--unknown-threshold", 0, index=index_dir)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [str(a), str(b)]
    assert [line["category"]["label"] for line in lines] == ["chirp", "hum"]
    assert all(len(line["neighbours"]) == 3 for line in lines)


def test_query_a_folder_and_exclude(index_dir, fresh_clip):
    clip = fresh_clip("bell")
    result = run("query", clip.parent, "--json", "-k", 2, "--exclude", "*/bell/*", index=index_dir)
    [line] = [json.loads(x) for x in result.stdout.splitlines()]
    assert all("/bell/" not in n["path"] for n in line["neighbours"])


def test_query_human_output(index_dir, fresh_clip):
    result = run("query", fresh_clip("clicks"), "-k", 2, index=index_dir)
    assert result.exit_code == 0 and "category:" in result.stdout and "1." in result.stdout


def test_label_labels_unlabel(index_dir, tmp_path):
    clips = [write_wav(tmp_path / "new" / f"siren{i}.wav", synth.make("siren", i)) for i in range(3)]
    result = run("label", "siren", *clips, "--quiet", index=index_dir)
    assert result.exit_code == 0, result.output
    counts = json.loads(run("labels", "--json", index=index_dir).stdout)
    assert counts == {"bell": 4, "chirp": 4, "clicks": 4, "hum": 4, "siren": 3}
    assert "siren" in run("labels", index=index_dir).stdout
    assert run("unlabel", clips[0], index=index_dir).exit_code == 0
    assert json.loads(run("labels", "--json", index=index_dir).stdout)["siren"] == 2


def test_info_json_contract(index_dir):
    info = json.loads(run("info", "--json", index=index_dir).stdout)
    assert set(info) == {"files", "segments", "labels", "encoder", "index_type", "bytes"}
    assert info["files"] == 16 and info["encoder"] == "features-v1" and info["bytes"] > 0
    assert "IDMap" in info["index_type"]


def test_remove_then_info(index_dir, library):
    result = run("remove", library / "hum", index=index_dir)
    assert result.exit_code == 0 and "4 files removed" in result.stdout
    assert json.loads(run("info", "--json", index=index_dir).stdout)["files"] == 12


def test_unreadable_inputs_exit_1_and_are_named(index_dir, library):
    (library / "junk.wav").write_text("hello")
    result = run("index", library, "--quiet", index=index_dir)
    assert result.exit_code == 1
    assert "junk.wav" in result.stderr and "not a readable audio file" in result.stderr
    assert json.loads(run("info", "--json", index=index_dir).stdout)["files"] == 16
    assert "junk.wav" in run("failures", index=index_dir).stdout


def test_index_json_report(tmp_path, library):
    result = run("index", library, "--json", "--encoder", "features", index=tmp_path / "i")
    assert json.loads(result.stdout)["added"] == 16


def test_usage_errors_exit_2(index_dir, library):
    assert run("index", library, "--label-regex", "no-group", index=index_dir).exit_code == 2
    assert run("index", library, "--label-from-folders", "--label-regex", "(x)", index=index_dir).exit_code == 2
    assert run("query", "-k", 0, library, index=index_dir).exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_encoder_mismatch_is_refused_with_advice(index_dir, library):
    result = run("index", library, "--encoder", "counting", index=index_dir)
    assert result.exit_code == 2
    assert "reembed" in result.stderr


def test_index_location_from_environment(tmp_path, library, monkeypatch):
    monkeypatch.setenv("SIMSEARCH_INDEX", str(tmp_path / "from-env"))
    assert run("index", library / "bell", "--encoder", "features", "--quiet").exit_code == 0
    assert (tmp_path / "from-env" / "simsearch.db").exists()


def test_reembed_switches_encoder_keeping_labels(index_dir):
    result = run("reembed", "--encoder", "counting", "--quiet", index=index_dir)
    assert result.exit_code == 0, result.output
    info = json.loads(run("info", "--json", index=index_dir).stdout)
    assert info["encoder"] == "counting-v1" and info["labels"]["bell"] == 4


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from simsearch.cli import app; import typer.main as m; m.get_command(app); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_the_console_entry_point_keeps_exit_code_output_and_index(tmp_path, library):
    """``main`` skips the interpreter's final garbage collection (``gc.freeze``); the exit
    code, the output and everything the command wrote must be as with a plain exit."""
    import subprocess
    import sys

    (library / "junk.wav").write_text("hello")
    command = [sys.executable, "-m", "simsearch.cli", "index", str(library), "--encoder", "features", "--json",
               "--index", str(tmp_path / "index")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and json.loads(result.stdout)["added"] == 16 and "junk.wav" in result.stderr
    assert json.loads(run("info", "--json", index=tmp_path / "index").stdout)["files"] == 16
