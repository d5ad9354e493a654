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
