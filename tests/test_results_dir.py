"""Where benchmarks and `kvtier eval` write: outside the checkout unless asked."""

import argparse
import pathlib
import subprocess

import pytest

from kvtier.bench import results
from kvtier.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTIER_RESULTS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_default_is_a_cache_directory_outside_the_checkout(home):
    out = results.results_dir()
    assert out == home / ".cache" / "kvtier" / "results" and out.is_dir()
    assert ROOT not in out.parents


def test_argument_wins_over_the_environment_which_wins_over_the_default(home, tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path / "env"))
    assert results.results_dir() == tmp_path / "env"
    assert results.results_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    path = results.write("x", {"a": 1}, "| a |\n", out_dir=tmp_path / "arg")
    assert path == tmp_path / "arg" / "x.json" and (tmp_path / "arg" / "x.md").read_text() == "| a |\n"
    assert not (tmp_path / "env" / "x.json").exists()


@pytest.mark.parametrize("module, flags", [
    ("kvtier.bench.decode", ("--results-dir",)),
    ("kvtier.bench.prefill", ("--results-dir",)),
    ("kvtier.bench.engine", ("--results-dir", "--out-dir")),
    ("kvtier.cli.eval", ("--results-dir",)),
])
def test_every_writing_command_takes_a_results_dir(module, flags):
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    assert parser.parse_args([]).results_dir is None
    for flag in flags:
        assert parser.parse_args([flag, "benchmarks/results"]).results_dir == "benchmarks/results"


def _status():
    proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip("not a git checkout")
    return proc.stdout


def test_a_readme_bench_command_leaves_the_checkout_as_it_was(home, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    before = _status()
    assert main(["bench", "prefill", "--quick", "--contexts", "1024"]) == 0
    assert _status() == before
    written = home / ".cache" / "kvtier" / "results" / "prefill-quick.json"
    assert written.is_file() and f"wrote {written}" in capsys.readouterr().out
