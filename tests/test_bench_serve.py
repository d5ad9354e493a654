"""`kvtier bench serve`'s own logic: the memory arithmetic, the commands, the client's results, the server's log,
the sweep's stop rule, the model directory and the report. The servers themselves need a GPU machine."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvtier.bench.serve import client, matrix, memory, models, report, server
from kvtier.cli import main

ROOT = Path(__file__).resolve().parents[1]


# --- memory -----------------------------------------------------------------------------------

def test_mem_fraction_gives_a_larger_card_the_reference_cards_pool():
    assert memory.mem_fraction(79.6) == 0.85  # the reference card itself
    f = memory.mem_fraction(139.8)  # an H200 standing in for an 80 GB H100
    assert f == 0.483
    static_ref = 0.85 * 79.6
    # never more static memory (so never a larger pool) than the reference, and within one rounding step
    assert static_ref - 139.8 * 0.001 <= f * 139.8 <= static_ref
    assert memory.mem_fraction(100.0, reference_gib=50.0, reference_fraction=0.9) == 0.45


@pytest.mark.parametrize("kwargs, match", [({"device_gib": 40.0}, "less than the 79.6 GiB card"),
                                           ({"device_gib": 80.0, "reference_fraction": 1.2}, "in \\(0, 1\\)"),
                                           ({"device_gib": 0.0}, "GiB > 0")])
def test_mem_fraction_refuses_what_it_cannot_honour(kwargs, match):
    with pytest.raises(memory.MemoryArgError, match=match):
        memory.mem_fraction(**kwargs)


def test_expected_pool_is_the_static_share_less_the_weights():
    spec = models.MODELS["qwen2.5-7b"]
    kv = memory.expected_kv_gib(weight_bytes=spec.weight_bytes)
    assert kv == pytest.approx(0.85 * 79.6 - spec.weight_bytes / 2**30)
    # about seven 128K requests of Qwen2.5-7B's 56 KiB per token fit an 80 GB card's pool
    assert int(kv * 2**30 / spec.kv_bytes_per_token) // 131072 == 7


def test_session_rss_counts_a_server_sessions_processes(tmp_path):
    code = "import sys, time; b = bytearray(96 << 20); b[::4096] = b'x' * len(b[::4096]); print('up', flush=True); " \
           "time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        rss = memory.session_rss_bytes(proc.pid)
        assert 96 << 20 <= rss < 1 << 30
        assert memory.session_rss_bytes(proc.pid + 10_000_000) == 0  # no such session
        sampler = memory.MemorySampler(proc.pid, gpu_index=None, interval_s=0.05).start()
        peaks = sampler.stop()
        assert peaks.device_gib is None and peaks.host_gib * 2**30 >= 96 << 20 and peaks.samples >= 2
    finally:
        proc.kill()
        proc.wait()


def test_gpu_memory_is_none_without_nvidia_smi(tmp_path):
    assert memory.gpu_memory(0, smi=str(tmp_path / "no-nvidia-smi")) is None


# --- commands ---------------------------------------------------------------------------------

def test_launch_commands_dense_is_stock_sglang_and_kvtier_names_its_policy():
    dense = server.launch_command(python="py", model_dir="M", port=31000, mem_fraction=0.483, policy=None,
                                  extra=["--tp", "1"])
    tier = server.launch_command(python="py", model_dir="M", port=31000, mem_fraction=0.483, policy="p.yaml")
    assert dense[:3] == ["py", "-m", "sglang.launch_server"] and "--kv-tier" not in dense
    assert dense[-2:] == ["--tp", "1"]
    for cmd in (dense, tier):
        assert cmd[cmd.index("--load-format") + 1] == "dummy"
        assert cmd[cmd.index("--mem-fraction-static") + 1] == "0.483"
        assert cmd[cmd.index("--attention-backend") + 1] == "flashinfer"
    assert tier[tier.index("--kv-tier") + 1] == "p.yaml"


def test_client_command_sends_fixed_lengths_and_passes_only_checked_flags():
    level = client.Level(8, math.inf, 16)
    cmd = client.client_command(python="py", host="127.0.0.1", port=31000, model_dir="M", input_len=32768,
                                output_len=256, level=level, output_file="out.jsonl", seed=3)
    assert cmd[:3] == ["py", "-m", "sglang.bench_serving"]
    args = dict(zip(cmd[3::], cmd[4::]))
    assert args["--dataset-name"] == "random-ids" and "--tokenize-prompt" in cmd
    assert args["--random-input-len"] == "32768" and args["--random-output-len"] == "256"
    assert args["--random-range-ratio"] == "1.0"  # every request exactly these lengths
    assert args["--max-concurrency"] == "8" and args["--request-rate"] == "inf" and args["--num-prompts"] == "16"
    # every flag passed is one the installed client is checked for
    assert {c for c in cmd if c.startswith("--")} == set(client.FLAGS)
    unbounded = client.client_command(python="py", host="h", port=1, model_dir="M", input_len=1, output_len=1,
                                      level=client.Level(None, 2.5, 4), output_file="o", seed=0)
    assert "--max-concurrency" not in unbounded and unbounded[unbounded.index("--request-rate") + 1] == "2.5"
    assert client.missing_flags("usage: ... --backend --host") == [f for f in client.FLAGS
                                                                  if f not in ("--backend", "--host")]


def test_levels_sort_and_size_each_sweep_point():
    assert matrix.levels([4, 1, 2, 2], rate=math.inf, per_level=2, min_prompts=4) == [
        client.Level(1, math.inf, 4), client.Level(2, math.inf, 4), client.Level(4, math.inf, 8)]


# --- the client's results ---------------------------------------------------------------------

def _record(**over):
    rec = {"backend": "sglang", "dataset_name": "random-ids", "request_rate": math.inf, "max_concurrency": 4,
           "duration": 12.5, "completed": 8, "total_output_tokens": 2048, "request_throughput": 0.64,
           "output_throughput": 163.84, "median_ttft_ms": 2100.0, "p99_ttft_ms": 4200.0, "median_tpot_ms": 22.5,
           "p99_tpot_ms": 30.1, "median_itl_ms": 22.0, "p99_itl_ms": 40.0, "concurrency": 3.7,
           "max_concurrent_requests": 4, "errors": ["", ""]}
    rec.update(over)
    return rec


def test_read_result_takes_the_last_run_appended(tmp_path):
    path = tmp_path / "out.jsonl"
    # The client appends; json.dumps writes an unbounded rate as Infinity.
    path.write_text(json.dumps(_record(output_throughput=1.0)) + "\n" + json.dumps(_record()) + "\n\n")
    assert "Infinity" in path.read_text()
    res = client.read_result(path, prompts=8)
    assert res.output_tokens_per_s == 163.84 and res.completed == 8 and res.failed == 0
    assert (res.ttft_p50_ms, res.ttft_p99_ms, res.tpot_p50_ms, res.tpot_p99_ms) == (2100.0, 4200.0, 22.5, 30.1)
    assert res.client_peak_concurrency == 4 and res.mean_concurrency == 3.7 and res.first_error is None


def test_read_result_counts_failures_and_keeps_the_errors_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    err = "Traceback (most recent call last):\n  File \"x\", line 1\naiohttp.ClientPayloadError: cut off\n"
    path.write_text(json.dumps(_record(completed=6, errors=["", err, "", ""])) + "\n")
    res = client.read_result(path, prompts=8)
    assert res.failed == 2 and res.first_error == "aiohttp.ClientPayloadError: cut off"


def test_read_result_of_an_older_client_leaves_what_it_lacks_empty(tmp_path):
    path = tmp_path / "out.jsonl"
    rec = _record()
    for key in ("max_concurrent_requests", "concurrency", "median_itl_ms", "errors"):
        del rec[key]
    path.write_text(json.dumps(rec) + "\n")
    res = client.read_result(path, prompts=8)
    assert res.client_peak_concurrency is None and res.mean_concurrency is None and res.itl_p50_ms is None


@pytest.mark.parametrize("content, match", [(None, "no result file"), ("", "is empty"), ("{not json", "JSON line"),
                                            ("[1, 2]", "not an object"),
                                            (json.dumps({"completed": 0}), "lacks duration, output_throughput")])
def test_read_result_says_what_is_wrong(tmp_path, content, match):
    path = tmp_path / "out.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(client.ClientError, match=match):
        client.read_result(path, prompts=4)


# --- the server's log -------------------------------------------------------------------------

LOG = textwrap.dedent("""\
    [2026-01-01 10:00:00] Prefill batch, #new-seq: 1, #new-token: 8192, #cached-token: 0, token usage: 0.05, #running-req: 0, #queue-req: 5,
    [2026-01-01 10:00:09] Decode batch, #running-req: 3, #token: 98304, token usage: 0.40, cuda graph: True, gen throughput (token/s): 95.10, #queue-req: 4,
    [2026-01-01 10:00:10] kvtier: 3 requests, 3264 tokens on the device, 95040 on the host, 5940 device slots released, 1.2 MB device-to-host, 1485 pages evicted
    [2026-01-01 10:00:11] Decode batch. #running-req: 7, #token: 229376, token usage: 0.93, gen throughput (token/s): 180.00, #queue-req: 1
    [2026-01-01 10:00:12] kvtier: 7 requests, 7616 tokens on the device, 221760 on the host, 13860 device slots released, 3.4 MB device-to-host, 3465 pages evicted
    [2026-01-01 10:00:12] kvtier: decode 40 steps, 30.00 ms/step: attention 10.00 (engine 12.00, window GPU 2.00), plan 2.00
    [2026-01-01 10:00:13] kvtier: decode 10 steps, 40.00 ms/step: attention 20.00 (engine 22.00, window GPU 4.00), plan 1.00
    """)


def test_parse_log_reads_admission_queue_and_the_tiers_lines():
    stats = server.parse_log(LOG)
    assert stats.admitted_max == 7  # decode batches only: a prefill line's running count is not a decode batch
    assert stats.queued_max == 5 and stats.token_usage_max == 0.93
    assert stats.tier_requests_max == 7 and stats.host_tokens_max == 221760
    assert stats.decode["steps"] == 50 and stats.decode["step_ms"] == pytest.approx(32.0)
    assert stats.decode["plan_ms"] == pytest.approx(1.8)
    empty = server.parse_log("nothing here\n")
    assert empty.admitted_max is None and empty.decode is None and empty.host_tokens_max is None


def test_log_reader_returns_each_piece_once(tmp_path):
    log = tmp_path / "server.log"
    reader = server.LogReader(log)
    assert reader.since() == ""  # not written yet
    log.write_text("a\n")
    assert reader.since() == "a\n"
    with open(log, "a") as f:
        f.write("b\n")
    assert reader.since() == "b\n" and reader.since() == ""


def test_pool_tokens_at_the_top_or_in_a_ranks_state():
    assert server.pool_tokens({"max_total_num_tokens": 1000}) == 1000
    assert server.pool_tokens({"internal_states": [{"max_total_num_tokens": 900}]}) == 900
    assert server.pool_tokens({}) is None and server.pool_tokens(None) is None


def test_a_server_that_cannot_start_is_recorded_with_its_log(tmp_path):
    """Here `python -m sglang.launch_server` exits at once (no sglang in this venv, or a model it cannot load):
    the matrix records the server's error, shows the log's tail and does not count it as run."""
    args = _args(tmp_path, servers="dense", ready_timeout=120)
    plans = matrix.plan_servers(["dense"], ROOT / "policies")
    m = matrix.Matrix(args, models.MODELS["qwen2.5-coder-0.5b"], tmp_path, 0.85, 1.0, plans)
    (tmp_path / "qwen2.5-coder-0.5b").mkdir()  # no config.json in it: a real sglang fails to load it
    m.run_server(plans[0])
    rec = m.servers[0]
    assert "before serving" in rec["error"] and m.failed and m.rows == []
    assert (tmp_path / "server-dense.log").read_text().strip()  # the log the error pointed at


# --- the sweep and the report -----------------------------------------------------------------

def test_stop_reason_stops_when_a_level_adds_too_little():
    assert report.stop_reason([100.0], 0.05) is None
    assert report.stop_reason([100.0, 190.0], 0.05) is None
    assert "stopped growing: 195.0 tokens/s against 190.0" in report.stop_reason([100.0, 190.0, 195.0], 0.05)
    assert report.stop_reason([100.0, 190.0, 180.0], 0.0) is not None  # a drop always stops
    assert report.stop_reason([100.0, 190.0, 200.0], 0.05) is None


def _row(server_name, inp, c, tps, tpot, admitted, status="ok"):
    return {"server": server_name, "input_len": inp, "output_len": 256, "concurrency": c, "prompts": 2 * c,
            "status": status, "completed": 2 * c, "output_tokens_per_s": tps, "tpot_p50_ms": tpot, "tpot_p99_ms": tpot,
            "ttft_p50_ms": 1000.0, "ttft_p99_ms": 2000.0, "admitted_max": admitted, "device_peak_gib": 70.0,
            "host_peak_gib": 10.0}


def test_summary_compares_each_server_with_dense_at_its_best():
    rows = [_row("dense", 131072, 1, 40.0, 20.0, 1), _row("dense", 131072, 8, 150.0, 45.0, 7),
            _row("dense", 131072, 16, 150.0, 45.0, 7),
            _row("hgca", 131072, 1, 20.0, 40.0, 1), _row("hgca", 131072, 32, 300.0, 90.0, 30),
            _row("hgca", 131072, 64, 0.0, 0.0, None, status="client failed: boom")]
    s = report.summarize(rows)["131072"]
    assert s["dense"]["best_tokens_per_s"] == 150.0 and s["dense"]["best_concurrency"] == 8
    h = s["hgca"]
    assert h["tokens_per_s_vs_dense"] == 2.0 and h["admitted_vs_dense"] == pytest.approx(30 / 7)
    assert h["tpot_at_1_vs_dense"] == 2.0 and h["best_concurrency"] == 32
    line = report.headline(report.summarize(rows), "qwen2.5-7b")
    assert line == "qwen2.5-7b, input 131072: dense: 150 tok/s, 7 at once; hgca: 300 tok/s, 30 at once"
    text = report.table(rows, report.summarize(rows), [{"server": "fluxion", "skipped": "no runtime"}],
                        title="T", caption="C")
    assert "| 131072 | hgca | 300.0 | 32 | 30 | 40.0 | 2.00x | 4.29x | 2.00x |" in text
    assert "| hgca | 131072 | 64 | 128 | 128 |  |  |  |" in text and "client failed: boom" in text
    assert "| fluxion | skipped: no runtime |" in text


def test_plot_draws_throughput_and_tpot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("dense", 1024, c, 10.0 * c, 20.0, c) for c in (1, 2, 4)] + [_row("hgca", 1024, 1, 5.0, 30.0, 1)]
    assert report.plot(rows, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.plot([_row("dense", 1024, 1, 1.0, 1.0, 1, status="timed out")], tmp_path / "q.png", title="t")


# --- servers, policies and the model directory ------------------------------------------------

def test_plan_servers_skips_what_does_not_build_and_says_why(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: hgca\nwindow: {page_tokens: -1}\n")
    plans = {p.name: p for p in matrix.plan_servers(["dense", "hgca", "fluxion", "nope", str(bad)], ROOT / "policies")}
    assert plans["dense"] == matrix.ServerPlan("dense", None, None)
    assert plans["hgca"].skipped is None and plans["hgca"].source.endswith("hgca.yaml")
    assert "no runtime in this version" in plans["fluxion"].skipped
    assert plans["nope"].skipped == "no policy file nope.yaml"
    assert "does not validate" in plans["bad"].skipped and "window.page_tokens" in plans["bad"].skipped


def test_policy_copy_sets_the_host_capacity_and_keeps_the_rest(tmp_path):
    from kvtier.config import load

    src = ROOT / "policies" / "hgca-prefilter.yaml"
    changed = matrix.policy_with_capacity(src, 90.0, tmp_path / "p.yaml")
    assert changed == {"host_store.capacity_gib": 90.0}
    copy, orig = load(tmp_path / "p.yaml"), load(src)
    assert copy.host_store.capacity_gib == 90.0
    assert copy.model_copy(update={"host_store": orig.host_store}) == orig
    assert matrix.policy_with_capacity(ROOT / "policies" / "dense.yaml", 90.0, tmp_path / "d.yaml") == {}


def test_models_are_the_published_shapes():
    big, small = models.MODELS["qwen2.5-7b"], models.MODELS["qwen2.5-coder-0.5b"]
    assert big.weight_bytes / 2 == pytest.approx(7.61e9, rel=5e-3)  # Qwen2.5-7B: 7.61B parameters
    assert small.weight_bytes / 2 == pytest.approx(0.49e9, rel=1e-2)  # Qwen2.5-Coder-0.5B: 0.49B
    assert big.kv_bytes_per_token == 2 * 2 * 28 * 4 * 128 and small.kv_bytes_per_token == 2 * 2 * 24 * 2 * 64
    assert big.shape == (28, 28, 4, 128) and big.context_tokens == 131072
    assert matrix.check_inputs(big, [32768, 130816], 256) is None
    assert "the longest input is 130816" in matrix.check_inputs(big, [131072], 256)


def test_model_dir_has_the_published_config_and_the_tokenizer(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for name, text in (("tokenizer.json", "{}"), ("tokenizer_config.json", "{}"), ("chat_template.jinja", "x"),
                       ("generation_config.json", '{"eos_token_id": 1}'), ("model.safetensors", "w")):
        (tok / name).write_text(text)
    out = models.write_model_dir(models.MODELS["qwen2.5-7b"], tmp_path / "m", tokenizer=tok)
    assert json.loads((out / "config.json").read_text()) == models.MODELS["qwen2.5-7b"].config
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 151643,
                                                                         "eos_token_id": 151643}
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                     "tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(models.ModelDirError, match="expected tokenizer.json"):
        models.write_model_dir(models.MODELS["qwen2.5-7b"], tmp_path / "m2", tokenizer=tmp_path / "m2")
    with pytest.raises(models.ModelDirError, match="expected one of qwen2.5-7b"):
        models.spec_for("llama-9b")


# --- the command ------------------------------------------------------------------------------

def _args(tmp_path, **over):
    import argparse

    from kvtier.bench import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args(["--results-dir", str(tmp_path / "results"), "--port", "30931"])
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_dry_run_prints_every_server_and_level(capsys):
    rc = main(["bench", "serve", "--dry-run", "--device-gib", "139.8", "--concurrency", "1,4", "--host-gib", "90",
               "--servers", "dense,hgca-prefilter,fluxion", "--", "--tp", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "--mem-fraction-static 0.483" in cap.err and "7 requests of the longest input" in cap.err
    lines = cap.out.splitlines()
    assert lines[0] == "# dense"
    launches = [ln for ln in lines if "sglang.launch_server" in ln]
    assert len(launches) == 2 and launches[0].endswith("--tp 1") and "--kv-tier" not in launches[0]
    assert "--kv-tier WORK/policy-hgca-prefilter.yaml" in launches[1]
    assert sum("sglang.bench_serving" in ln for ln in lines) == 2 * 2 * 2  # servers x inputs x levels
    assert any(ln.startswith("# hgca-prefilter: the host store holds 16 requests") for ln in lines)
    assert any(ln.startswith("# fluxion: skipped (") for ln in lines)


@pytest.mark.parametrize("argv, match", [(["--input-lens", "131072"], "the longest input is 130816"),
                                         (["--device-gib", "40"], "less than the 79.6 GiB card"),
                                         (["--output-len", "0"], "must be > 0")])
def test_bad_settings_are_exit_2_with_the_reason(capsys, argv, match):
    assert main(["bench", "serve", "--dry-run", *argv]) == 2
    assert match in capsys.readouterr().err


def test_without_sglangs_client_the_run_stops_before_any_server(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here: this run would start servers")
    rc = main(["bench", "serve", "--device-gib", "79.6", "--work-dir", str(tmp_path), "--results-dir",
               str(tmp_path)])
    assert rc == 2
    assert "sglang's client does not run here" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written, nothing started


def test_a_matrix_result_carries_its_headline_into_the_index(tmp_path):
    from kvtier.bench import index

    rows = [_row("dense", 2048, 1, 40.0, 20.0, 1), _row("hgca", 2048, 1, 20.0, 40.0, 1)]
    summary = report.summarize(rows)
    payload = {"bench": "serve", "rows": rows, "summary": summary, "headline": report.headline(summary, "m")}
    assert index.derive_headline(payload) == "m, input 2048: dense: 40 tok/s, 1 at once; hgca: 20 tok/s, 1 at once"
