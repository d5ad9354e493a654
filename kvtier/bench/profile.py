"""Where a decode step's time goes, by torch's profiler: `kvtier bench decode --profile N`.

After a cell's timed steps (so the timing is the profiler's neither), N more steps run
under `torch.profiler` with the tier's phase ranges on (`kvtier.plan`,
`kvtier.host_submit`, `kvtier.window`, `kvtier.host_collect`, `kvtier.merge`; see
`kvtier.runtime.hybrid.timing.span`). The cell's row gets a summary per step: each
range's wall time on the decoding thread, and the operators and kernels that take most
host time and most device time. The whole tables go to a text file beside the results.
What the CPU engine does shows as the host time of `kvtier.host_collect` (one C call
the profiler cannot see into); a device sync shows as `cudaEventSynchronize`,
`cudaStreamSynchronize` or a `.item()`/`.tolist()`'s `aten::_local_scalar_dense`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

TOP = 15  # operators per list in the row (the text file has 40)


def _device_self_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def span_times(avg, n: int):
    """({phase: host ms per step}, {phase: calls per step}) of the tier's `kvtier.*` ranges among the
    profiler's averaged events. With CUDA on, torch lists a range twice under one key: its host range
    and its annotation on the device, which has no host time; the host one is kept."""
    spans: Dict[str, float] = {}
    calls: Dict[str, float] = {}
    for e in avg:
        if not e.key.startswith("kvtier."):
            continue
        name, ms = e.key[len("kvtier."):], round(e.cpu_time_total * 1e-3 / n, 3)
        if name not in spans or ms > spans[name]:
            spans[name], calls[name] = ms, e.count / n
    return spans, calls


def profile_steps(step: Callable[[], None], n: int, device: torch.device, path: Optional[Path] = None) -> Dict[str, object]:
    """Run `step` n times under the profiler; the per-step summary (ms), and the tables to `path`."""
    from torch.profiler import ProfilerActivity, profile

    from ..runtime.hybrid import profile_spans

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profile_spans(True)
    try:
        with profile(activities=activities) as prof:
            for _ in range(n):
                step()
                if cuda:
                    torch.cuda.synchronize(device)
    finally:
        profile_spans(False)
    avg = prof.key_averages()
    per = 1e-3 / n  # microseconds summed over n steps -> milliseconds per step
    spans, calls = span_times(avg, n)
    ops = [e for e in avg if not e.key.startswith("kvtier.")]

    def top(key) -> List[List[object]]:
        rows = sorted(ops, key=key, reverse=True)[:TOP]
        return [[e.key[:80], round(key(e) * per, 3), round(e.count / n, 1)] for e in rows if key(e) > 0]

    summary: Dict[str, object] = {
        "steps": n,
        "spans_ms_per_step": spans,
        "span_calls_per_step": calls,
        "top_host_self_ms_per_step": top(lambda e: float(e.self_cpu_time_total)),
    }
    if cuda:
        summary["top_device_self_ms_per_step"] = top(_device_self_us)
        summary["device_busy_ms_per_step"] = round(sum(_device_self_us(e) for e in ops) * per, 3)
    if path is not None:
        parts = [f"# {n} profiled steps; times are totals over them (divide by {n} for one step)\n"]
        parts.append(avg.table(sort_by="self_cpu_time_total", row_limit=40))
        if cuda:
            for key in ("self_device_time_total", "self_cuda_time_total"):
                try:
                    parts.append(avg.table(sort_by=key, row_limit=40))
                    break
                except (AttributeError, KeyError, ValueError):
                    continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(parts))
        summary["tables"] = path.name
    return summary


__all__ = ["profile_steps", "span_times"]
