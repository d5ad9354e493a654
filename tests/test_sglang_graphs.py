"""Breakable CUDA graphs: the hooks for a causal LM's decode output, a capture that leaves the tier
alone and replays that serve the real rows, and a decode plan that refuses to be recorded.

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier_sglang import launch, plugin  # noqa: E402
from sglang_kit import registered  # noqa: E402, F401 - pytest finds fixtures by name
from sglang_kit import _Requests, _stage2_backend  # noqa: E402


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
