"""The sglang plugin against the real sglang package (CPU).

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import os
import pickle
import unittest

import pytest
import torch

sglang = pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier.config import load  # noqa: E402
from kvtier_sglang import admission, launch, lifecycle, plugin, prefix, versions  # noqa: E402
from sglang_kit import registered, tiny_model  # noqa: E402, F401 - pytest finds fixtures by name
from sglang_kit import (  # noqa: E402
    _finish,
    _free_row,
    _free_slot_census,
    _launch,
    _poison_free_slots,
    _prefill,
    _Requests,
    _stage2_backend,
    _tier_yaml,
)


def test_version_in_supported_range():
    versions.check(versions.running())
    with pytest.raises(versions.UnsupportedSglangError, match="supports sglang >= 0.5.17"):
        versions.check("0.5.10")


def test_every_hook_applied_and_backend_registered():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    assert plugin.missing_hooks() == []
    assert "kvtier" in ATTENTION_BACKENDS


def test_flag_in_launch_server_help():
    proc = _launch("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--kv-tier PATH" in proc.stdout


def test_bad_yaml_stops_the_launch_with_exit_2(tmp_path, tiny_model):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: hgca\nwindow: {sinks: 4}\n")
    proc = _launch("--model-path", str(tiny_model), "--device", "cpu", "--kv-tier", str(bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}: window.sinks: unknown key" in proc.stderr
    assert "Load weight" not in proc.stderr + proc.stdout  # stopped before any model loads


def test_arguments_parse_into_the_typed_policy(tmp_path, tiny_model, root):
    from sglang.srt.server_args import prepare_server_args

    policy = root / "policies" / "hgca.yaml"
    args = prepare_server_args(["--model-path", str(tiny_model), "--device", "cpu", "--kv-tier", str(policy)])
    assert launch.config_for(args) == load(policy)
    assert args.decode_attention_backend == "kvtier"
    # the record is what reaches the scheduler processes
    assert launch.config_for(pickle.loads(pickle.dumps(args))) == load(policy)
    assert load(os.environ["KVTIER_CONFIG"]) == load(policy)


def test_flag_from_sglang_config_yaml(tmp_path, tiny_model, root):
    from sglang.srt.server_args import prepare_server_args

    cfg = tmp_path / "server.yaml"
    cfg.write_text(f"model-path: {tiny_model}\ndevice: cpu\nkv-tier: {root / 'kvtier.yaml'}\n")
    args = prepare_server_args(["--config", str(cfg)])
    assert launch.config_for(args) == load(root / "kvtier.yaml")


def test_refusals_are_clear():
    assert "speculative decoding" in launch.refusals(type("A", (), {"speculative_algorithm": "EAGLE"})())
    assert "pipeline parallelism" in launch.refusals(type("A", (), {"pp_size": 2})())
    assert "--decode-attention-backend" in launch.refusals(type("A", (), {"decode_attention_backend": "triton"})())


def test_engine_api_accepts_kv_tier(tmp_path, root):
    args, kwargs = launch.engine_init(object(), model_path="m", kv_tier=str(root / "policies" / "hgca.yaml"))
    assert "kv_tier" not in kwargs and kwargs["decode_attention_backend"] == "kvtier"
    from kvtier.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: {tokens: -1}\n")
    with pytest.raises(ConfigError, match="budget.tokens"):
        launch.engine_init(object(), model_path="m", kv_tier=str(bad))


def _run_kit(monkeypatch, config_path):
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

    from kvtier.runtime import hybrid

    monkeypatch.setenv("KVTIER_CONFIG", str(config_path))
    host_seen = []
    original = hybrid.HybridAttention.plan

    def plan(self, rids):
        original(self, rids)
        host_seen.append(sum(self.tier.host_tokens(r) for r in rids))

    monkeypatch.setattr(hybrid.HybridAttention, "plan", plan)
    tc = unittest.TestCase()
    cases = list(kit.make_dense_cases("kvtier"))
    for case in cases:
        with torch.no_grad():
            kit.run_dense_attention_case(tc, case, dtype=torch.float32, device="cpu")
    return cases, host_seen


def test_sglang_attention_kit_passes_with_budget_all(monkeypatch, tmp_path):
    cases, host_seen = _run_kit(monkeypatch, _tier_yaml(tmp_path))
    assert any(c.forward_mode.is_decode() for c in cases)
    assert max(host_seen) > 0, "no kit case put tokens on the host: the tier was not exercised"


def test_sglang_attention_kit_at_the_default_budget_with_int8_keys(monkeypatch, tmp_path):
    _, host_seen = _run_kit(monkeypatch, _tier_yaml(tmp_path, keys="int8", budget="{kind: tokens, tokens: 2048}"))
    assert max(host_seen) > 0


def test_finished_request_releases_host_pages_through_the_real_pool():
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)

    class Probe:
        req_to_token_pool = pool
        released = []

        def release(self, row):
            self.released.append(row)

    probe = Probe()
    lifecycle.track(probe)

    class Kv:  # where 0.5.23 keeps the row
        holds_kv = True
        req_pool_idx = 3

    class Req:  # the attributes ReqToTokenPool.free and the hook read, in either layout
        req_pool_idx = 3
        kv = Kv()

    pool.free(Req())
    assert probe.released == [3]


# --- stage 2: evicted device slots go back to sglang's allocator -------------------------------------------


@pytest.mark.parametrize("tp_size, tp_rank", [(1, 0), (2, 1)])
def test_stage2_evicted_slots_return_to_the_allocator_and_are_freed_once(tp_size, tp_rank):
    """Also as rank 1 of two (this rank's own kv-heads); the tier settles in lockstep either way."""
    torch.manual_seed(0)
    backend, layer, runner = _stage2_backend(tp_size=tp_size, tp_rank=tp_rank)
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [300, 150])
    used = 450
    assert alloc.available_size() == alloc.size - used

    out, ref = reqs.decode_step(backend, layer)
    used += 2
    assert backend.releases_slots and backend.session.tier.lockstep
    released = backend.session.slots_released
    # Sinks (16) and at most a window plus a page (64 + 16) stay per request; the rest went back.
    assert released >= (301 - 16 - 80) + (151 - 16 - 80)
    assert alloc.available_size() == alloc.size - used + released
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)

    # The freed slots really are reusable: another request takes all of them and overwrites their KV.
    filler = alloc.alloc(alloc.available_size() - 8)
    runner.token_to_kv_pool.k_buffer[0][filler] = 1e4
    runner.token_to_kv_pool.v_buffer[0][filler] = -1e4
    for _ in range(3):  # later steps still attend the evicted tokens, from the host store
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)

    # Finishing both through sglang's own release path frees every remaining slot exactly once.
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    alloc.free(filler)
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"
    assert backend.tier_stats()["host_tokens"] == 0


def test_stage2_stays_off_while_the_radix_cache_is_on():
    torch.manual_seed(1)
    backend, layer, runner = _stage2_backend(disable_radix_cache=False)
    reqs = _Requests(runner, [200])
    out, ref = reqs.decode_step(backend, layer)
    assert not backend.releases_slots and backend.session.slots_released == 0
    assert backend.tier_stats()["host_tokens"] > 0  # stage 1: still tiered, device KV kept on both sides
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    _free_row(runner, 0, reqs.k[0].shape[0])
    assert runner.token_to_kv_pool_allocator.available_size() == runner.token_to_kv_pool_allocator.size


def test_free_kv_row_ranges_lose_exactly_the_released_positions():
    assert lifecycle.subtract([(0, 100)], (16, 64)) == [(0, 16), (64, 100)]
    assert lifecycle.subtract([(0, 10), (20, 30)], (5, 25)) == [(0, 5), (25, 30)]
    assert lifecycle.subtract([(0, 100)], (16, 16)) == [(0, 100)]
    assert lifecycle.subtract([(32, 48)], (16, 64)) == []


def test_launch_keeps_prefix_caching_on_its_own_cache_or_turns_it_off(tmp_path, tiny_model, capsys):
    import argparse

    config = load(_tier_yaml(tmp_path))
    ns = argparse.Namespace(disable_radix_cache=False, enable_mixed_chunk=False)
    launch.apply_to_namespace(ns, config)
    assert ns.decode_attention_backend == launch.BACKEND
    if prefix.registry_present():  # the 0.5.23 line: the kvtier radix cache
        assert not ns.disable_radix_cache and ns.radix_cache_backend == prefix.NAME
        assert prefix.NAME in __import__("sglang.srt.mem_cache.registry", fromlist=["x"]).registered_radix_cache_backends()
    else:
        assert ns.disable_radix_cache
    if prefix.registry_present():  # what the scheduler's tree-cache factory builds from that name
        from types import SimpleNamespace

        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.registry import get_radix_cache_factory

        backend, _, runner = _stage2_backend(disable_radix_cache=False, radix_cache_backend=prefix.NAME,
                                             prefill_backend=launch.PREFILL_BACKEND)
        params = CacheInitParams(disable=False, req_to_token_pool=runner.req_to_token_pool,
                                 token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, page_size=1)
        tree = get_radix_cache_factory(prefix.NAME)(SimpleNamespace(params=params, is_hybrid_swa=False,
                                                                    is_hybrid_ssm=False))
        assert isinstance(tree, prefix.cache_class()) and lifecycle.cache_of(runner.req_to_token_pool) is tree
        with pytest.raises(launch.KvTierLaunchError, match="full-attention models only"):
            get_radix_cache_factory(prefix.NAME)(SimpleNamespace(params=params, is_hybrid_swa=True))
    # Another radix cache, or prefill kept off the tier: prefix caching goes off, and the operator is told.
    for other in (dict(radix_cache_backend="flexkv"), dict(prefill_attention_backend="triton")):
        ns = argparse.Namespace(disable_radix_cache=False, enable_mixed_chunk=False, **other)
        launch.apply_to_namespace(ns, config)
        assert ns.disable_radix_cache
        assert "prefix caching is off under an offloading policy" in capsys.readouterr().err


def test_launch_refuses_mixed_chunks(tmp_path, tiny_model):
    import argparse

    config = load(_tier_yaml(tmp_path))
    assert "enable-mixed-chunk" in launch.tier_refusals(argparse.Namespace(enable_mixed_chunk=True), config)
    r = _launch("--model-path", str(tiny_model), "--kv-tier", str(_tier_yaml(tmp_path)), "--enable-mixed-chunk")
    assert r.returncode == 2 and "--enable-mixed-chunk" in r.stderr


def test_launch_chooses_breakable_decode_graphs_where_they_can_run(tmp_path, monkeypatch, capsys):
    import argparse
    import importlib.machinery
    import importlib.util

    config = load(_tier_yaml(tmp_path))

    def launched(**fields):
        ns = argparse.Namespace(**{"disable_radix_cache": False, "enable_mixed_chunk": False, "device": "cuda",
                                   "cuda_graph_backend_decode": None, **fields})
        launch.apply_to_namespace(ns, config)
        return ns.cuda_graph_backend_decode, capsys.readouterr().err

    real = importlib.util.find_spec
    present = importlib.machinery.ModuleSpec("cuda.bindings", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: present if name == "cuda.bindings" else real(name, *a))
    mode, err = launched()  # the default where cuda-python is there
    assert mode == "breakable" and "CUDA graphs" not in err
    mode, err = launched(cuda_graph_backend_decode="disabled")  # eager, as asked
    assert mode == "disabled" and "CUDA graphs" not in err
    mode, err = launched(cuda_graph_backend_decode="full")
    assert mode == "disabled" and "would record the tier's attention" in err and "breakable" in err
    mode, err = launched(cuda_graph_backend_decode="breakable")
    assert mode == "breakable" and "CUDA graphs" not in err
    for off in ({"disable_cuda_graph": True}, {"disable_decode_cuda_graph": True}):
        assert launched(cuda_graph_backend_decode="breakable", **off)[0] == "disabled", off
    mode, err = launched(cuda_graph_backend_decode="breakable", device="cpu")
    assert mode == "disabled" and "CUDA device" in err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cuda.bindings" else real(name, *a))
    mode, err = launched(cuda_graph_backend_decode="breakable")
    assert mode == "disabled" and "cuda-python" in err
    mode, err = launched()
    assert mode == "disabled" and "cuda-python" in err
    # The dense policy leaves sglang's own graphs alone.
    ns = argparse.Namespace(device="cuda", cuda_graph_backend_decode=None)
    launch.apply_to_namespace(ns, loads_dense())
    assert ns.cuda_graph_backend_decode is None


def loads_dense():
    from kvtier.config import loads

    return loads("policy: dense\n", "<test>")


def test_breakable_graphs_keep_a_causal_lms_decode_output():
    """sglang's breakable graph backend buffers the decode output per captured size; the hooks add
    the LogitsProcessorOutput a causal LM returns (sglang raises 'Unsupported BCG output type')."""
    import pkgutil

    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    from kvtier_sglang import graphs

    assert graphs.targets() and not [t for t in graphs.targets() if t in plugin.missing_hooks()]
    bcg = object.__new__(pkgutil.resolve_name(graphs.BCG))
    captured = LogitsProcessorOutput(next_token_logits=torch.randn(8, 32), hidden_states=torch.randn(8, 16))
    buf = bcg._alloc_full_buffer(captured, 8)
    assert buf.next_token_logits.shape == (8, 32) and buf.hidden_states.shape == (8, 16)
    small = LogitsProcessorOutput(next_token_logits=torch.randn(4, 32), hidden_states=torch.randn(4, 16))
    assert bcg._output_rows(small, 8) == 4
    bcg._copy_output_to_buffer(small, buf, 4)
    view = bcg._slice_output(buf, 4)
    assert isinstance(view, LogitsProcessorOutput) and view.next_token_logits.data_ptr() == buf.next_token_logits.data_ptr()
    assert torch.equal(view.next_token_logits, small.next_token_logits) and torch.equal(view.hidden_states, small.hidden_states)
    with pytest.raises(ValueError, match="changed between capture sizes"):
        bcg._copy_output_to_buffer(LogitsProcessorOutput(next_token_logits=torch.randn(4, 32)), buf, 4)
    t = torch.randn(6, 3)  # other outputs: sglang's own code
    assert bcg._alloc_full_buffer(t, 8).shape == (8, 3)


class _SegmentedCapture:
    """The part of sglang's BreakableCUDAGraphCapture that its eager_on_graph wrapper talks to
    (the CUDA graph segments themselves need a GPU): the breaks it registers, in order."""

    def __init__(self):
        from types import SimpleNamespace

        self.cuda_graph = SimpleNamespace(_break_fns=[])
        self._barrier_fn = None
        self.segments = 1

    def _end_current_segment(self):
        pass

    def _begin_new_segment(self):
        self.segments += 1


def test_breakable_graph_capture_leaves_the_tier_alone_and_replay_serves_the_real_rows(monkeypatch):
    """sglang's breakable decode graph, as the backend sees it: a capture on a dummy batch through
    sglang's own eager_on_graph wrapper, then replays of the break it registered, each after the
    plan of a batch padded to the captured size."""
    from types import SimpleNamespace

    import sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.breakable_cuda_graph as bcg
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    torch.manual_seed(7)
    backend, layer, runner = _stage2_backend()
    reqs = _Requests(runner, [150, 40])
    out, ref = reqs.decode_step(backend, layer)  # eager: builds the tier
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)

    runner.server_args.cuda_graph_backend_decode = "full"
    with pytest.raises(launch.KvTierLaunchError, match="breakable"):
        backend.init_cuda_graph_state(4, 4)
    runner.server_args.cuda_graph_backend_decode = "breakable"
    backend.init_cuda_graph_state(4, 4)
    assert backend._decode_break is not backend._decode_in_graph  # sglang's eager_on_graph wrapper

    # Capture (and its warm-up) on sglang's dummy batch: placeholders, and the tier is untouched.
    stats, tracked = backend.tier_stats(), set(backend.session.tier.requests)
    dummy = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=4, req_pool_indices=torch.zeros(4, dtype=torch.long),
                            seq_lens=torch.ones(4, dtype=torch.long), seq_lens_cpu=torch.ones(4, dtype=torch.long),
                            out_cache_loc=torch.zeros(4, dtype=torch.long))
    backend.init_forward_metadata_out_graph(dummy, in_capture=True)
    q4, k4, v4 = torch.randn(4, 4 * 64), torch.randn(4, 2, 64), torch.randn(4, 2, 64)
    warm = backend.forward_decode(q4, k4, v4, layer, dummy)  # the warm-up: the break's body, eagerly
    assert warm.shape == (4, 4 * 64) and not warm.any()
    capture = _SegmentedCapture()
    monkeypatch.setattr(bcg, "_weak_ref_if_tensor", lambda x: x)  # sglang's weak refs need CUDA
    token = bcg._current_capture_var.set(capture)
    try:
        captured = backend.forward_decode(q4, k4, v4, layer, dummy)
    finally:
        bcg._current_capture_var.reset(token)
    assert capture.segments == 2 and len(capture.cuda_graph._break_fns) == 1  # the graph broke at attention
    assert captured.data_ptr() == warm.data_ptr() and not captured.any()
    assert backend.tier_stats() == stats and set(backend.session.tier.requests) == tracked
    replay_break = capture.cuda_graph._break_fns[0]

    # Replays: two real rows padded to the captured four; the graph's static buffers hold q, k, v.
    for _ in range(3):
        loc = runner.token_to_kv_pool_allocator.alloc(2)
        pos = [reqs.k[r].shape[0] for r in reqs.rows]
        for row, p, slot in zip(reqs.rows, pos, loc.tolist()):
            runner.req_to_token_pool.req_to_token[row, p] = slot
        lens = torch.tensor([p + 1 for p in pos] + [1, 1])
        view = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=4, num_padding=2,
                               req_pool_indices=torch.tensor(reqs.rows + [0, 0]), seq_lens=lens, seq_lens_cpu=lens,
                               out_cache_loc=loc)
        backend.init_forward_metadata_out_graph(view)
        q4.copy_(torch.randn(4, 4 * 64))
        k4.copy_(torch.randn(4, 2, 64))
        v4.copy_(torch.randn(4, 2, 64))
        out = replay_break()  # what BreakableCUDAGraph.replay runs between two segments
        assert out.data_ptr() == captured.data_ptr()  # the next segment's input, refreshed in place
        for i, row in enumerate(reqs.rows):
            reqs.k[row] = torch.cat([reqs.k[row], k4[i:i + 1]])
            reqs.v[row] = torch.cat([reqs.v[row], v4[i:i + 1]])
        ref = []
        for i, row in enumerate(reqs.rows):
            qi = q4[i].view(2, 2, 64).double()
            s = torch.einsum("hgd,nhd->hgn", qi, reqs.k[row].double()) * layer.scaling
            ref.append(torch.einsum("hgn,nhd->hgd", s.softmax(-1), reqs.v[row].double()).reshape(-1))
        torch.testing.assert_close(out[:2], torch.stack(ref).float(), rtol=2e-2, atol=2e-2)
        assert not out[2:].any()
    assert backend.session.tier.requests[0].length == reqs.k[0].shape[0]
    assert backend.tier_stats()["host_tokens"] > 0


def test_the_decode_plan_refuses_to_be_recorded_into_a_graph(monkeypatch):
    """sglang 0.5.23 can capture a replay's metadata call into a graph of its own (opt-in); the
    backend raises before touching anything, and sglang then calls it eagerly."""
    from types import SimpleNamespace

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    backend, layer, runner = _stage2_backend()
    reqs = _Requests(runner, [150, 40])
    reqs.decode_step(backend, layer)
    stats = backend.tier_stats()
    lens = torch.tensor([151, 41])
    view = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=2, num_padding=0,
                           req_pool_indices=torch.tensor(reqs.rows), seq_lens=lens, seq_lens_cpu=lens,
                           out_cache_loc=torch.zeros(2, dtype=torch.long))
    monkeypatch.setattr(backend, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured"):
        backend.init_forward_metadata_out_graph(view)
    assert backend.tier_stats() == stats and backend._graph_rows == 0


def test_a_full_host_store_keeps_pages_on_the_gpu_instead_of_failing_the_step():
    torch.manual_seed(2)
    # Room for 4 host pages (8 KiB each here): the first request's 3 fit, the second's 14 do not.
    backend, layer, runner = _stage2_backend(capacity_gib=4 * 8192 / 2 ** 30)
    reqs = _Requests(runner, [120, 300])
    for _ in range(2):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    stats = backend.tier_stats()
    assert stats["evictions_refused"] > 0 and stats["host_tokens"] == 3 * 16  # 3 pages of the first request
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    alloc = runner.token_to_kv_pool_allocator
    n, distinct = _free_slot_census(alloc)
    assert n == distinct and alloc.available_size() == alloc.size


def test_stats_interval_comes_from_the_environment(monkeypatch):
    from kvtier_sglang import backend as kb

    monkeypatch.delenv("KVTIER_STATS_INTERVAL_S", raising=False)
    assert kb.stats_interval_s() == kb.STATS_EVERY_S
    monkeypatch.setenv("KVTIER_STATS_INTERVAL_S", "0.5")
    assert kb.stats_interval_s() == 0.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("KVTIER_STATS_INTERVAL_S", bad)
        with pytest.raises(launch.KvTierLaunchError, match="KVTIER_STATS_INTERVAL_S: expected a number of seconds > 0"):
            kb.stats_interval_s()


def test_the_statistics_line_says_where_decode_steps_spend_their_time(monkeypatch, caplog):
    """Every decode step after the first is timed from plan to plan, with its attention and
    the engine's share; a prefill in between starts the count over."""
    import logging

    from kvtier_sglang import backend as kb

    monkeypatch.setenv("KVTIER_STATS_INTERVAL_S", "1e-9")  # a statistics line at every decode step
    torch.manual_seed(6)
    backend, layer, runner = _stage2_backend()
    reqs = _Requests(runner, [300, 40])
    with caplog.at_level(logging.INFO, logger="kvtier"):
        for _ in range(3):
            reqs.decode_step(backend, layer)
    lines = [r.getMessage() for r in caplog.records if "ms/step" in r.getMessage()]
    # the first step has no earlier plan to be timed from: two lines, one step each
    assert len(lines) == 2 and all(line.startswith("kvtier: decode 1 steps, ") for line in lines), lines
    from kvtier_sglang import serve_check  # it reads these lines back from a server's log

    assert serve_check.decode_steps(lines)["steps"] == 2
    t = backend.session.last_timing
    assert t["steps"] == 1 and t["step_ms"] > 0 and t["plan_ms"] > 0
    # one layer, pages on the host: the engine ran inside the attention, both inside the step
    assert 0 < t["engine_ms"] <= t["attention_ms"] < t["step_ms"]
    reqs.extend_step(backend, layer, {0: 8, 1: 8})  # a prefill chunk ends the chain of decode steps
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvtier"):
        reqs.decode_step(backend, layer)
    assert backend.session.clock.take() is None and not [r for r in caplog.records if "ms/step" in r.getMessage()]
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])


def test_prometheus_metrics_follow_the_tier(monkeypatch):
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from kvtier_sglang import backend as kb
    from kvtier_sglang import metrics

    assert metrics.for_server(SimpleNamespace(enable_metrics=False)) is None
    assert metrics.enabled(SimpleNamespace(enable_metrics=True))
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "for_server", lambda server_args, registry_=None: metrics.TierMetrics(registry))
    monkeypatch.setattr(kb, "METRICS_EVERY_S", 0.0)
    torch.manual_seed(4)
    backend, layer, runner = _stage2_backend()
    reqs = _Requests(runner, [300, 40])
    for _ in range(3):
        reqs.decode_step(backend, layer)
    stats = backend.tier_stats()
    assert stats["slots_released"] > 0 and stats["pages_evicted"] > 0 and stats["requests"] == 2

    def value(name, suffix=""):
        return registry.get_sample_value(f"kvtier:{name}{suffix}", {"tp_rank": "0"})

    # the metrics lag the tier by at most the step that has just run its plan
    for name in ("requests", "device_tokens", "host_tokens"):
        assert value(name) == stats[name], name
    for name in ("slots_released", "bytes_d2h", "pages_evicted", "evictions_refused"):
        assert value(name, "_total") == stats[name], name
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])


# --- stage 3: prefill in chunks that evict as they go ---------------------------------------------------


def _used(alloc):
    return alloc.size - alloc.available_size()


def test_stage3_chunked_prefill_evicts_between_chunks_and_matches_dense(caplog):
    caplog.set_level("INFO", logger="kvtier")
    torch.manual_seed(5)
    backend, layer, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    assert backend.stage3
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [0, 0])
    prompt, chunk = {0: 700, 1: 300}, 96
    bound = admission.device_bound(backend, chunk)
    assert bound == 16 + 64 + 2 * 16 + 2 * chunk + 1  # sinks, window, 2 pages, 2 chunks, an sglang page
    peak, hybrid_chunks = 0, 0
    while any(reqs.k[r].shape[0] < n for r, n in prompt.items()):
        step = {r: min(chunk, n - reqs.k[r].shape[0]) for r, n in prompt.items() if reqs.k[r].shape[0] < n}
        out, ref = reqs.extend_step(backend, layer, step)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        hybrid_chunks += backend._extend_hybrid
        peak = max(peak, _used(alloc))
        _poison_free_slots(runner)
    # Later chunks attended host pages; the pool never held more than each request's bound,
    # though the prompts (1000 tokens) are far longer than that.
    assert hybrid_chunks >= 5 and backend.session.slots_released > 0
    assert peak <= 2 * bound < sum(prompt.values())
    assert "prefill chunks evict as they go (stage 3)" in caplog.text  # the operator is told
    for _ in range(3):  # decode continues from the tiers the prefill left
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for row in reqs.rows:
        _free_row(runner, row, reqs.k[row].shape[0])
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"


def test_stage3_chunks_with_int8_keys_and_a_token_budget_stay_close():
    # Prefill attends the host part exactly (dequantized keys), whatever the decode budget.
    torch.manual_seed(6)
    backend, layer, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND, keys="int8",
                                             budget="{kind: tokens, tokens: 32}")
    reqs = _Requests(runner, [0])
    errs = []
    for _ in range(6):
        out, ref = reqs.extend_step(backend, layer, {0: 80})
        errs.append(((out - ref).norm() / ref.norm()).item())
        _poison_free_slots(runner)
    assert backend._extend_hybrid and max(errs) < 2e-2, errs
    _free_row(runner, 0, reqs.k[0].shape[0])
    assert runner.token_to_kv_pool_allocator.available_size() == runner.token_to_kv_pool_allocator.size


def test_stage3_stays_off_unless_prefill_comes_to_the_tier():
    backend, _, _ = _stage2_backend()
    assert not backend.stage3 and "prefill" in backend.mode.why_not_higher
    backend, _, _ = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND, disable_radix_cache=False)
    assert not backend.stage3


def test_launch_routes_prefill_to_the_tier_under_an_offloading_policy(tmp_path):
    import argparse

    ns = argparse.Namespace(disable_radix_cache=False, enable_mixed_chunk=False)
    launch.apply_to_namespace(ns, load(_tier_yaml(tmp_path)))
    assert ns.prefill_attention_backend == launch.PREFILL_BACKEND
    ns = argparse.Namespace(disable_radix_cache=True, enable_mixed_chunk=False, prefill_attention_backend="triton")
    launch.apply_to_namespace(ns, load(_tier_yaml(tmp_path)))
    assert ns.prefill_attention_backend == "triton"  # the user's choice stands (stage 3 off)


def test_both_backend_names_give_the_runner_one_instance(monkeypatch, tmp_path):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from kvtier_sglang import attention

    monkeypatch.setenv("KVTIER_CONFIG", str(_tier_yaml(tmp_path)))
    _, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    decode = ATTENTION_BACKENDS[launch.BACKEND](runner)  # as sglang builds its two backends
    assert ATTENTION_BACKENDS[launch.PREFILL_BACKEND](runner) is decode is attention.create_backend(runner)


def test_stage3_lifts_the_input_cap_to_the_context_or_host_capacity():
    from types import SimpleNamespace

    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    runner.model_config = SimpleNamespace(context_len=100_000)
    worker = SimpleNamespace(model_runner=runner)
    pool = runner.token_to_kv_pool_allocator.size
    info = (pool, 16384, 4, 100, pool - 1, pool - 6, 0, "cpu", None, 1, 2, 3)
    lifted = admission.lift_input_cap(info, worker)
    longest = min(100_000 - 1, pool + backend.host_capacity_tokens())
    assert lifted[4] == longest and lifted[5] == longest - 5 and lifted[:4] == info[:4] and lifted[6:] == info[6:]
    off, _, runner2 = _stage2_backend()
    runner2.model_config = runner.model_config
    assert admission.lift_input_cap(info, SimpleNamespace(model_runner=runner2)) is None


def _budget_adder(alloc, **fields):
    """A PrefillAdder's budget state over the real allocator, as this sglang keeps it: the 0.5.23
    line's PrefillBudget (its own remaining_total), or 0.5.17's offsets on the adder with
    remaining = available - rem_total_token_offset, as its rem_total_tokens property computes."""
    from types import SimpleNamespace

    try:
        from sglang.srt.mem_cache.prefill_budget import PrefillBudget
    except ImportError:
        adder = SimpleNamespace(token_to_kv_pool_allocator=alloc, rem_total_token_offset=0, cur_rem_token_offset=0,
                                **fields)
        return adder, lambda: alloc.available_size() - adder.rem_total_token_offset, \
            lambda: (adder.rem_total_token_offset, adder.cur_rem_token_offset)
    tree = SimpleNamespace(supports_mamba=lambda: False, evictable_size=lambda: 0)
    budget = PrefillBudget(alloc, tree)
    adder = SimpleNamespace(token_to_kv_pool_allocator=alloc, memory_budget=budget, **fields)
    return adder, lambda: budget.remaining_total, lambda: (budget.total_offset, budget.current_offset)


def test_stage3_admission_lends_the_prompt_beyond_the_device_bound():
    from types import SimpleNamespace

    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    backend.prefill_chunk_tokens = 128
    alloc = runner.token_to_kv_pool_allocator
    adder, remaining, offsets = _budget_adder(alloc, rem_chunk_tokens=128)  # sglang's accounting of the pool
    seen = []

    def original(adder_, req):  # sglang's rule: the prompt plus its decode budget must fit what is free
        seen.append(remaining())
        return len(req.full_untruncated_fill_ids) + 32 < remaining()

    def request(n, max_new=32):
        return SimpleNamespace(prefix_len=0, full_untruncated_fill_ids=[0] * n, output_ids=[],
                               sampling_params=SimpleNamespace(max_new_tokens=max_new))

    bound = admission.device_bound(backend, 128)
    long = request(5000)
    assert 5000 > alloc.size and admission.add_one_req(original, adder, long)
    assert seen[-1] == alloc.size + 5032 - bound  # what stage 3 lends for the call...
    assert remaining() == alloc.size and offsets() == (0, 0)  # ...is paid back after it
    assert admission.credit(adder, request(100)) == 0
    huge = request(backend.host_capacity_tokens() + 2000)
    assert admission.credit(adder, huge) == 0 and not admission.add_one_req(original, adder, huge)
    assert admission.credit(SimpleNamespace(**{**vars(adder), "rem_chunk_tokens": None}), long) == 0
    # the 0.5.17 spelling of the same offsets
    old = SimpleNamespace(token_to_kv_pool_allocator=alloc, rem_chunk_tokens=128, rem_total_token_offset=7,
                          cur_rem_token_offset=3)
    admission.add_one_req(lambda a, r: seen.append((a.rem_total_token_offset, a.cur_rem_token_offset)), old, long)
    assert seen[-1] == (7 - (5032 - bound), 3 - (5032 - bound))
    assert (old.rem_total_token_offset, old.cur_rem_token_offset) == (7, 3)
    off, _, runner2 = _stage2_backend()  # stage 3 off: nothing lent
    assert admission.credit(SimpleNamespace(**{**vars(adder), "token_to_kv_pool_allocator":
                                              runner2.token_to_kv_pool_allocator}), long) == 0


def test_stage3_decode_budget_counts_the_host_store_too():
    from types import SimpleNamespace

    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    alloc = runner.token_to_kv_pool_allocator

    def original(sched, req):  # sglang 0.5.17's clamp: prompt + decode budget must fit the pool
        n = len(req.origin_input_ids)
        req.sampling_params.max_new_tokens = max(0, min(req.sampling_params.max_new_tokens,
                                                        sched.max_total_num_tokens - n - 1 - 1))

    sched = SimpleNamespace(token_to_kv_pool_allocator=alloc, max_total_num_tokens=alloc.size)
    req = SimpleNamespace(origin_input_ids=[0] * 5000, sampling_params=SimpleNamespace(max_new_tokens=32))
    admission.init_max_new_tokens(original, sched, req)
    assert req.sampling_params.max_new_tokens == 32 and sched.max_total_num_tokens == alloc.size
    _, _, runner2 = _stage2_backend()  # stage 3 off: sglang's clamp leaves a prompt longer than the pool nothing
    sched2 = SimpleNamespace(token_to_kv_pool_allocator=runner2.token_to_kv_pool_allocator,
                             max_total_num_tokens=runner2.token_to_kv_pool_allocator.size)
    req2 = SimpleNamespace(origin_input_ids=[0] * 5000, sampling_params=SimpleNamespace(max_new_tokens=32))
    admission.init_max_new_tokens(original, sched2, req2)
    assert req2.sampling_params.max_new_tokens == 0


def test_stage3_two_prompts_cannot_both_count_on_the_same_host_pages():
    from types import SimpleNamespace

    # A host store of about 8000 tokens: one 5000-token prompt fits it, two do not.
    backend, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND, capacity_gib=8000 * 544 / 2 ** 30)
    backend.prefill_chunk_tokens = 128
    assert 5000 < backend.host_capacity_tokens() < 2 * 4900
    alloc = runner.token_to_kv_pool_allocator
    adder, remaining, _ = _budget_adder(alloc, rem_chunk_tokens=128, can_run_list=[])

    def original(adder_, req):
        fits = len(req.full_untruncated_fill_ids) + 32 < remaining()
        if fits:
            adder_.can_run_list.append(req)
        return fits

    class Req:  # sglang's Req is a plain class: hashable by identity, weakly referenceable
        def __init__(self, **fields):
            self.__dict__.update(fields)

    def request():
        return Req(prefix_len=0, full_untruncated_fill_ids=[0] * 5000, output_ids=[], req_pool_idx=None,
                   sampling_params=SimpleNamespace(max_new_tokens=32), finished=lambda: False)

    first, second = request(), request()
    assert admission.add_one_req(original, adder, first)
    assert admission.owed(backend) == 5032 - 16 - 64
    assert admission.credit(adder, second) == 0 and not admission.add_one_req(original, adder, second)
    first.finished = lambda: True  # once the first is done, the second is lent its share
    assert admission.owed(backend) == 0 and admission.add_one_req(original, adder, second)


def test_stage3_a_prompt_aborted_between_chunks_frees_everything_once():
    """sglang aborts a chunked prefill through the same row release as a finished request: the
    slots the tier already gave back are not freed again, and the host pages go with the row."""
    torch.manual_seed(8)
    backend, layer, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    alloc = runner.token_to_kv_pool_allocator
    reqs = _Requests(runner, [0])
    before = backend.host_capacity_tokens()  # what admission counts before the store exists
    for _ in range(4):
        reqs.extend_step(backend, layer, {0: 96})
    assert backend.host_capacity_tokens() == before > 0  # the store the first batch built holds that
    # the next chunk is written to the row but never runs: the request is aborted before it
    pending = alloc.alloc(96)
    runner.req_to_token_pool.req_to_token[0, 384:480] = pending.to(torch.int32)
    assert backend.tier_stats()["host_tokens"] > 0 and backend.session.slots_released > 0
    # what admission counts as this request's host tokens: its allocated pages (landed here on the CPU)
    assert backend.host_tokens_of(0) == backend.session.tier.host_tokens(0) > 0 and backend.host_tokens_of(7) == 0
    _free_row(runner, 0, 480)
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"
    stats = backend.tier_stats()
    assert stats["requests"] == 0 and stats["host_tokens"] == 0
    assert backend.session.tier.store.stats().used_pages == 0


def test_a_runner_that_cannot_hold_the_backend_is_refused_clearly(monkeypatch, tmp_path):
    from kvtier_sglang import attention

    monkeypatch.setenv("KVTIER_CONFIG", str(_tier_yaml(tmp_path)))  # how a scheduler finds the policy
    _, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)

    class Sealed:  # what a runner with __slots__ would do
        __slots__ = tuple(vars(runner))

    sealed = Sealed()
    for name, value in vars(runner).items():
        setattr(sealed, name, value)
    with pytest.raises(launch.KvTierLaunchError, match="refused it"):
        attention.create_backend(sealed)


# --- prefix caching over host-resident pages (the kvtier radix cache, prefix.py) --------------------------


def test_usable_prefix_is_sinks_whole_host_pages_in_order_then_device_slots():
    S, T = 2, 4
    enc = lambda pages: prefix.encode(torch.tensor([p * T + o for p in pages for o in range(T)]))  # noqa: E731
    dev = lambda *xs: torch.tensor(xs)  # noqa: E731
    row = torch.cat([dev(5, 6), enc([7, 3]), dev(9, 10, 11)])
    assert prefix.usable_prefix(row, S, T) == row.numel()
    assert prefix.usable_prefix(row[:7], S, T) == 6  # a partial page ends the prefix before it
    assert prefix.usable_prefix(row[:1], S, T) == 1
    assert prefix.usable_prefix(torch.cat([row, enc([1])]), S, T) == row.numel()  # a second host run
    swapped = row.clone()
    swapped[[2, 3]] = swapped[[3, 2]]  # offsets out of order in the first page
    assert prefix.usable_prefix(swapped, S, T) == S
    assert prefix.usable_prefix(torch.cat([enc([1])[:1], row[1:]]), S, T) == 0  # an address among the sinks
    assert torch.equal(prefix.decode(prefix.encode(torch.arange(9))), torch.arange(9))


@pytest.fixture
def prefix_server():
    """The kvtier backend and the kvtier radix cache over sglang's real pools and allocator."""
    if not prefix.registry_present():
        pytest.skip("this sglang has no radix-cache registry; the kvtier radix cache needs the 0.5.23 line")
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    backend, layer, runner = _stage2_backend(disable_radix_cache=False, radix_cache_backend=prefix.NAME,
                                             prefill_backend=launch.PREFILL_BACKEND, size=4096)
    assert backend.stage3 and backend.prefix_cache
    tree = prefix.cache_class()(CacheInitParams(disable=False, req_to_token_pool=runner.req_to_token_pool,
                                                token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator,
                                                page_size=1))
    return backend, layer, runner, tree


def _key(tokens):
    from array import array

    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    # The token container sglang keys its tree with: an array on the 0.5.23 line, a list on 0.5.17.
    return RadixKey(array("q", tokens) if hasattr(RadixCache, "checkpoint") else list(tokens))


def _unlock(tree, lock):
    if hasattr(tree, "unlock"):
        tree.unlock(lock)
    else:
        tree.dec_lock_ref(lock)


def _pool_invariant(runner, tree):
    alloc = runner.token_to_kv_pool_allocator
    return alloc.available_size() + tree.evictable_size() + tree.protected_size() == alloc.size


def _start_on_match(reqs, tree, row, src, tokens):
    """A new request in row whose prompt is `tokens`: the tree's match written into its row as
    sglang's allocation does, its K/V history the source request's (the same tokens)."""
    match = tree.match_prefix(__import__("sglang.srt.mem_cache.base_prefix_cache",
                                         fromlist=["x"]).MatchPrefixParams(key=_key(tokens)))
    if hasattr(match, "device_indices"):  # 0.5.17
        values = match.device_indices
        tree.inc_lock_ref(match.last_device_node)
        lock = match.last_device_node
    else:
        values = tree.path_device_indices(match.last_device_node)[:match.device_prefix_len]
        lock = tree.lock(match.last_device_node)
    m = values.numel()
    reqs.runner.req_to_token_pool.req_to_token[row, :m] = values.to(torch.int32)
    reqs.k[row], reqs.v[row] = src[0][:m].clone(), src[1][:m].clone()
    return m, lock


def _first_request(prefix_server, seed, n):
    """Request A (row 0) prefilled through the tier: n random tokens."""
    torch.manual_seed(seed)
    backend, layer, runner, tree = prefix_server
    reqs = _Requests(runner, [0, 0])
    tokens = torch.randint(0, 30000, (n,)).tolist()
    _prefill(reqs, backend, layer, {0: n})
    return backend, layer, runner, tree, runner.token_to_kv_pool_allocator, reqs, tokens


def test_a_prefix_hit_on_host_pages_is_attended_in_place(prefix_server):
    backend, layer, runner, tree, alloc, reqs, tokens_a = _first_request(prefix_server, 11, 700)
    reqs.rows = [0]
    for _ in range(2):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    reqs.rows = [1]  # request 0 finishes; its decode tokens extend its key
    tokens_a += torch.randint(0, 30000, (2,)).tolist()
    store = backend.session.tier.store
    src = (reqs.k[0].clone(), reqs.v[0].clone())
    _finish(tree, runner, 0, tokens_a)
    assert 0 not in backend.session.tier.requests
    # The tree keeps the whole request: the sinks and the tail in device slots, the middle as host
    # pages (pinned once per token), kept rather than freed with the request.
    assert tree.total_size() == 702 and store.cache_holds > 0
    assert store.stats().used_pages == store.cache_holds // 16
    assert tree.evictable_size() == 702 - store.cache_holds  # device tokens only
    assert _pool_invariant(runner, tree)

    # A second request shares 600 prompt tokens: the match stops at the last whole host page.
    S, T = 16, 16
    tokens_b = tokens_a[:600] + torch.randint(0, 30000, (108,)).tolist()
    m, lock = _start_on_match(reqs, tree, 1, src, tokens_b)
    assert m == S + (600 - S) // T * T == 592
    used_before = alloc.size - alloc.available_size()
    _prefill(reqs, backend, layer, {1: len(tokens_b)})  # the chunks after the match, against the dense reference
    assert backend.session.tier.host_tokens(1) >= m - S  # attended in place from the adopted pages
    stats = backend.tier_stats()
    assert stats["prefix_hit_host_tokens"] == m - S and stats["cached_host_tokens"] == store.cache_holds
    for _ in range(2):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    # Its 108 new tokens needed a window of device slots, not the prefix's 592 again.
    assert alloc.size - alloc.available_size() - used_before < 108 + 64 + 2 * 16 + 2
    tokens_b += [7, 8]
    _finish(tree, runner, 1, tokens_b, prefix_len=m, lock=lock)
    assert _pool_invariant(runner, tree)

    # Evicting the whole tree gives every slot and every host page back, each once.
    tree.evict(__import__("sglang.srt.mem_cache.base_prefix_cache", fromlist=["x"]).EvictParams(num_tokens=10**6))
    assert tree.total_size() == 0 and store.cache_holds == 0 and store.stats().used_pages == 0
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"


@pytest.mark.parametrize("tail_shared", [False, True])
def test_a_hit_on_a_device_tail_keeps_the_trees_slots_when_they_leave_the_window(prefix_server, tail_shared):
    """B starts on all of A (its device tail included) and moves on; when B finishes, the tree takes
    B's host copies of the tail in place of its slots (unless another request holds the tail), so a
    third request matches all of B."""
    backend, layer, runner, tree, alloc, reqs, tokens_a = _first_request(prefix_server, 12, 400)
    # A running request is not cached (the tier frees its slots as its window moves); its next
    # chunk continues from its row as under sglang's ChunkCache.
    from types import SimpleNamespace

    from sglang.srt.mem_cache.radix_cache import RadixCache

    if hasattr(RadixCache, "checkpoint"):
        from sglang.srt.managers.schedule_batch import ReqKvInfo

        tree.checkpoint(SimpleNamespace(kv=ReqKvInfo(req_pool_idx=0), finished=lambda: False), up_to=400)
    else:
        running = SimpleNamespace(req_pool_idx=0, extend_range=SimpleNamespace(end=400))
        tree.cache_unfinished_req(running, chunked=True)
        assert torch.equal(running.prefix_indices, runner.req_to_token_pool.req_to_token[0, :400].long())
    assert tree.total_size() == 0
    reqs.rows = [1]
    src = (reqs.k[0].clone(), reqs.v[0].clone())
    _finish(tree, runner, 0, tokens_a)
    tail = 400 - 16 - backend.session.tier.store.cache_holds  # A's device tail, now the tree's
    assert tail > 0
    # The whole of A matches: sinks, host pages, then the tree's device tail.
    tokens_b = tokens_a + torch.randint(0, 30000, (200,)).tolist()
    m, lock = _start_on_match(reqs, tree, 1, src, tokens_b)
    assert m == 400
    _prefill(reqs, backend, layer, {1: 600})
    for _ in range(3):
        out, ref = reqs.decode_step(backend, layer)
        torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    # The tail left B's window for the host, but its slots stayed the tree's: never freed by the tier.
    assert backend.session.tier.requests[1].host_end > 400
    lo, hi = backend.session.tier.freed_positions(1)
    assert lo == 400
    src_b = (reqs.k[1].clone(), reqs.v[1].clone())
    held = None
    if tail_shared:  # another request holds A's whole prefix, tail included
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

        held = tree.match_prefix(MatchPrefixParams(key=_key(tokens_a))).last_device_node
        tree.inc_lock_ref(held)
    free_before = alloc.available_size()
    _finish(tree, runner, 1, tokens_b + [1, 2, 3], prefix_len=m, lock=lock)
    assert _pool_invariant(runner, tree)
    m2, lock2 = _start_on_match(reqs, tree, 2, src_b, tokens_b)
    if tail_shared:
        # The tail stays a device run between host runs: a later match stops at its end.
        assert m2 == 400 and backend.session.tail_tokens_demoted == 0
        tree.dec_lock_ref(held)
        _unlock(tree, lock2)
        try:  # the row itself back, its prefix being the tree's
            from sglang.srt.managers.schedule_batch import ReqKvInfo

            kv = ReqKvInfo(req_pool_idx=2)
        except TypeError:  # 0.5.17
            kv = None
        runner.req_to_token_pool.free(SimpleNamespace(req_pool_idx=2, kv=kv))
    else:
        # The tail's slots went back to the allocator and B's host copies took their place.
        assert backend.session.tail_tokens_demoted == tail
        assert alloc.available_size() - free_before >= tail
        assert m2 == 600  # all of B's prompt: sinks, one run of host pages, B's device tail
        reqs.rows = [2]
        _prefill(reqs, backend, layer, {2: 650})
        for _ in range(2):
            out, ref = reqs.decode_step(backend, layer)
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        _finish(tree, runner, 2, tokens_b + torch.randint(0, 30000, (52,)).tolist(), prefix_len=m2, lock=lock2)
    assert _pool_invariant(runner, tree)
    tree.evict(__import__("sglang.srt.mem_cache.base_prefix_cache", fromlist=["x"]).EvictParams(num_tokens=10**6))
    n, distinct = _free_slot_census(alloc)
    assert n == distinct, "a slot was freed twice"
    assert alloc.available_size() == alloc.size, "a slot leaked"
    assert backend.session.tier.store.cache_holds == 0 and backend.session.tier.store.stats().used_pages == 0


def test_a_short_host_store_evicts_cached_prefixes_before_refusing(prefix_server):
    torch.manual_seed(13)
    backend, layer, runner, tree = prefix_server
    reqs = _Requests(runner, [0, 0])
    _prefill(reqs, backend, layer, {0: 500})
    tokens_a = list(range(500))
    reqs.rows = [1]
    _finish(tree, runner, 0, tokens_a)
    store = backend.session.tier.store
    held = store.stats().used_pages
    assert held > 0 and store.reclaim is not None
    # Fill the store up to the pages the tree holds: the next request's evictions need them back.
    filler = "filler"
    store.admit(filler, first_pos=0)
    store.allocate(filler, store.stats().free_pages)
    # Admission counts what the cache would give back as room: a new prompt does not wait on it.
    assert store.stats().free_pages == 0 and backend.host_free_tokens() == held * 16
    holds = store.cache_holds
    _prefill(reqs, backend, layer, {1: 300})
    # The tree gave pages back, least recently used first, so the running request's evictions went through.
    assert backend.session.tier.host_tokens(1) > 0 and backend.session.evictions_refused == 0
    assert store.cache_holds < holds
    store.release(filler)
