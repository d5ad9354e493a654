"""`kvtier bench compare`: one run, one table, every policy on the same data, and its last line."""

import json
import math
import re
from pathlib import Path

import pytest

from kvtier.bench import compare
from kvtier.cli import main

EVAL = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "eval-qwen2.5-coder-0.5b-4k-hcattention-cpu.json"
LAST = re.compile(r"best_tokens_per_s_vs_dense=(nan|[\d.]+) at_accuracy_gap_points=(nan|-?[\d.]+) policies=(\d+)")


def test_compare_quick_table_columns_and_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = main(["bench", "compare", "--quick", "--contexts", "1024", "--steps", "1", "--max-batch", "2",
               "--policies", "dense,hgca,offload_all,hcattention_exact",
               "--eval", str(EVAL), "--accuracy-label", "hgca=hgca@10%",
               "--accuracy-label", "hcattention_exact=hc-vq16x256-exact"])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = LAST.fullmatch(out.strip().splitlines()[-1])
    assert m, out.strip().splitlines()[-1]
    payload = json.loads((tmp_path / "compare-quick-cpu.json").read_text())
    table = (tmp_path / "compare-quick-cpu.md").read_text()
    assert table.splitlines()[0] == "| " + " | ".join(compare.COLUMNS) + " |"
    rows = {(r["policy"], r["batch"]): r for r in payload["rows"]}
    # batch 1 and the largest the memory admits, capped by --max-batch
    assert {b for p, b in rows if p == "hgca"} == {1, 2}
    for r in payload["rows"]:
        assert r["status"] == "ok", r
        assert r["ms_per_step_median"] <= r["ms_per_step_max"]
        assert 0 <= r["top32_recall"] <= 1 and 0 < r["mass_captured"] <= 1 + 1e-9
    d, h, o, hc = (rows[(p, 1)] for p in ("dense", "hgca", "offload_all", "hcattention_exact"))
    # dense attends everything; the sparse hybrid less, and what it reads follows its selection
    assert d["top32_recall"] == 1 and d["mass_captured"] == pytest.approx(1.0) and d["host_read_mib_per_step"] == 0
    assert h["mass_captured"] < 1 and h["host_read_mib_per_step"] > 0
    # offload_all reads and copies every host token: the most host bytes, all of them over the copy; hgca's
    # kv-head reads a row once for its query heads, hcattention's query heads (query_head sets) each their own
    assert o["host_read_mib_per_step"] > max(h["host_read_mib_per_step"], hc["host_read_mib_per_step"])
    assert min(h["host_read_mib_per_step"], hc["host_read_mib_per_step"]) > 0
    assert o["pcie_mib_per_step"] > 0 and h["pcie_mib_per_step"] == 0
    # offload_all's bf16 keys and values: 2 x 128 x 2 bytes per token, kv-head and layer (8 kv-heads, 2 layers);
    # the probe step's host tokens are those after the timed steps' evictions
    per_token = 2 * 128 * 2 * 8 * 2 / 2**20
    assert o["host_tokens"] * per_token * 0.9 <= o["host_read_mib_per_step"] <= o["host_tokens"] * per_token * 1.1
    # the eval's accuracies by label: dense's own, hgca's from the label given, none for offload_all
    assert d["accuracy"] == pytest.approx(93.75, abs=0.1) and h["eval_label"] == "hgca@10%"
    assert "accuracy" not in o
    s = payload["summary"]
    assert s["policies"] == 4 and s["dense_baseline"] == "dense"
    best = max((r for r in payload["rows"] if r["policy"] in ("hgca", "hcattention_exact")),
               key=lambda r: r["tokens_per_s"])
    dense_best = max(r["tokens_per_s"] for r in payload["rows"] if r["policy"] == "dense")
    assert float(m.group(1)) == pytest.approx(best["tokens_per_s"] / dense_best, abs=6e-4)  # printed to 3 places
    assert m.group(3) == "4"
    assert (tmp_path / "compare-quick-cpu.png").exists()


def test_summary_picks_the_fastest_within_the_gap_and_prefers_graph_dense():
    rows = [
        {"policy": "dense", "context": 8, "batch": 1, "tokens_per_s": 10.0, "status": "ok", "accuracy_gap": 0},
        {"policy": "dense_graph", "context": 8, "batch": 1, "tokens_per_s": 20.0, "status": "ok"},
        {"policy": "dense_graph", "context": 8, "batch": 4, "tokens_per_s": 50.0, "status": "ok"},
        {"policy": "a", "context": 8, "batch": 8, "tokens_per_s": 100.0, "status": "ok", "accuracy_gap": 0.5},
        {"policy": "b", "context": 8, "batch": 8, "tokens_per_s": 400.0, "status": "ok", "accuracy_gap": 3.0},
        {"policy": "c", "context": 8, "batch": 8, "tokens_per_s": 900.0, "status": "ok"},  # not evaluated
        {"policy": "a", "context": 4, "batch": 8, "tokens_per_s": 999.0, "status": "ok", "accuracy_gap": 0.0},
    ]
    s = compare._summary(rows, 1.0)
    assert s["dense_baseline"] == "dense_graph" and s["dense_tokens_per_s"] == 50.0
    assert s["best_policy"] == "a" and s["best_tokens_per_s_vs_dense"] == pytest.approx(2.0)
    assert compare.last_line(s) == "best_tokens_per_s_vs_dense=2.000 at_accuracy_gap_points=0.500 policies=5"
    none = compare._summary([r for r in rows if r["policy"] != "a"], 1.0)
    assert compare.last_line(none) == "best_tokens_per_s_vs_dense=nan at_accuracy_gap_points=nan policies=4"


def test_eval_files_and_labels_are_checked(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    assert main(["bench", "compare", "--quick", "--eval", str(bad)]) == 2
    assert "is not a `kvtier eval` result" in capsys.readouterr().err
    assert main(["bench", "compare", "--quick", "--accuracy-label", "hgca"]) == 2
    assert "expected NAME=LABEL" in capsys.readouterr().err
    assert main(["bench", "compare", "--quick", "--accuracy-label", "nope=x"]) == 2
    assert "is not a policy of the bench" in capsys.readouterr().err
    acc = compare._eval_accuracy([str(EVAL)])
    assert acc["dense"][0] == pytest.approx(93.75, abs=0.1) and acc["hc-int4"][0] < acc["dense"][0]
    assert not math.isnan(acc["window_only"][0])


def test_eval_accuracy_reads_the_current_eval_cells():
    """`kvtier eval` now writes its rows as 'cells' (accuracy in points) and a dict summary: both are read."""
    f = EVAL.with_name("eval-qwen2.5-coder-0.5b-8k-channel-keys.json")
    data = json.loads(f.read_text())
    assert isinstance(data["summary"], dict) and isinstance(data["cells"], list)
    acc = compare._eval_accuracy([str(f)])
    cells = {c["policy"]: c["accuracy"] for c in data["cells"]}
    assert set(acc) == set(cells)
    for label, points in cells.items():
        assert acc[label][0] == pytest.approx(points) and acc[label][2] == [8192]


def test_rejoin_merges_runs_of_one_machine_and_joins_accuracy_measured_elsewhere(tmp_path, capsys):
    """Batch 1 and a larger batch run apart, then joined with an eval file: the rows of both, the
    accuracies by label, the summary over the merged rows; runs of other setups refuse to merge."""
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["bench", "compare", "--quick", "--contexts", "1024", "--steps", "1", "--policies", "dense,hgca"]
    assert main(base + ["--batches", "1", "--results-dir", str(a)]) == 0
    assert main(base + ["--batches", "2", "--results-dir", str(b)]) == 0
    capsys.readouterr()
    ev = EVAL.with_name("eval-qwen2.5-coder-0.5b-8k-channel-keys.json")
    rc = main(["bench", "compare", "--rejoin", str(a / "compare-quick-cpu.json"), "--rejoin",
               str(b / "compare-quick-cpu.json"), "--eval", str(ev), "--accuracy-label", "hgca=hgca@10%",
               "--results-dir", str(tmp_path), "--name", "merged"])
    out = capsys.readouterr().out
    assert rc == 0, out
    m = LAST.fullmatch(out.strip().splitlines()[-1])
    payload = json.loads((tmp_path / "merged.json").read_text())
    rows = {(r["policy"], r["batch"]): r for r in payload["rows"]}
    assert set(rows) == {("dense", 1), ("dense", 2), ("hgca", 1), ("hgca", 2)}
    assert [Path(m["file"]).parent.name for m in payload["merged_from"]] == ["a", "b"]
    acc = {c["policy"]: c["accuracy"] for c in json.loads(ev.read_text())["cells"]}
    assert rows[("hgca", 2)]["accuracy"] == pytest.approx(acc["hgca@10%"])
    assert rows[("hgca", 2)]["accuracy_gap"] == pytest.approx(acc["dense"] - acc["hgca@10%"])
    # dense's best over both runs is the baseline of every row
    best = max(rows[("dense", 1)]["tokens_per_s"], rows[("dense", 2)]["tokens_per_s"])
    assert rows[("hgca", 1)]["vs_dense"] == pytest.approx(rows[("hgca", 1)]["tokens_per_s"] / best)
    fastest = max(rows[("hgca", 1)]["tokens_per_s"], rows[("hgca", 2)]["tokens_per_s"])
    assert m and float(m.group(1)) == pytest.approx(fastest / best, rel=1e-3)
    # another setup (here: another budget) does not merge; a file that is not a compare result is refused
    c = tmp_path / "c"
    assert main(base + ["--batches", "1", "--budget-tokens", "128", "--results-dir", str(c)]) == 0
    capsys.readouterr()
    assert main(["bench", "compare", "--rejoin", str(a / "compare-quick-cpu.json"), "--rejoin",
                 str(c / "compare-quick-cpu.json"), "--results-dir", str(tmp_path)]) == 2
    assert "differs from" in capsys.readouterr().err
    assert main(["bench", "compare", "--rejoin", str(ev), "--results-dir", str(tmp_path)]) == 2
    assert "is not a `kvtier bench compare` result" in capsys.readouterr().err


def test_a_stopped_run_keeps_the_cells_it_ran_and_rejoins(tmp_path, monkeypatch, capsys):
    """After every cell the rows so far are in <name>.partial.json; a run stopped midway (here an
    interrupt in its second cell) leaves them there for --rejoin, and a finished run removes it."""
    from kvtier.bench import decode

    base = ["bench", "compare", "--quick", "--contexts", "1024", "--steps", "1", "--batches", "1",
            "--policies", "dense,hgca,offload_all", "--results-dir", str(tmp_path)]
    real, calls = decode._run_cell, []

    def stop_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(decode, "_run_cell", stop_second)
    with pytest.raises(KeyboardInterrupt):
        main(base)
    part = tmp_path / "compare-quick-cpu.partial.json"
    data = json.loads(part.read_text())
    assert data["partial"] is True and data["cells_done"] == 1 and data["cells_total"] == 3
    assert [r["policy"] for r in data["rows"]] == ["dense"] and data["rows"][0]["status"] == "ok"
    assert not (tmp_path / "compare-quick-cpu.json").exists()
    capsys.readouterr()
    assert main(["bench", "compare", "--rejoin", str(part), "--results-dir", str(tmp_path), "--name", "kept"]) == 0
    assert [r["policy"] for r in json.loads((tmp_path / "kept.json").read_text())["rows"]] == ["dense"]
    monkeypatch.setattr(decode, "_run_cell", real)
    assert main(base) == 0
    assert not part.exists() and (tmp_path / "compare-quick-cpu.json").exists()
