"""The engine's serving loop (Engine.server): jobs fed through flags in shared memory.

On CUDA the GPU stream writes a job's layer, query and q_ready flag and waits
for far_ready; here the test thread plays the stream's part with plain stores,
so the loop's protocol and results are checked on any machine.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kvtier._native as N
from native_cases import make_case


def plan(eng, case, *, mode="mass", prefilter=0.0):
    store, table, offs, ntok, q = case
    budget = torch.full((len(ntok), store.kv_heads), 48, dtype=torch.int32)
    eng.plan(store, table, offs, ntok, q.shape[1], mode=mode, budget_tokens=budget, mass_threshold=0.9,
             sm_scale=1 / math.sqrt(q.shape[2]), prefilter=prefilter)


def feed(buf, slot, seq, layer, q):
    """What the stream does before it waits: query, layer, then the ready flag."""
    buf.q[slot].copy_(q)
    buf.layer[slot] = layer
    buf.q_ready[slot] = seq


def wait_far(buf, slot, seq, timeout=30.0):
    t0 = time.monotonic()
    while int(buf.far_ready[slot]) != seq:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"far_ready[{slot}] never reached {seq}")
        time.sleep(1e-4)


def small_case(seed, *, lengths=(50,), layers=1):
    case = make_case(D=64, T=16, lengths=lengths, layers=layers, seed=seed)
    return case, tuple(case[4].shape)


def split_far(buf, slot, shape):
    B, Hq, D = shape
    far = buf.far[slot]
    return far[: B * Hq * D].view(B, Hq, D), far[B * Hq * D:].view(B, Hq)


@pytest.mark.parametrize("prefilter", [0.0, 2.0])
def test_served_jobs_equal_direct_runs(prefilter):
    """Fresh random queries for a sequence of layers through 2 slots equal Engine.run on each."""
    case = make_case(D=64, T=16, G=4, lengths=(300, 0, 1000), layers=3, seed=11)
    B, Hq, D = case[4].shape
    g = torch.Generator().manual_seed(5)
    layers = [0, 1, 2, 2, 1, 0, 1]
    queries = [torch.randn(B, Hq, D, generator=g) for _ in layers]
    with N.Engine(2) as eng, ThreadPoolExecutor(1) as pool:
        plan(eng, case, prefilter=prefilter)
        want = [eng.run(layer, q) for layer, q in zip(layers, queries)]
        buf = N.ServeBuffers.allocate(2, B, Hq, D)
        first = 41
        fut = pool.submit(eng.server(buf, first_seq=first))
        for j, (layer, q) in enumerate(zip(layers, queries)):
            slot, seq = j % 2, first + j
            feed(buf, slot, seq, layer, q)
            wait_far(buf, slot, seq)
            out, lse = split_far(buf, slot, (B, Hq, D))
            assert torch.equal(out, want[j].out), f"job {j} (layer {layer}): out differs from Engine.run"
            assert torch.equal(lse, want[j].lse), f"job {j} (layer {layer}): lse differs from Engine.run"
        assert torch.isinf(lse[1]).all() and (lse[0] > -math.inf).all()  # the empty request has no host part
        buf.stop[0] = len(layers) + 1
        fut.result(timeout=30)
        assert int(buf.done[0]) == len(layers)
        assert float(buf.engine_seconds[0]) > 0.0
        plan(eng, case)  # serving ended: the engine plans again


def test_failed_job_still_completes_and_the_loop_raises_at_the_end():
    """A bad layer gives that job out 0 and lse -inf, later jobs still run, and the error comes back."""
    case, (B, Hq, D) = small_case(3, lengths=(200,), layers=2)
    with N.Engine(2) as eng, ThreadPoolExecutor(1) as pool:
        plan(eng, case)
        want = eng.run(1, case[4])
        buf = N.ServeBuffers.allocate(2, B, Hq, D)
        fut = pool.submit(eng.server(buf, first_seq=1))
        buf.far[0].fill_(7.0)  # stale contents must not survive a failed job
        feed(buf, 0, 1, 9, case[4])
        wait_far(buf, 0, 1)
        out, lse = split_far(buf, 0, (B, Hq, D))
        assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()
        feed(buf, 1, 2, 1, case[4])
        wait_far(buf, 1, 2)
        assert torch.equal(split_far(buf, 1, (B, Hq, D))[0], want.out)
        buf.stop[0] = 3
        with pytest.raises(N.NativeIndexError, match=r"layer in \[0, 2\), got 9"):
            fut.result(timeout=30)
        assert int(buf.done[0]) == 2


def test_a_job_that_never_comes_times_out_after_stop():
    case, (B, Hq, D) = small_case(4)
    with N.Engine(1) as eng, ThreadPoolExecutor(1) as pool:
        plan(eng, case)
        buf = N.ServeBuffers.allocate(1, B, Hq, D)
        fut = pool.submit(eng.server(buf, first_seq=1, timeout_s=0.2))
        buf.stop[0] = 2  # one job promised, never fed
        with pytest.raises(N.NativeTimeoutError, match="job 0 .* never received its query"):
            fut.result(timeout=30)
        assert int(buf.done[0]) == 0


def test_plan_is_refused_while_serving_and_the_server_checks_its_buffers():
    case, (B, Hq, D) = small_case(6)
    with N.Engine(1) as eng, ThreadPoolExecutor(1) as pool:
        with pytest.raises(N.NativeStateError, match="expected plan"):
            eng.server(N.ServeBuffers.allocate(1, B, Hq, D), first_seq=1)
        plan(eng, case)
        with pytest.raises(N.NativeValueError, match=r"q: expected shape"):
            eng.server(N.ServeBuffers.allocate(1, B + 1, Hq, D), first_seq=1)
        with pytest.raises(N.NativeValueError, match="first_seq"):
            eng.server(N.ServeBuffers.allocate(1, B, Hq, D), first_seq=0)
        with pytest.raises(N.NativeValueError, match="buf: expected ServeBuffers"):
            eng.server(object(), first_seq=1)
        buf = N.ServeBuffers.allocate(1, B, Hq, D)
        fut = pool.submit(eng.server(buf, first_seq=1))
        with pytest.raises(N.NativeStateError, match="serving"):
            plan(eng, case)
        buf.stop[0] = 1
        fut.result(timeout=30)
        plan(eng, case)


def plain_store_ops():
    """The stream's part played with plain stores and spins: write now, wait until the value is there."""
    import ctypes

    from kvtier.runtime.pipeline import StreamOps

    def write(stream, address, value):
        ctypes.c_int32.from_address(address).value = value

    def wait(stream, address, value):
        t0 = time.monotonic()
        while ctypes.c_int32.from_address(address).value < value:
            if time.monotonic() - t0 > 30:
                raise AssertionError(f"the value at {address:#x} never reached {value}")
            time.sleep(1e-5)

    return StreamOps(lambda t: t.data_ptr(), write, wait, lambda: None)


def test_engine_feed_hands_layers_over_and_restarts_after_a_stop():
    """The pipelined path's hand-off (EngineFeed): results equal Engine.run across two plans,
    a stop between them, and the sequence numbers starting over."""
    from kvtier.runtime import pipeline

    case, (B, Hq, D) = small_case(12, lengths=(400, 90), layers=3)
    g = torch.Generator().manual_seed(8)
    with N.Engine(2) as eng, ThreadPoolExecutor(1) as pool:
        feed = pipeline.EngineFeed(eng, pool, plain_store_ops(), pin_memory=False)
        for round_ in range(3):
            if round_ == 2:
                feed._seq = pipeline.SEQ_LIMIT  # the next start numbers jobs from 1 again
            plan(eng, case)
            jobs = [(layer, torch.randn(B, Hq, D, generator=g)) for layer in (0, 2, 1, 1, 0)]
            want = [eng.run(layer, q) for layer, q in jobs]
            try:
                for (layer, q), ref in zip(jobs, want):
                    slot, seq = feed.hand_off(None, q, layer)
                    assert feed.serving
                    out, lse = feed.result(None, slot, seq, "cpu")
                    assert torch.equal(out, ref.out) and torch.equal(lse, ref.lse)
            finally:
                assert feed.stop() > 0.0 and not feed.serving  # the loop ends also after a failure
            assert feed.stop() == 0.0  # nothing to stop
        assert feed._seq == 1 + len(jobs)


def test_engine_feed_with_a_slot_per_layer_stores_each_layer_flag_once():
    """With n_slots = layers and the layers in order, a slot's layer flag is stored only when it
    changes; results still equal Engine.run, also when the order breaks and several jobs are queued."""
    from kvtier.runtime import pipeline

    case, (B, Hq, D) = small_case(13, lengths=(300, 41), layers=3)
    ops = plain_store_ops()
    layer_writes = []

    def write(stream, address, value):
        if layer_at <= address < layer_at + 4 * 3:
            layer_writes.append(((address - layer_at) // 4, value))
        ops.write(stream, address, value)

    g = torch.Generator().manual_seed(9)
    with N.Engine(2) as eng, ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="n_slots"):
            pipeline.EngineFeed(eng, pool, ops, pin_memory=False, n_slots=1)
        feed = pipeline.EngineFeed(eng, pool, ops._replace(write=write), pin_memory=False, n_slots=3)
        layer_at = feed._addr[0]
        plan(eng, case)
        order = [0, 1, 2, 0, 1, 2, 2, 0, 1]  # two steps in order, then one out of order
        jobs = [(layer, torch.randn(B, Hq, D, generator=g)) for layer in order]
        want = [eng.run(layer, q) for layer, q in jobs]
        try:
            for i in range(0, len(jobs), 3):  # three queued before the first result is read
                handed = [feed.hand_off(None, q, layer) for layer, q in jobs[i: i + 3]]
                for (slot, seq), ref in zip(handed, want[i: i + 3]):
                    out, lse = feed.result(None, slot, seq, "cpu")
                    assert torch.equal(out, ref.out) and torch.equal(lse, ref.lse)
        finally:
            assert feed.stop() > 0.0  # also after a failure: the loop must end for the pool to close
    # slot 0 starts at layer 0: stored for slots 1 and 2 once, then each slot of the reordered step
    assert layer_writes == [(1, 1), (2, 2), (0, 2), (1, 0), (2, 1)]
