"""`kvtier bench serve` against the installed sglang: the client flags it passes, the result keys it reads and
the log lines it parses are sglang's own. Runs where sglang is installed; skipped elsewhere."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier.bench.serve import client, server  # noqa: E402


def _source(*modules):
    """The text of the first of modules that this sglang has (found without importing it)."""
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin:
            text = pathlib.Path(spec.origin).read_text()
            if "import *" not in text:  # 0.5.2x keeps a re-exporting stub at the old path
                return text
    pytest.fail(f"none of {modules} in this sglang")


def _client_source():
    return _source("sglang.benchmark.serving", "sglang.bench_serving")


def test_every_flag_the_matrix_passes_is_declared_by_sglangs_client():
    declared = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", _client_source()))
    assert declared, "no add_argument calls found: the client's source moved"
    assert set(client.FLAGS) - declared == set()
    assert {"random-ids"} <= set(re.findall(r"\"(random-ids)\"", _client_source()))


def test_the_result_keys_read_are_the_keys_sglangs_client_writes():
    source = _client_source()
    written = set(re.findall(r"\"([a-z0-9_]+)\":", source))
    assert set(client.REQUIRED) <= written
    assert set(client.OPTIONAL) - written == set()
    assert "errors" in written  # --output-details: one error string per request


def test_sglangs_client_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", client.MODULE, "--help"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"sglang's client does not import in this venv: {last}")
    assert client.missing_flags(out.stdout) == []


def test_the_decode_line_parsed_is_sglangs_own():
    reporter = _source("sglang.srt.managers.scheduler_components.metrics_reporter",
                       "sglang.srt.managers.scheduler_metrics_mixin")
    assert "#running-req: {" in reporter and "#queue-req: {" in reporter
    line = ("[2026-01-01 10:00:09] Decode batch, #running-req: 12, #token: 98304, token usage: 0.40, "
            "cuda graph: True, gen throughput (token/s): 95.10, #queue-req: 4, ")
    stats = server.parse_log(line)
    assert stats.admitted_max == 12 and stats.queued_max == 4 and stats.token_usage_max == 0.40
    try:
        from sglang.srt.debug_utils.log_parser import _PATTERN_DECODE
    except ImportError:
        return  # older releases have no parser of their own to agree with
    m = re.search(_PATTERN_DECODE, line)
    assert m and int(m.group("num_running_req")) == stats.admitted_max and int(m.group("queue_req")) == 4


def test_a_tiny_matrix_runs_against_sglang_on_this_cpu(tmp_path):
    if importlib.util.find_spec("sgl_kernel") is None:
        pytest.skip("sglang's CPU engine needs sgl_kernel's CPU ops, which no PyPI wheel ships: a server cannot "
                    "start on this machine")
    from kvtier.bench.serve import models
    from kvtier.cli import main

    tok = tmp_path / "tok"
    tok.mkdir()
    try:
        models.tokenizer_from_eval(tok)
    except models.ModelDirError as exc:
        pytest.skip(f"no Qwen2.5 tokenizer offline here: {exc}")

    rc = main(["bench", "serve", "--model", "qwen2.5-coder-0.5b", "--tokenizer", str(tok), "--servers", "dense,hgca",
               "--input-lens", "2048", "--output-len", "8", "--concurrency", "1,2", "--mem-fraction", "0.5",
               "--attention-backend", "torch_native", "--host-gib", "1", "--work-dir", str(tmp_path / "work"),
               "--results-dir", str(tmp_path), "--port", "30941", "--", "--device", "cpu"])
    assert rc == 0
    import json

    data = json.loads((tmp_path / "serve-matrix.json").read_text())
    assert {r["server"] for r in data["rows"] if r["status"] == "ok"} == {"dense", "hgca"}
