"""Where a decode step's attention time goes: the engine, the window kernels, the caller's wall time."""

from __future__ import annotations

import contextlib
import time
from typing import List, NamedTuple, Tuple

import torch

_SPANS = False  # profiler ranges on (a profiling run turns them on; off they cost a flag test)


def profile_spans(on: bool) -> None:
    """Mark the decode step's phases (plan, host submit, window, host collect, merge) as
    profiler ranges (`torch.profiler.record_function`), for `kvtier bench decode --profile`."""
    global _SPANS
    _SPANS = bool(on)


def span(name: str):
    """A profiler range named `kvtier.<name>` while spans are on, else a no-op context."""
    return torch.profiler.record_function(f"kvtier.{name}") if _SPANS else contextlib.nullcontext()


class StepTimes(NamedTuple):
    cpu_s: float  # host-side time summed over layers (the engine's, for the CPU engine strategy)
    gpu_s: float  # window attention summed over layers (GPU kernel time on CUDA, wall time elsewhere)
    wall_s: float  # run() wall time summed over layers

    @property
    def overlap_s(self) -> float:
        """Time the host part and the device window ran concurrently (0 when serial)."""
        return max(0.0, min(self.cpu_s, self.gpu_s, self.cpu_s + self.gpu_s - self.wall_s))


class WindowTimer:
    """Times the window's kernels per layer without a device sync on the decoding thread.

    On CUDA each layer records a (start, end) event pair; the pairs are read (waited for) at
    `fold()`, once per plan. Pairs are made once and reused after each fold: creating two
    events per layer costs the decoding thread more than recording them. Elsewhere the wall
    time between `start()` and `end()` counts.
    """

    def __init__(self):
        self.gpu_s = 0.0
        self._events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._pool: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0
        self._open = None

    def start(self, cuda: bool) -> None:
        if cuda:
            i = len(self._events)
            if i == len(self._pool):
                self._pool.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._open = self._pool[i]
            self._open[0].record()
        else:
            self._open = None
            self._t0 = time.perf_counter()

    def end(self) -> None:
        """Close the layer's interval; a layer that failed between start and end is not counted."""
        if self._open is not None:
            self._open[1].record()
            self._events.append(self._open)
            self._open = None
        else:
            self.gpu_s += time.perf_counter() - self._t0

    def fold(self) -> None:
        """Add the window kernels' GPU time recorded since the last fold (waits for them)."""
        for start, end in self._events:
            end.synchronize()
            self.gpu_s += start.elapsed_time(end) / 1e3
        self._events.clear()

    def take(self) -> float:
        self.fold()
        s, self.gpu_s = self.gpu_s, 0.0
        return s
