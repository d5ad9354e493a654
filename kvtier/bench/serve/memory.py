"""Memory for server runs: the static fraction that gives an 80 GB card's KV pool, and what a run used.

sglang sizes its KV pool at launch as (free memory after loading the weights)
minus (free memory before loading) x (1 - mem_fraction_static): with P the
memory free before the load and W the weights, KV = f x P - W. A larger card
gives the pool of a smaller one at f = f_ref x P_ref / P. Free memory before
the load is the card's total less the CUDA context, which is taken as equal on
both cards, so f = f_ref x total_ref / total: within a few hundred MB of KV on
an H200 standing in for an 80 GB H100. The run records the pool sglang reports
(`max_total_num_tokens`) next to the one this arithmetic expects.

Device memory is read with `nvidia-smi` (the card's used memory, sampled);
host memory as the resident memory of the server's whole process session
(its scheduler's pinned host store included), from /proc.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import threading
from typing import Dict, List, NamedTuple, Optional

GIB = 1 << 30
H100_80GB_GIB = 79.6  # what an 80 GB H100 reports (kvtier bench decode --device-gib uses the same)
REFERENCE_FRACTION = 0.85  # about what sglang picks on an 80 GB card for an 8B model with CUDA graphs


class MemoryArgError(ValueError):
    """A card or fraction the arithmetic cannot honour."""


def mem_fraction(device_gib: float, *, reference_gib: float = H100_80GB_GIB,
                 reference_fraction: float = REFERENCE_FRACTION) -> float:
    """--mem-fraction-static on a card of device_gib that sizes the KV pool of a reference_gib card
    launched with reference_fraction (3 decimals, rounded down: never a larger pool than the reference)."""
    if not 0 < reference_fraction < 1:
        raise MemoryArgError(f"reference mem fraction: expected a number in (0, 1), found {reference_fraction}")
    if not device_gib > 0 or not reference_gib > 0:
        raise MemoryArgError(f"card memory: expected GiB > 0, found device {device_gib} and reference {reference_gib}")
    if device_gib < reference_gib * 0.999:
        raise MemoryArgError(f"this card has {device_gib:.1f} GiB, less than the {reference_gib:.1f} GiB card it "
                             "should stand in for; it cannot hold that card's KV pool")
    return int(reference_fraction * reference_gib / device_gib * 1000) / 1000


def expected_kv_gib(*, weight_bytes: int, reference_gib: float = H100_80GB_GIB,
                    reference_fraction: float = REFERENCE_FRACTION) -> float:
    """The reference card's KV pool by the same arithmetic (an upper bound: the CUDA context and load-time
    buffers come off it too)."""
    return reference_fraction * reference_gib - weight_bytes / GIB


def gpu_memory(index: int = 0, *, smi: str = "nvidia-smi") -> Optional[Dict[str, float]]:
    """{"total_gib", "used_gib"} of GPU index from nvidia-smi, or None where nvidia-smi does not answer."""
    try:
        out = subprocess.run([smi, f"--id={index}", "--query-gpu=memory.total,memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    try:
        total, used = (float(x) for x in out.stdout.strip().splitlines()[0].split(","))
    except (ValueError, IndexError):
        return None
    return {"total_gib": total / 1024, "used_gib": used / 1024}


def session_rss_bytes(sid: int, proc: pathlib.Path = pathlib.Path("/proc")) -> int:
    """Resident bytes of every process in session sid (a server started with start_new_session=True:
    its launcher, scheduler, detokenizer and their children)."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            if int(fields[3]) != sid:  # state, ppid, pgrp, session
                continue
            total += int((entry / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # it exited meanwhile
    return total


class Peaks(NamedTuple):
    device_gib: Optional[float]  # the card's used memory, highest sample (None: no nvidia-smi)
    host_gib: float  # the server session's resident memory, highest sample
    samples: int


class MemorySampler:
    """Samples the card's used memory and the server session's RSS every interval_s on a thread,
    between start() and stop() (which returns the peaks)."""

    def __init__(self, sid: int, *, gpu_index: Optional[int] = 0, interval_s: float = 1.0):
        self.sid, self.gpu_index, self.interval_s = sid, gpu_index, interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._device: List[float] = []
        self._host: List[int] = []

    def sample(self) -> None:
        self._host.append(session_rss_bytes(self.sid))
        if self.gpu_index is not None:
            mem = gpu_memory(self.gpu_index)
            if mem is None:
                self.gpu_index = None  # no nvidia-smi here: stop asking
            else:
                self._device.append(mem["used_gib"])

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> "MemorySampler":
        self._stop.clear()
        self._device, self._host = [], []
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="kvtier-serve-memory", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Peaks:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        return Peaks(max(self._device) if self._device else None, max(self._host) / GIB, len(self._host))


__all__ = ["H100_80GB_GIB", "MemoryArgError", "MemorySampler", "Peaks", "REFERENCE_FRACTION", "expected_kv_gib",
           "gpu_memory", "mem_fraction", "session_rss_bytes"]
