"""The benchmark scripts run end to end at tiny sizes and report what they promise."""

import json
import re

from kvtier.cli import main


def test_decode_bench_quick_reports_all_policies(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = main(["bench", "decode", "--quick", "--contexts", "1024", "--batches", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"hgca_vs_offload_all=([\d.]+) hgca_vs_dense=([\d.]+) hgca_rel_err=([\d.e+-]+)", last)
    assert m, last
    payload = json.loads((tmp_path / "decode-quick-cpu.json").read_text())
    policies = {r["policy"] for r in payload["rows"] if r["status"] == "ok"}
    assert policies == {"dense", "offload_all", "hgca", "hgca_prefilter"}
    # hgca keeps only sinks + window on the device and attends a sparse subset: small but nonzero error
    hgca = next(r for r in payload["rows"] if r["policy"] == "hgca")
    assert 0 < hgca["rel_err"] < 0.2
    assert hgca["device_tokens"] < 1024 and hgca["host_tokens"] > 0
    assert (tmp_path / "decode-quick-cpu.md").read_text().startswith("| policy |")


def test_decode_bench_capacity_matches_the_cells_that_ran(tmp_path, monkeypatch, capsys):
    """With a tight host budget the bench skips the batches that do not fit, and its capacity section
    reports the largest batch that ran next to what the KV accounting admits; int8 values admit more."""
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    admitted = {}
    for values in ("bf16", "int8"):
        rc = main(["bench", "decode", "--quick", "--contexts", "2048", "--batches", "1,2,3,4,5,6", "--steps", "1",
                   "--policies", "dense,offload_all,hgca", "--host-gib", "0.04", "--value-format", values])
        out = capsys.readouterr().out
        assert rc == 0, out
        payload = json.loads((tmp_path / "decode-quick-cpu.json").read_text())
        cap = payload["capacity"]["2048"]
        for name, v in cap.items():
            ran = [r["batch"] for r in payload["rows"] if r["policy"] == name and r["status"] == "ok"]
            skipped = [r["batch"] for r in payload["rows"] if r["policy"] == name and r["status"].startswith("does not fit")]
            assert v["largest_batch_ran"] == max(ran, default=0)
            assert all(b <= v["batch_that_fits"] for b in ran) and all(b > v["batch_that_fits"] for b in skipped)
        assert "capacity at 2048 tokens" in out
        admitted[values] = cap["hgca"]["batch_that_fits"]
    assert 0 < admitted["bf16"] < admitted["int8"]


def test_prefill_bench_quick_keeps_the_device_to_a_window_and_stays_close_to_dense(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = main(["bench", "prefill", "--quick", "--contexts", "1536", "--chunk", "256"])
    out = capsys.readouterr().out
    assert rc == 0, out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"prefill_tier_vs_dense=([\d.]+) speedup_vs_reference=([\d.]+) tier_rel_err=([\d.e+-]+)", last)
    assert m, last
    rows = {r["path"]: r for r in json.loads((tmp_path / "prefill-quick.json").read_text())["rows"]}
    assert rows["dense"]["peak_device_tokens"] == 1536
    for path in ("tier", "tier_reference"):
        # sinks 16 + window 256 + a page + one chunk, at most; the rest went to the host on the way
        assert rows[path]["peak_device_tokens"] <= 16 + 256 + 16 + 256 < 1536
        assert rows[path]["host_tokens"] >= 1536 - 16 - 256 - 16
        assert 0 < rows[path]["rel_err"] < 2e-2  # int8 keys on the host, attended exactly
    assert rows["tier"]["rel_err"] == rows["tier_reference"]["rel_err"]  # two reads of the same bytes
