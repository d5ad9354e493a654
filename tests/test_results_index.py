"""benchmarks/results/README.md is the generated index of the folder, and current."""

import json

import pytest

from kvtier.bench import index, results


@pytest.fixture
def folder(root):
    return root / "benchmarks" / "results"


def test_index_is_current(folder):
    added = index.git_added(folder)
    if added is None:
        pytest.skip("no full git history (not a checkout, or a shallow one): dates and commits come from it")
    assert (folder / index.INDEX).read_text() == index.generate(folder, added), \
        "benchmarks/results/README.md is stale: run python -m kvtier.bench.index"


def test_every_result_set_is_listed_with_its_provenance(folder):
    text = (folder / index.INDEX).read_text()
    sets = index.result_sets(folder)
    for name, suffixes in sets.items():
        assert "json" in suffixes, f"{name}: a result set needs its JSON (prose belongs in docs/)"
        assert f"[{name}](" in text, f"{name} is missing from the results index"
    listed = [line.split("](", 1)[0][3:] for line in text.splitlines() if line.startswith("| [")]
    assert sorted(listed) == sorted(sets), "the index lists sets that are not in the folder"
    for row in index.build_rows(folder, index.git_added(folder) or {}):
        assert row.machine != "not recorded" and row.command != "not recorded", \
            f"{row.name}: record its machine and command in the JSON or in sources.json"
        assert row.headline, f"{row.name}: give it a headline in sources.json"


def test_sources_name_only_sets_in_the_folder(folder):
    sources = json.loads((folder / index.SOURCES).read_text())
    assert set(sources) <= set(index.result_sets(folder)), "sources.json names sets that are gone"
    for name, entry in sources.items():
        assert set(entry) <= {"command", "machine", "headline", "date", "commit"}, name


def test_a_written_result_carries_its_provenance_into_the_index(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["/somewhere/bin/kvtier", "bench", "decode", "--quick"])
    results.write("decode-x", {"bench": "decode", "machine": {"gpu": "NVIDIA H200", "cpu_cores": 16}}, "| t |\n")
    payload = json.loads((tmp_path / "decode-x.json").read_text())
    assert payload["command"] == "kvtier bench decode --quick"
    assert payload["date"][:4].isdigit() and payload["commit"] in (None, results.started_commit())
    (row,) = index.build_rows(tmp_path, {})
    assert (row.date, row.command, row.machine) == (payload["date"][:10], "kvtier bench decode --quick",
                                                    "H200, 16 cores")
    assert f"[decode-x](decode-x.md) (json) | {payload['date'][:10]} | H200, 16 cores" in index.render([row])


def test_a_result_names_the_commit_its_run_started_from(monkeypatch):
    """A run writes at its end: the commit recorded is the one taken when it started (the checkout may
    have moved on meanwhile), and a start from uncommitted code says so."""
    monkeypatch.setattr(results, "_STARTED", {})
    calls = iter(["abc123", "def456+dirty"])
    monkeypatch.setattr(results, "source_commit", lambda: next(calls))
    assert results.provenance()["commit"] == "abc123"
    assert results.provenance()["commit"] == "abc123"  # not re-read at the end of a run
    monkeypatch.setattr(results, "_STARTED", {})
    assert results.started_commit() == "def456+dirty"
    real = results._git("rev-parse", "HEAD")
    if real:  # in a checkout: the commit, marked when kvtier/ or native/ differ from it
        monkeypatch.undo()
        assert results.source_commit().split("+")[0] == real


def test_command_line_drops_the_machines_directories():
    assert results.command_line(["/x/lib/kvtier/__main__.py", "eval", "--quick"]) == "python -m kvtier eval --quick"
    assert results.command_line(["benchmarks/select_modes.py", "--name", "a b"]) == \
        "python benchmarks/select_modes.py --name 'a b'"
