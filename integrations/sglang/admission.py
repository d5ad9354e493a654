"""Stage 3 admission: a long prompt needs a window and two chunks of the GPU pool, not its length.

sglang admits a request only when its whole remaining input plus its decode
budget fits the free pool, and it refuses inputs longer than the pool. Under
stage 3 (backend.py) the tier evicts before every prefill chunk, so a prompt
never holds more device slots than

    sinks + window + 2 pages + two chunks (+ one sglang page)   = device_bound()

Two chunks: sglang allocates a chunk's slots before the forward that evicts the
previous chunk's pages, and on CUDA those pages give their slots back only once
their copies have landed, at the next batch.

The hooks below make sglang count that bound for the prompt, for a scheduler
whose kvtier backend runs stage 3, and only while the host store can take the
rest (a request the host store cannot hold now waits; one larger than the
whole host store is refused at arrival by the lifted input cap). Decode
tokens leave the window the same way, so the bound covers them too.

- `lift_input_cap`, AFTER `TpModelWorker.get_worker_info`: the input cap
  becomes the model's context length or the pool plus the host store,
  whichever is smaller;
- `init_max_new_tokens`, AROUND `Scheduler.init_req_max_new_tokens`: the
  decode budget is clamped to what the pool plus the host store hold, not
  the pool alone (which would leave a prompt longer than the pool 0 tokens);
- `add_one_req`, AROUND `PrefillAdder.add_one_req`: for the call, the adder's
  offsets lend it the part of the prompt and decode budget that never sits
  on the device at once, on both of its admission paths (with and without
  ignore_eos). The
  offsets are `memory_budget.total_offset` / `current_offset` on the 0.5.23
  line and `rem_total_token_offset` / `cur_rem_token_offset` on 0.5.17.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Optional, Tuple

from . import lifecycle

# Requests admitted on credit -> host tokens they will need in all. Until they finish, what they
# have not stored yet is owed: a later request is lent only what the host store holds beyond it,
# so two long prompts admitted together cannot both count on the same free pages.
_PROMISED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
log = logging.getLogger("kvtier")

INPUT_CAP = "sglang.srt.managers.tp_worker.TpModelWorker.get_worker_info"
MAX_NEW = "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens"
ADD_ONE_REQ = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"

# get_worker_info's tuple: (max_total_num_tokens, max_prefill_tokens, max_running_requests,
# max_queued_requests, max_req_len, max_req_input_len, ...) on every supported release.
_MAX_REQ_LEN, _MAX_REQ_INPUT_LEN = 4, 5
_INPUT_MARGIN = 5  # sglang keeps max_req_input_len this far below max_req_len


def targets() -> dict:
    """The admission hooks: {target: (hook, HookType name)}."""
    return {INPUT_CAP: (lift_input_cap, "AFTER"), MAX_NEW: (init_max_new_tokens, "AROUND"),
            ADD_ONE_REQ: (add_one_req, "AROUND")}


def _stage3(predicate) -> Optional[Any]:
    for backend in list(lifecycle._TIERS):
        if getattr(backend, "stage3", False) and predicate(backend):
            return backend
    return None


def device_bound(backend: Any, chunk: int) -> int:
    """Device slots one request can hold under stage 3 with prefill chunks of `chunk` tokens."""
    win = backend.config.window
    return win.sink_tokens + win.window_tokens + 2 * win.page_tokens + 2 * chunk + backend.page_size


def lift_input_cap(result: Any, worker: Any, *args, **kwargs):
    runner = getattr(worker, "model_runner", None)
    backend = _stage3(lambda b: b.req_to_token_pool is getattr(runner, "req_to_token_pool", None))
    if backend is None or not isinstance(result, tuple) or len(result) <= _MAX_REQ_INPUT_LEN:
        return None
    context = int(getattr(getattr(runner, "model_config", None), "context_len", 0) or 0)
    pool = int(result[0])
    longest = min(context - 1, pool + backend.host_capacity_tokens()) if context else pool - 1
    if longest <= result[_MAX_REQ_LEN]:
        return None
    out = list(result)
    out[_MAX_REQ_LEN], out[_MAX_REQ_INPUT_LEN] = longest, longest - _INPUT_MARGIN
    return tuple(out)


def _backend_of(owner: Any) -> Optional[Any]:
    """The stage-3 backend over owner's token allocator (a PrefillAdder's or a Scheduler's)."""
    allocator = getattr(owner, "token_to_kv_pool_allocator", None)
    return _stage3(lambda b: b.allocator is allocator)


def init_max_new_tokens(original, scheduler: Any, req: Any, *args, **kwargs):
    """sglang clamps a request's decode budget so that prompt + budget fit the pool; under stage 3
    they must fit the pool plus the host store (the prompt and old decode tokens leave the GPU)."""
    backend = _backend_of(scheduler)
    if backend is None or not hasattr(scheduler, "max_total_num_tokens"):
        return original(scheduler, req, *args, **kwargs)
    pool = scheduler.max_total_num_tokens
    scheduler.max_total_num_tokens = pool + backend.host_capacity_tokens()
    try:
        return original(scheduler, req, *args, **kwargs)
    finally:
        scheduler.max_total_num_tokens = pool


def _offsets(adder: Any) -> Optional[Tuple[Any, str, str]]:
    """(holder, total, current) names of the adder's budget offsets, on either release line."""
    budget = getattr(adder, "memory_budget", None)
    if budget is not None and hasattr(budget, "total_offset") and hasattr(budget, "current_offset"):
        return budget, "total_offset", "current_offset"
    if hasattr(adder, "rem_total_token_offset") and hasattr(adder, "cur_rem_token_offset"):
        return adder, "rem_total_token_offset", "cur_rem_token_offset"
    return None


def credit(adder: Any, req: Any) -> int:
    """Tokens of req's prompt and decode budget that never need device slots at once under
    stage 3 (0 when it is off, or when the host store cannot take the rest now)."""
    return _credit(adder, req)[0]


def _credit(adder: Any, req: Any) -> Tuple[int, Optional[Any]]:
    if getattr(adder, "rem_chunk_tokens", None) is None:
        return 0, None  # chunked prefill is off: a prompt is one chunk
    backend = _backend_of(adder)
    if backend is None or backend.prefill_chunk_tokens <= 0:
        return 0, None
    prefix = getattr(req, "prefix_len", None)
    if prefix is None:  # 0.5.17 keeps the prefix's slots instead
        indices = getattr(req, "prefix_indices", None)
        prefix = 0 if indices is None else len(indices)
    extend = len(req.full_untruncated_fill_ids) - int(prefix)
    # Prompt and decode tokens beyond sinks + window leave for the host: the device holds the bound.
    lent = extend + _max_new(req) - device_bound(backend, backend.prefill_chunk_tokens)
    if lent <= 0:
        return 0, None
    if backend.host_free_tokens() < _host_need(backend, req) + owed(backend, besides=req):
        return 0, None  # the host store cannot take the rest now: sglang's own rule applies (it waits)
    return lent, backend


def _max_new(req: Any) -> int:
    """The decode budget sglang charges for req (its remaining max_new_tokens, clipped as sglang clips)."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    return min(max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS)


def _host_need(backend: Any, req: Any) -> int:
    """Host tokens req will hold in all: prompt and decode budget beyond sinks + window."""
    win = backend.config.window
    return max(0, len(req.full_untruncated_fill_ids) + _max_new(req) - win.sink_tokens - win.window_tokens)


def _finished(req: Any) -> bool:
    done = getattr(req, "finished", None)
    try:
        return bool(done()) if callable(done) else False
    except Exception:  # a request sglang is tearing down
        return True


def owed(backend: Any, *, besides: Any = None) -> int:
    """Host tokens that requests admitted on credit will still store."""
    total = 0
    for req, need in list(_PROMISED.items()):
        if req is besides or _finished(req):
            continue
        row = lifecycle.row_of(req)
        total += max(0, need - (backend.host_tokens_of(row) if row is not None else 0))
    return total


def add_one_req(original, adder: Any, req: Any, *args, **kwargs):
    lent, backend = _credit(adder, req)
    where = _offsets(adder) if lent else None
    if where is None:
        return original(adder, req, *args, **kwargs)
    holder, total, current = where
    setattr(holder, total, getattr(holder, total) - lent)
    setattr(holder, current, getattr(holder, current) - lent)
    try:
        result = original(adder, req, *args, **kwargs)
    finally:
        setattr(holder, total, getattr(holder, total) + lent)
        setattr(holder, current, getattr(holder, current) + lent)
    if any(r is req for r in getattr(adder, "can_run_list", ())):  # admitted: its host need is promised
        try:
            _PROMISED[req] = _host_need(backend, req)
        except TypeError:  # a request type without weak references: admitted, but not tracked
            log.warning("kvtier: cannot track the host tokens promised to %s", type(req).__name__)
    return result


__all__ = ["targets", "device_bound", "lift_input_cap", "init_max_new_tokens", "credit", "owed", "add_one_req"]
