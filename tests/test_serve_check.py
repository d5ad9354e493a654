"""The end-to-end server check's own logic (it talks HTTP only; the server part runs on a GPU machine)."""

from pathlib import Path

import pytest

from kvtier_sglang import serve_check

DENSE = str(Path(__file__).resolve().parents[1] / "policies" / "dense.yaml")


def test_agreement_counts_tokens_up_to_the_first_difference():
    assert serve_check._agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert serve_check._agreement([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert serve_check._agreement([], []) == 0.0
    assert serve_check._agreement([1, 2], [1, 2, 3, 4]) == 0.5


def test_compare_reports_the_worst_request_and_the_speed_ratio():
    def res(name, ids, tps):
        return {"policy": name, "requests": [{"output_ids": i, "decode_tokens_per_s": t} for i, t in zip(ids, tps)],
                "batch": []}

    ref = res("dense", [[1, 2, 3, 4], [5, 6, 7, 8]], [100.0, 50.0])
    other = res("hgca", [[1, 2, 3, 4], [5, 6, 0, 0]], [80.0, 40.0])
    cmp = serve_check.compare([ref, other])["hgca"]
    assert cmp["match_tokens"] == 0.5 and cmp["decode_vs_first"] == 0.8


def test_follow_ups_count_in_the_comparison_and_the_table():
    def res(name, follow):
        return {"policy": name, "command": [], "requests": [], "batch": [],
                "follow_ups": [{"context": 8160, "shares": 8128, "cached_tokens": c, "prefill_s": t,
                                "output_ids": ids} for ids, c, t in follow]}

    ref = res("dense", [([1, 2, 3, 4], 8128, 0.05)])
    other = res("hgca", [([1, 2, 0, 0], 8128, 0.2)])
    cmp = serve_check.compare([ref, other])["hgca"]
    assert cmp["match_tokens"] == 0.5
    table = serve_check._markdown([ref, other], {"hgca": cmp}, 4)
    assert "| hgca | 8160 | 8128 | 8128 | 0.20 | 0.50 |" in table and "| dense | 8160 | 8128 | 8128 | 0.05 | (reference) |" in table
    for r, ids in ((ref, [5, 6]), (other, [5, 7])):  # a conversation's turns count too
        r["turns"] = [{"turn": 1, "context": 100, "cached_tokens": 0, "prefill_s": 0.1, "output_ids": ids}]
    assert serve_check.compare([ref, other])["hgca"]["match_per_request"] == [0.5, 0.5]
    assert "| hgca | 1 | 100 | 0 | 0.10 | 0.50 |" in serve_check._markdown([ref, other], {}, 4)


def test_missing_policy_file_is_exit_2(tmp_path, capsys):
    assert serve_check.main(["--model-path", "m", "--policies", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml not found" in capsys.readouterr().err


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path, capsys, monkeypatch):
    # Here the server exits at once (no model, and no sglang in this venv or no GPU): exit 1, log tail shown.
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = serve_check.main(["--model-path", str(tmp_path / "no-model"), "--policies", DENSE,
                           "--ready-timeout", "120", "--port", "30917"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "exited with" in err and "before serving" in err


def test_reference_must_have_sent_the_same_prompts(tmp_path, capsys):
    import json

    ref = {"results": [{"policy": "policies/dense.yaml", "command": ["x", "--kv-tier", "policies/dense.yaml"],
                        "seed": 0, "vocab": 32000,
                        "requests": [{"context": 8192, "output_ids": [1] * 32, "decode_tokens_per_s": 10.0}]}]}
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(ref))
    args = serve_check.argparse.Namespace(contexts=[8192], new_tokens=32, seed=0, vocab=32000)
    assert serve_check.reference_from(path, args)["policy"] == "policies/dense.yaml"
    for field, value, what in (("contexts", [4096], "contexts"), ("new_tokens", 8, "tokens per request"),
                               ("seed", 3, "seed")):
        bad = serve_check.argparse.Namespace(**{**vars(args), field: value})
        try:
            serve_check.reference_from(path, bad)
        except ValueError as exc:
            assert what in str(exc)
        else:
            raise AssertionError(f"a reference with other {field} was accepted")
    rc = serve_check.main(["--model-path", "m", "--policies", DENSE, "--reference", str(path), "--contexts", "4096"])
    assert rc == 2 and "--reference" in capsys.readouterr().err


@pytest.mark.parametrize("incremental", [False, True])
def test_a_streamed_answer_times_prefill_and_decode_apart(incremental):
    """The decode rate comes from the chunks after the first one (and the steady rate from those
    after the second), read from a real HTTP stream whose chunks carry every id so far (sglang's
    default) or only the new ones."""
    import http.server
    import json
    import threading
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["stream"] is True and body["sampling_params"]["max_new_tokens"] == 5
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            time.sleep(0.2)  # "prefill"
            for n in range(1, 6):
                chunk = {"text": "x" * n, "output_ids": [n - 1] if incremental else list(range(n)),
                         "meta_info": {"completion_tokens": n, "finish_reason": None if n < 5 else {"type": "length"}}}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.3 if n == 1 else 0.05)  # the first decode step is the slow one
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        st = serve_check._generate_streamed(f"http://127.0.0.1:{server.server_port}", [1, 2, 3], 5, timeout=10)
    finally:
        server.shutdown()
    assert serve_check._ids(st.out) == [0, 1, 2, 3, 4] and st.first_tokens == 1
    # the server sleeps 0.45 s between its first and last chunk; the client may read the first
    # chunk a few ms late, so its span is a little shorter (0.4486 s seen on a loaded 2-core machine)
    assert st.first_s >= 0.2 and st.last_s - st.first_s >= 0.4
    assert [n for _, n in st.chunks] == [1, 2, 3, 4, 5] and st.chunks[0][0] == st.first_s
    rate = serve_check.decode_rate(st)
    assert 4 / (st.last_s - st.first_s) == rate and rate < 4 / 0.4
    # the first step sleeps 0.3 s on the server, the later ones 0.05 s; a late read of the first
    # chunk shortens the measured gap by a few ms (0.2985 s seen), never to the later steps' size
    first = serve_check.first_decode_step_s(st)
    assert first >= 0.25 and first > 2 * max(b[0] - a[0] for a, b in zip(st.chunks[1:], st.chunks[2:]))
    steady = serve_check.steady_decode_rate(st)
    assert steady == 3 / (st.last_s - st.chunks[1][0]) and steady > rate
    assert serve_check._finish_reason(st.out) == {"type": "length"}
    one = serve_check.Streamed(st.out, 0.1, 5, 0.1, ((0.1, 5),))  # everything in one chunk: no decode rate
    assert serve_check.decode_rate(one) is None and serve_check.steady_decode_rate(one) is None
    assert serve_check.first_decode_step_s(one) is None


def test_serve_compare_pairs_each_policy_across_runs(tmp_path, capsys):
    import json

    from kvtier_sglang import serve_compare

    def res(policy, ids, tps):
        return {"policy": f"policies/{policy}.yaml",
                "requests": [{"context": 100 * (i + 1), "output_ids": x, "decode_tokens_per_s": tps}
                             for i, x in enumerate(ids)],
                "batch": [{"context": 50, "output_ids": ids[0]}]}

    tp1 = [res("dense", [[1, 2, 3], [4, 5, 6]], 10.0), res("hgca", [[1, 2, 3], [4, 0, 6]], 5.0)]
    tp2 = [res("dense", [[1, 9, 3], [4, 5, 6]], 20.0), res("hgca", [[1, 2, 3], [4, 0, 0]], None)]
    pool = [dict(tp1[0]), res("hgca", [[1, 2, 3], [4, 0, 7]], 5.0)]  # reuses tp1's dense launch (--reference)
    for name, run in (("a", tp1), ("b", tp2), ("c", pool)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": run}))
    rc = serve_compare.main(["--out-dir", str(tmp_path), "--name", "cmp", f"tp1={tmp_path / 'a.json'}",
                             f"tp2={tmp_path / 'b.json'}", f"pool={tmp_path / 'c.json'}"])
    assert rc == 0
    got = {(r["a"], r["b"]): r["agree"] for r in json.loads((tmp_path / "cmp.json").read_text())["pairs"]}
    assert ("tp1:dense", "pool:dense") not in got  # one launch, not a second one that agreed
    assert got[("tp1:hgca", "pool:hgca")] == {"100": 3, "200": 2, "batch 50": 3}
    got = {k: v for k, v in got.items() if "pool:" not in k[0] + k[1]}
    assert got == {("tp1:dense", "tp1:hgca"): {"100": 3, "200": 1, "batch 50": 3},
                   ("tp2:dense", "tp2:hgca"): {"100": 1, "200": 1, "batch 50": 1},
                   ("tp1:dense", "tp2:dense"): {"100": 1, "200": 3, "batch 50": 1},
                   ("tp1:hgca", "tp2:hgca"): {"100": 3, "200": 2, "batch 50": 3}}
    md = (tmp_path / "cmp.md").read_text()
    assert "| tp1:hgca | tp2:hgca | 3/3 | 2/3 | 3/3 |" in md and "| tp2:hgca | n/a | n/a |" in md
    assert serve_compare.main(["nolabel.json"]) == 2
    assert "expected LABEL=RUN.json" in capsys.readouterr().err
    assert serve_compare.main([f"x={tmp_path / 'missing.json'}"]) == 2


def test_the_decode_clock_counts_steps_from_plan_to_plan():
    from kvtier.runtime.hybrid import StepTimes
    from kvtier.runtime.session import DecodeClock

    clock = DecodeClock()
    clock.decode_planned(10.0, 10.001, StepTimes(9.0, 9.0, 9.0))  # no earlier plan: not a step, times dropped
    assert clock.take() is None
    clock.decode_planned(10.050, 10.052, StepTimes(0.020, 0.004, 0.030))  # the step from 10.0, planned in 1 ms
    clock.decode_planned(10.110, 10.111, StepTimes(0.030, 0.006, 0.040))
    clock.extend_planned()  # a prefill: the next decode plan starts a new chain
    clock.decode_planned(20.0, 20.001, StepTimes(5.0, 5.0, 5.0))
    t = clock.take()
    assert t["steps"] == 2
    for key, want in (("step_ms", 55.0), ("plan_ms", 1.5), ("attention_ms", 35.0), ("engine_ms", 25.0),
                      ("window_gpu_ms", 5.0)):
        assert abs(t[key] - want) < 1e-6, (key, t[key])
    assert clock.take() is None  # taken: the sums start over


def test_decode_steps_sum_up_the_schedulers_statistics_lines():
    lines = ["[2026-01-01 10:00:00] kvtier: 1 requests, 1084 tokens on the device, 10928 on the host, ...",
             "[2026-01-01 10:00:01] kvtier: decode 10 steps, 40.00 ms/step: attention 12.00 (engine 20.00, "
             "window GPU 4.00), plan 2.00",
             "[2026-01-01 10:00:02] kvtier: decode 30 steps, 36.00 ms/step: attention 12.40 (engine 16.00, "
             "window GPU 3.60), plan 1.60"]
    d = serve_check.decode_steps(lines)
    assert d["steps"] == 40
    for key, want in (("step_ms", 37.0), ("attention_ms", 12.3), ("engine_ms", 17.0), ("window_gpu_ms", 3.7),
                      ("plan_ms", 1.7)):
        assert abs(d[key] - want) < 1e-9, (key, d[key])
    assert serve_check.decode_steps(lines[:1]) is None
    res = [{"policy": "policies/hgca.yaml", "command": ["python", "--kv-tier", "policies/hgca.yaml"],
            "requests": [{"context": 100, "output_ids": [1, 2], "prefill_s": 0.1, "decode_tokens_per_s": 5.0}],
            "decode_steps": d}]
    md = serve_check._markdown(res, {}, 2)
    assert "- hgca: 40 steps, 37.0 ms/step: attention 12.3 (engine 17.0, window GPU 3.7), plan 1.7" in md
