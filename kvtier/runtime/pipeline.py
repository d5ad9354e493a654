"""The pipelined decode path's hand-off: the GPU stream feeds the CPU engine, layer by layer.

Without it the thread that queues a decode step waits for the engine at
every layer, so the step's kernel launches run in series with the engine.
With it, per layer the stream copies the query into a page-locked slot and
stores "query ready"; the engine, serving on its own thread
(`Engine.server`), runs the layer and stores "result ready"; the stream
waits for that before it copies the result back. The queueing thread never
waits and runs ahead into the next layers.

`EngineFeed` owns the slots, the flags and the serving loop of one plan:
`hand_off(q, layer)` then `result(slot, seq)` per layer, `stop()` before the
plan or the host store changes. The stream operations are passed in
(`stream_ops` on CUDA), so the protocol is testable with plain stores.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .._native import Engine, ServeBuffers
from ..config import env

SLOTS = 2  # the fewest slots: the stream hands over one layer at a time
TIMEOUT_S = 120.0  # after stop: how long the engine waits for a query still queued on the stream
SEQ_LIMIT = 2**30  # sequence numbers start over before int32 wraps


def pipeline_setting(default: bool = True) -> bool:
    """$KVTIER_PIPELINE: on or off; unset, the caller's default."""
    raw = (env.get(env.PIPELINE) or "").strip().lower()
    if not raw:
        return default
    if raw not in ("on", "off"):
        raise ValueError(f"{env.PIPELINE.name}: expected on or off, got {raw!r}")
    return raw == "on"


def default_engine_threads(pipelined: bool) -> int:
    """Engine threads for `engine.threads: 0`: every usable core, but one when pipelined.

    Pipelined, the thread that queues the GPU work keeps running while the
    engine does; with every core taken by the engine, the two preempt each
    other and an engine worker descheduled mid-item stalls a whole layer.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - 1 if pipelined and cores > 2 else cores


class StreamOps(NamedTuple):
    """How a stream stores and waits for int32 flags in page-locked memory (`stream_ops` on CUDA)."""

    address: Callable[[torch.Tensor], int]  # the device's address of a pinned tensor
    write: Callable[[object, int, int], None]  # (stream, address, value): store after earlier work
    wait: Callable[[object, int, int], None]  # (stream, address, value): later work waits for it
    sync: Callable[[], None]  # wait until the stream has done everything queued


class EngineFeed:
    """The engine serving one plan's layers as the stream hands them over (see the module doc).

    Not thread-safe: one decoding thread calls hand_off/result/stop. The
    engine's loop runs on `pool` (one worker), which the caller owns.
    """

    def __init__(self, engine: Engine, pool: ThreadPoolExecutor, ops: StreamOps, *, pin_memory: bool = True,
                 n_slots: int = SLOTS):
        """n_slots: job slots, used in turn; with one per layer of a model that runs its layers
        in order, a slot always serves the same layer and its layer flag is stored only once."""
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < SLOTS:
            raise ValueError(f"EngineFeed: expected n_slots an int >= {SLOTS}, got {n_slots!r}")
        self.engine, self.pool, self.ops, self.pin, self.n_slots = engine, pool, ops, pin_memory, n_slots
        z = lambda n, t: torch.zeros(n, dtype=t, pin_memory=pin_memory)  # noqa: E731
        # layer, q_ready, far_ready per slot; stop, done, engine seconds: shared with the loop for good
        self._flags = (z(n_slots, torch.int32), z(n_slots, torch.int32), z(n_slots, torch.int32),
                       z(1, torch.int32), z(1, torch.int64), z(1, torch.float64))
        self._addr = tuple(ops.address(t) for t in self._flags[:3])
        # the layer each slot's flag holds once the stream reaches the jobs queued so far
        self._slot_layer = [0] * n_slots
        self._q = self._far = None  # page-locked slots, grown with the batch
        self._q_slot: List[torch.Tensor] = []  # per slot: its query [B, Hq, D] and result (flat) views
        self._far_slot: List[torch.Tensor] = []
        self._far_dev: Dict[torch.device, List[torch.Tensor]] = {}  # per device: where each slot's result lands
        self._buf: Optional[ServeBuffers] = None
        self._loop: Optional[Future] = None
        self._seq = 1  # the next job's sequence number
        self._first = self._jobs = 0

    @property
    def serving(self) -> bool:
        return self._loop is not None

    def hand_off(self, stream, q: torch.Tensor, layer: int) -> Tuple[int, int]:
        """Queue q [B, Hq, D] (on the stream's device) for layer; returns (slot, seq) for `result`.

        Starts the engine's loop on the first layer after a stop; the engine
        must be planned for this batch.
        """
        if self._loop is None:
            self._start(*q.shape)
        j = self._jobs
        slot, seq = j % self.n_slots, self._first + j
        layer_at, q_ready_at, _ = self._addr
        self._q_slot[slot].copy_(q, non_blocking=True)
        if self._slot_layer[slot] != layer:  # else the flag already holds it when the stream gets here
            self.ops.write(stream, layer_at + 4 * slot, layer)
            self._slot_layer[slot] = layer
        self.ops.write(stream, q_ready_at + 4 * slot, seq)
        self._jobs += 1
        return slot, seq

    def result(self, stream, slot: int, seq: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The job's (out [B, Hq, D], lse [B, Hq]) on device, once the stream has waited for it.

        Views of the slot's buffer on device, which the slot's next job (n_slots jobs
        later on the same stream) overwrites: use them before then.
        """
        self.ops.wait(stream, self._addr[2] + 4 * slot, seq)
        device = torch.device(device)
        if device.type == "cpu":
            return self._split(self._far_slot[slot].clone(), self._q_slot[slot].shape)
        dev = self._far_dev.get(device)
        if dev is None:
            dev = self._far_dev[device] = list(torch.empty_like(self._buf.far, device=device).unbind(0))
        far = dev[slot]
        far.copy_(self._far_slot[slot], non_blocking=True)
        return self._split(far, self._q_slot[slot].shape)

    @staticmethod
    def _split(far: torch.Tensor, shape) -> Tuple[torch.Tensor, torch.Tensor]:
        n = shape[0] * shape[1] * shape[2]
        return far[:n].view(shape), far[n:].view(shape[:2])

    def stop(self) -> float:
        """End the loop once the jobs handed off so far are done; returns the engine's seconds.

        Waits for the stream to reach those jobs; raises the loop's error if any.
        """
        loop, self._loop = self._loop, None
        if loop is None:
            return 0.0
        self._buf.stop[0] = self._jobs + 1
        self._seq = self._first + self._jobs
        loop.result()
        return float(self._buf.engine_seconds[0])

    def _start(self, b: int, hq: int, d: int) -> None:
        layer, q_ready, far_ready, stop, done, seconds = self._flags
        if self._seq >= SEQ_LIMIT:  # start the numbers over once the stream waits on none of them
            self.ops.sync()
            q_ready.zero_()
            far_ready.zero_()
            self._seq = 1
        ns = self.n_slots
        nq, nfar = ns * b * hq * d, ns * b * hq * (d + 1)
        if self._q is None or self._q.numel() < nq:
            self._q = torch.empty(nq, pin_memory=self.pin)
            self._far = torch.empty(nfar, pin_memory=self.pin)
        for t in (stop, done, seconds):
            t.zero_()
        shaped = self._buf is None or tuple(self._buf.q.shape) != (ns, b, hq, d)
        self._buf = ServeBuffers(layer, self._q[:nq].view(ns, b, hq, d), self._far[:nfar].view(ns, -1),
                                 q_ready, far_ready, stop, done, seconds)
        if shaped:  # a new batch shape: new views (and device buffers when a result first lands)
            self._q_slot, self._far_slot = list(self._buf.q.unbind(0)), list(self._buf.far.unbind(0))
            self._far_dev.clear()
        self._first, self._jobs = self._seq, 0
        loop = self.engine.server(self._buf, first_seq=self._first, timeout_s=TIMEOUT_S)
        entered = threading.Event()

        def serve() -> None:
            entered.set()
            loop()  # releases the GIL until the loop ends

        self._loop = self.pool.submit(serve)
        # Wait until the loop thread runs: the decoding thread is about to queue a whole
        # step holding the GIL, and would otherwise keep the loop from starting for up to
        # the interpreter's switch interval (5 ms).
        entered.wait()


def cuda_stream_ops(device: torch.device) -> StreamOps:
    from . import stream_ops

    return StreamOps(stream_ops.device_address, stream_ops.write_value, stream_ops.wait_value,
                     lambda: torch.cuda.synchronize(device))


__all__ = ["EngineFeed", "StreamOps", "cuda_stream_ops", "default_engine_threads", "pipeline_setting"]
