"""The benchmark scripts run end to end at tiny sizes and report what they promise."""

import json
import re

import pytest
import torch

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
    assert policies == {"dense", "offload_all", "hgca", "hgca_prefilter", "hgca_residual", "hgca_serial",
                        "hcattention", "hcattention_int4", "hcattention_exact", "hcattention_kv", "sparda", "sparda_fetch", "sparda_none",
                        "fluxion", "fluxion_cpu", "hgca_token_scales"}
    # fluxion reports its split: some blocks attended, none on the GPU side with gpu_share off, and the
    # host tokens a head kept within its cap
    fx, fc = (next(r for r in payload["rows"] if r["policy"] == p) for p in ("fluxion", "fluxion_cpu"))
    assert fx["cpu_blocks_per_step"] + fx["gpu_blocks_per_step"] > 0
    assert fc["gpu_blocks_per_step"] == 0 and fc["cpu_blocks_per_step"] > 0
    assert 0 < fx["kept_tokens_per_head"] <= fx["cap_tokens_per_head"] + 64
    assert re.search(r"fluxion_vs_hgca 1024x1=[\d.]+", out)
    # the block cache reports what it held and fetched
    sp = next(r for r in payload["rows"] if r["policy"] == "sparda")
    assert sp["block_hits_per_step"] + sp["block_misses_per_step"] > 0 and sp["blocks_fetched_per_step"] > 0
    graph = next(r for r in payload["rows"] if r["policy"] == "dense_graph")
    assert graph["status"] == "needs CUDA (a CUDA graph)"  # the CPU machine runs no graph; said so
    # the GPU-selecting policies report what they keep per query head (mass 0.9, capped at the budget)
    hc = next(r for r in payload["rows"] if r["policy"] == "hcattention")
    assert 0 < hc["host_tokens_per_qhead"] <= 256 and hc["device_index_gib"] > 0
    # hgca keeps only sinks + window on the device and attends a sparse subset: small but nonzero error
    hgca = next(r for r in payload["rows"] if r["policy"] == "hgca")
    assert 0 < hgca["rel_err"] < 0.2
    # the residual stands in for the host tokens left out: closer to dense on the same inputs
    resid = next(r for r in payload["rows"] if r["policy"] == "hgca_residual")
    assert 0 < resid["rel_err"] < hgca["rel_err"]
    assert re.search(r"hgca_residual_vs_hgca=[\d.]+ hgca_residual_vs_dense=[\d.]+ hgca_residual_rel_err=", out)
    # overlap off runs the same attention one part after the other: the same selection, the same error
    serial = next(r for r in payload["rows"] if r["policy"] == "hgca_serial")
    assert serial["rel_err"] == pytest.approx(hgca["rel_err"], rel=1e-3)
    assert re.search(r"hgca_vs_serial=[\d.]+ \(overlap on over off, context \d+ batch \d+\)", out)
    assert hgca["device_tokens"] < 1024 and hgca["host_tokens"] > 0
    assert (tmp_path / "decode-quick-cpu.md").read_text().startswith("| policy |")


def test_decode_bench_overlap_ratio_without_offload_all(tmp_path, monkeypatch, capsys):
    """hgca against hgca_serial alone: the overlap ratio is still reported (of the largest shape that
    ran both), and the missing baseline summary is an exit status of 1 with the reason on stderr."""
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = main(["bench", "decode", "--quick", "--contexts", "1024", "--batches", "1,2", "--steps", "1",
               "--policies", "hgca,hgca_serial"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "no summary line" in cap.err
    m = re.search(r"hgca_vs_serial=([\d.]+) \(overlap on over off, context 1024 batch 2\)", cap.out)
    assert m, cap.out
    payload = json.loads((tmp_path / "decode-quick-cpu.json").read_text())
    summary = payload["summary"]
    rows = {(r["policy"], r["batch"]): r for r in payload["rows"]}
    want = rows[("hgca_serial", 2)]["ms_per_step"] / rows[("hgca", 2)]["ms_per_step"]
    assert summary["hgca_vs_serial"] == pytest.approx(want) and float(m.group(1)) == pytest.approx(want, abs=1e-3)


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


def test_decode_bench_full_model_carries_a_whole_models_weights(tmp_path, monkeypatch, capsys):
    """--full-model adds MLPs and an untied embedding and LM head: the weights are all there, the step
    runs through them, and the attention error against dense is what the attention stack alone gives."""
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = main(["bench", "decode", "--quick", "--contexts", "1024", "--batches", "1", "--steps", "1",
               "--policies", "dense,offload_all,hgca", "--full-model"])
    out = capsys.readouterr().out
    assert rc == 0, out
    payload = json.loads((tmp_path / "decode-quick-cpu.json").read_text())
    layers, hidden, hq, hkv, d, mlp, vocab = 2, 1024, 32, 8, 128, 4096, 8192
    params = layers * (hidden * (hq + 2 * hkv) * d + hq * d * hidden + 3 * hidden * mlp) + 2 * vocab * hidden
    params += layers * hkv * d  # the q bias directions
    assert payload["memory"]["full_model"] is True
    assert payload["memory"]["weights_gib"] == pytest.approx(params * 4 / 2**30)
    rows = {r["policy"]: r for r in payload["rows"]}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["dense"]["rel_err"] < 1e-5 and 0 < rows["hgca"]["rel_err"] < 0.2


def test_decode_bench_no_fit_check_runs_what_the_accounting_rejects(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    # on a CPU the device budget is the host budget: 0.001 GiB admits no dense request of 1024 tokens
    args = ["bench", "decode", "--quick", "--contexts", "1024", "--batches", "1", "--steps", "1",
            "--policies", "dense", "--host-gib", "0.001"]
    main(args)
    row = json.loads((tmp_path / "decode-quick-cpu.json").read_text())["rows"][0]
    assert row["status"].startswith("does not fit")
    main(args + ["--no-fit-check"])
    row = json.loads((tmp_path / "decode-quick-cpu.json").read_text())["rows"][0]
    assert row["status"] == "ok" and row["past_accounting"] is True
    assert "past_accounting" in (tmp_path / "decode-quick-cpu.md").read_text()
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(args + ["--device-gib", "80"]) == 2
        assert "--device-gib: expects a CUDA device, got cpu" in capsys.readouterr().err


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


@pytest.mark.parametrize("model_type, tied", [("qwen2", False), ("llama", True)])
def test_random_checkpoint_loads_in_transformers_with_every_weight(tmp_path, model_type, tied):
    transformers = pytest.importorskip("transformers", reason="the [eval] extra installs transformers")
    import json

    from kvtier.bench import random_checkpoint

    src = tmp_path / "cfg"
    src.mkdir()
    cfg = {"model_type": model_type, "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else
                                                        "LlamaForCausalLM"],
           "hidden_size": 64, "intermediate_size": 96, "vocab_size": 300, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "tie_word_embeddings": tied, "rms_norm_eps": 1e-6}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer.json").write_text("{}")
    rc = main(["bench", "random-checkpoint", str(src), str(tmp_path / "a")])
    assert rc == 0 and (tmp_path / "a" / "tokenizer.json").is_file()
    from safetensors.torch import load_file

    random_checkpoint.write(src, tmp_path / "b")
    random_checkpoint.write(src, tmp_path / "c", seed=1)
    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded: the same weights every time
    assert not torch.equal(a["model.layers.1.mlp.up_proj.weight"], c["model.layers.1.mlp.up_proj.weight"])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    q = model.model.layers[0].self_attn.q_proj.weight.float()
    assert 0.04 < float(q.std()) < 0.06  # peaked attention, as documented
    out = model(torch.randint(0, 300, (1, 16))).logits
    assert torch.isfinite(out).all()


def test_random_checkpoint_refuses_what_it_cannot_draw(tmp_path, capsys):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert main(["bench", "random-checkpoint", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "expected model_type one of" in capsys.readouterr().out
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["bench", "random-checkpoint", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "expected the key 'hidden_size'" in capsys.readouterr().out
    assert main(["bench", "random-checkpoint", str(tmp_path / "none"), str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().out


def test_random_checkpoint_without_safetensors_says_what_to_install(tmp_path, capsys, monkeypatch):
    import json
    import sys

    cfg = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "vocab_size": 10,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the import fails as if not installed
    assert main(["bench", "random-checkpoint", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "needs the safetensors package" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_engine_bench_quick_reports_its_ratios_against_baselines_of_the_same_run(tmp_path, capsys):
    """`kvtier bench engine` at a small shape: the issue's last line, ratios recomputed from the
    medians it stores, the engine equal to the torch computation, and the long case flagged
    when its bytes fit the LLC (then it is not a DRAM measurement)."""
    from kvtier.bench.engine import llc_bytes

    rc = main(["bench", "engine", "--quick", "--tokens", "4096", "--topk", "256", "--long-tokens", "8192",
               "--dram-bytes", str(64 << 20), "--threads", "2", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"engine_vs_stream=([\d.]+) engine_vs_torch=([\d.]+) engine_vs_dram=([\d.]+) "
                     r"engine_vs_dram@8192=([\d.]+)", last)
    assert m, last
    res = json.loads((tmp_path / "engine.json").read_text())
    med = res["median_s"]
    assert res["engine_vs_stream"] == pytest.approx(med["stream"] / med["engine"])
    assert res["engine_vs_torch"] == pytest.approx(med["torch"] / med["engine"])
    assert float(m.group(2)) == pytest.approx(res["engine_vs_torch"], abs=6e-3)
    assert res["max_abs_diff_vs_torch"] < 1e-4
    # int8_channel keys (the default) at the bench's 64-token pages: 128 bytes and 4 * 128 / 64 of scales a token
    assert res["shape"]["bytes_touched"] == 8 * 4096 * (128 + 4 * 128 // 64) + 8 * 256 * 128 * 2
    llc = llc_bytes() or (64 << 20)
    assert res["long"]["fits_llc"] == (res["long"]["bytes_touched"] <= llc)
    assert ("within the" in out) == res["long"]["fits_llc"]
    assert (tmp_path / "engine.md").read_text().startswith("# engine benchmark")


def test_the_calibrated_generator_puts_attention_in_runs_as_a_real_model_does():
    """`runs` (the default): a few 64-token blocks hold most of a head's host mass and 0.9 of it takes a
    few percent of the tokens (the Qwen capture: 0.69 and 0.075); `scattered` spreads its salient tokens
    so that no few blocks hold them. Both deterministic per seed."""
    from kvtier.bench.stack import context_kv, make_weights, project_qkv
    from kvtier.config import ModelShape

    shape = ModelShape(n_layers=2, num_q_heads=32, kv_heads=8, head_dim=128)
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(7))

    def host_stats(synthetic):
        w = make_weights(shape, 4096, device="cpu", dtype=torch.float32, synthetic=synthetic)
        out = []
        for layer in range(shape.n_layers):
            k, v = context_kv(shape, w, layer, 4096, seed=0, device="cpu", dtype=torch.float32)
            k2, v2 = context_kv(shape, w, layer, 4096, seed=0, device="cpu", dtype=torch.float32)
            assert torch.equal(k, k2) and torch.equal(v, v2)
            q = project_qkv(x, w, layer, shape)[0][0].view(8, 4, 128).double()
            p = torch.softmax(torch.einsum("hgd,nhd->hgn", q, k.double()) / 128 ** 0.5, -1)
            blocks = p.view(8, 4, 64, 64).sum(-1).mean(1).sort(-1, descending=True).values[:, :4].sum(-1)
            top = p.sort(-1, descending=True).values.cumsum(-1)
            share = ((top < 0.9).sum(-1) + 1).double().mean() / 4096
            out.append((float(blocks.mean()), float(share)))
        return torch.tensor(out).mean(0).tolist()

    runs_blocks, runs_share = host_stats("runs")
    scat_blocks, _ = host_stats("scattered")
    assert runs_blocks > 0.6 and 0.02 < runs_share < 0.2, (runs_blocks, runs_share)
    assert scat_blocks < 0.5, scat_blocks
    with pytest.raises(ValueError, match="synthetic: expected one of"):
        make_weights(shape, 64, device="cpu", dtype=torch.float32, synthetic="flat")


def test_profile_spans_keep_a_range_s_host_time_when_it_is_listed_twice():
    """On CUDA torch's averaged events list each `kvtier.*` range twice, its host range and its
    device annotation (no host time), in either order; the phase keeps the host one's time and
    calls (an H100 run reported every phase as 0 ms before)."""
    from types import SimpleNamespace as E

    from kvtier.bench.profile import span_times

    host = E(key="kvtier.host_submit", cpu_time_total=92006.0, count=64)
    device = E(key="kvtier.host_submit", cpu_time_total=0.0, count=64)
    other = E(key="aten::topk", cpu_time_total=13046.0, count=64)
    for avg in ([host, device, other], [device, host, other]):
        spans, calls = span_times(avg, 2)
        assert spans == {"host_submit": 46.003} and calls == {"host_submit": 32.0}


def test_decode_bench_profile_says_where_a_step_goes(tmp_path, monkeypatch, capsys):
    """--profile N: N untimed steps under torch's profiler; the row carries each phase's time per
    step and the top operators, the tables go beside the results, and the ranges are off after."""
    from kvtier.runtime.hybrid import timing

    monkeypatch.setenv("KVTIER_RESULTS_DIR", str(tmp_path))
    rc = main(["bench", "decode", "--quick", "--contexts", "1024", "--batches", "1", "--steps", "1",
               "--policies", "hgca,dense", "--profile", "2"])
    out = capsys.readouterr().out
    assert rc in (0, 1), out  # 1: no offload_all for the summary line
    payload = json.loads((tmp_path / "decode-quick-cpu.json").read_text())
    for name in ("hgca", "dense"):
        row = next(r for r in payload["rows"] if r["policy"] == name)
        prof = row["profile"]
        assert prof["steps"] == 2
        spans = prof["spans_ms_per_step"]
        assert {"plan", "window", "merge"} <= set(spans) and all(v >= 0 for v in spans.values())
        # one window range per layer and step, whatever the policy
        assert prof["span_calls_per_step"]["window"] == 2  # the quick shape's 2 layers
        assert ("host_collect" in spans) == (name == "hgca")
        assert prof["top_host_self_ms_per_step"] and all(ms >= 0 for _, ms, _ in prof["top_host_self_ms_per_step"])
        assert (tmp_path / prof["tables"]).read_text().count("Self CPU") >= 1
    assert "profile, ms per step: plan" in out
    assert timing._SPANS is False
    assert main(["bench", "decode", "--quick", "--profile", "-1"]) == 2
