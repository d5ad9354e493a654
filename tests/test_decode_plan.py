"""A decode step's plan, once per step and without a Python int per page or per slot: the store's int32
page tables, the batch's host tables built from them, the window's plan, and a server's rows tracked from
its output locations instead of reads of its row table."""

from array import array

import pytest
import torch

from kvtier.config import ModelShape, from_mapping
from kvtier.runtime.session import TierSession
from kvtier.runtime.standalone import StandaloneTier
from kvtier.runtime.window_attention import plan_window, torch_window_attention
from kvtier.store import HostStore

SHAPE = ModelShape(n_layers=2, num_q_heads=4, kv_heads=2, head_dim=32)
WINDOW = {"sink_tokens": 4, "window_tokens": 32, "page_tokens": 16}


def _config(**extra):
    return from_mapping({"policy": "hgca", "window": WINDOW, "max_context_tokens": 4096, "budget": {"kind": "all"},
                         "engine": {"threads": 1}, **extra})


def _ids_match(store, rids):
    for r in rids:
        table = store.table(r)
        assert list(table.ids) == table.pages and table.ids.typecode == "i", r


def test_page_tables_keep_their_int32_ids_in_step_with_their_pages():
    store = HostStore(_config(host_store={"on_full": "evict"}), SHAPE, n_pages=12)
    try:
        store.admit("a", first_pos=4)
        store.allocate("a", 5)
        store.admit("b", first_pos=4)
        store.allocate("b", 3)
        store.drop_pages("a", [1, 3])  # from the middle
        _ids_match(store, "ab")
        store.share("a", "c", 2)
        store.adopt("d", first_pos=4, pages=store.table("b").pages[:2])
        _ids_match(store, "abcd")
        store.allocate("b", 7)  # one more than is free: the largest request's oldest pages go
        assert store.table("a").dropped_tokens > 2 * 16
        _ids_match(store, "abcd")
        store.release("c")
        store.allocate("c" if "c" in store else "a", 1)
        _ids_match(store, [r for r in "abcd" if r in store])
    finally:
        store.close()


def test_a_batch_host_tables_are_its_requests_pages_in_order(gen):
    tier = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=2048, host_tokens=4096)
    try:
        lens = {0: 300, 1: 20, 2: 170}  # 1 has nothing on the host yet
        for r, n in lens.items():
            tier.tier.add(r)
            tier.tier.prefill(r, n)
        tier.store.drop_pages(0, [2, 5])
        rids = [2, 1, 0]
        tier.attn.plan(rids)
        batch = tier.attn.host.batch
        T = WINDOW["page_tokens"]
        want = [tier.store.table(r).pages[: -(-tier.tier.host_tokens(r) // T)] if r in tier.store else [] for r in rids]
        off = batch.page_offsets.tolist()
        assert off == [0] + list(torch.tensor([len(w) for w in want]).cumsum(0).tolist())
        assert [batch.page_table[off[i]:off[i + 1]].tolist() for i in range(3)] == want
        assert batch.page_table.dtype == torch.int32 and batch.n_tokens.tolist() == batch.host_tokens
    finally:
        tier.close()


def test_append_is_extend_of_one_token_across_the_sinks():
    a = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=256, host_tokens=256)
    b = StandaloneTier(_config(), SHAPE, device="cpu", dtype=torch.float32, device_tokens=256, host_tokens=256)
    try:
        a.tier.add(0)
        b.tier.add(0)
        for i in range(60):  # sinks (4), then the window, then pages leave
            b.tier.append(0, int(a.tier.extend(0, 1)[0]))
            if i % 20 == 19:
                a.tier.evict()
                b.tier.evict()
        sa, sb = a.tier.requests[0], b.tier.requests[0]
        assert (sa.length, sa.host_end, list(sa.sink_slots), list(sa.recent_slots)) == \
            (sb.length, sb.host_end, list(sb.sink_slots), list(sb.recent_slots))
        assert sa.host_end > WINDOW["sink_tokens"]  # pages did leave
    finally:
        a.close()
        b.close()


class _Rows:
    """A server's row table (RowTable) that counts its reads."""

    def __init__(self, rows, width):
        self.table = torch.full((rows, width), -7, dtype=torch.long)
        self.reads = 0

    def read(self, row, lo, hi):
        self.reads += 1
        return self.table[row, lo:hi].clone()

    def write(self, row, lo, hi, values):
        self.table[row, lo:hi] = values


def _session(rows):
    k = [torch.randn(4096, SHAPE.kv_heads, SHAPE.head_dim) for _ in range(SHAPE.n_layers)]
    v = [torch.randn(4096, SHAPE.kv_heads, SHAPE.head_dim) for _ in range(SHAPE.n_layers)]
    session = TierSession(_config(host_store={"capacity_gib": 0.05}), rows=rows, free_slots=None)
    session.build(SHAPE, k, v, sm_scale=SHAPE.head_dim ** -0.5, soft_cap=0.0, use_flashinfer=False)
    return session


def test_plan_decode_takes_new_tokens_from_the_output_locations():
    rows_a, rows_b = _Rows(2, 512), _Rows(2, 512)
    a, b = _session(rows_a), _session(rows_b)
    try:
        lens = [100, 40]
        slots = torch.randperm(4096)[:2 * 512].view(2, 512)
        for rows in (rows_a, rows_b):
            rows.table[:] = slots
        a.plan_decode([0, 1], lens)
        b.plan_decode([0, 1], lens, new_slots=[-1, -1])  # new requests: read from the rows, not taken from here
        assert rows_b.reads == 2
        for step in range(40):
            lens = [n + 1 for n in lens]
            a.plan_decode([0, 1], lens)
            b.plan_decode([0, 1], lens, new_slots=[int(slots[0, lens[0] - 1]), int(slots[1, lens[1] - 1])])
        assert rows_b.reads == 2  # not one read per row and step
        for r in (0, 1):
            assert list(a.tier.device_slots(r)) == list(b.tier.device_slots(r))
            assert a.tier.host_tokens(r) == b.tier.host_tokens(r) > 0
        lens[1] += 3  # a row three tokens ahead of the tier's record: read from the row table
        b.plan_decode([0, 1], [lens[0], lens[1]], new_slots=[int(slots[0, lens[0] - 1]), 0])
        assert rows_b.reads == 3 and list(b.tier.device_slots(1))[-3:] == slots[1, lens[1] - 3:lens[1]].tolist()
    finally:
        a.close()
        b.close()


def test_window_plan_pads_once_per_step_and_only_for_the_torch_path(gen):
    slot_lists = [array("q", [5, 9, 2]), [7], array("q")]
    plan = plan_window(slot_lists, "cpu")
    assert plan.slots.tolist() == [[5, 9, 2], [7, 0, 0], [0, 0, 0]]
    assert plan.pad.tolist() == [[False] * 3, [False, True, True], [True] * 3]
    assert plan.indptr.tolist() == [0, 3, 4, 4] and plan.indices.tolist() == [5, 9, 2, 7]
    bare = plan_window(slot_lists, "cpu", padded=False)
    assert bare.slots is None and bare.pad is None and torch.equal(bare.indices, plan.indices)
    k, v = torch.randn(16, 2, 8, generator=gen), torch.randn(16, 2, 8, generator=gen)
    q = torch.randn(3, 4, 8, generator=gen)
    with_mask = torch_window_attention(q, k, v, plan, sm_scale=0.3)
    from_lens = torch_window_attention(q, k, v, plan._replace(pad=None), sm_scale=0.3)
    torch.testing.assert_close(with_mask.out, from_lens.out)
    assert with_mask.lse[2].isinf().all() and with_mask.out[2].eq(0).all()  # no slots: the empty part
    ref = torch.softmax(torch.einsum("hgd,nhd->hgn", q[0].view(2, 2, 8), k[[5, 9, 2]]) * 0.3, -1)
    torch.testing.assert_close(with_mask.out[0], torch.einsum("hgn,nhd->hgd", ref, v[[5, 9, 2]]).reshape(4, 8))
