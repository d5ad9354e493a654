"""The serving matrix's rows, read together: when a sweep stops, the summary against dense, one table, a plot."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

DENSE = "dense"


def stop_reason(throughputs: Sequence[float], min_gain: float) -> Optional[str]:
    """Why a sweep should stop after these levels' output tokens/s (None: go on): the last level did not
    beat the best before it by min_gain (a fraction)."""
    if len(throughputs) < 2:
        return None
    best = max(throughputs[:-1])
    last = throughputs[-1]
    if last < best * (1.0 + min_gain):
        return (f"throughput stopped growing: {last:.1f} tokens/s against {best:.1f} before "
                f"(needs +{100 * min_gain:.0f}%)")
    return None


def _ok(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def summarize(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Per input length and server: its best level (output tokens/s), the most requests it admitted at
    once, its TPOT at concurrency 1, and those against dense's at the same input length."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for r in _ok(rows):
        s = out.setdefault(str(r["input_len"]), {}).setdefault(r["server"], {})
        if r["output_tokens_per_s"] > s.get("best_tokens_per_s", -1.0):
            s.update(best_tokens_per_s=r["output_tokens_per_s"], best_concurrency=r["concurrency"],
                     best_tpot_p50_ms=r["tpot_p50_ms"])
        if r.get("admitted_max") is not None:
            s["admitted_max"] = max(s.get("admitted_max", 0), r["admitted_max"])
        if r["concurrency"] == 1:
            s["tpot_p50_ms_at_1"] = r["tpot_p50_ms"]
    for servers in out.values():
        dense = servers.get(DENSE)
        if not dense:
            continue
        for name, s in servers.items():
            if name == DENSE:
                continue
            s["tokens_per_s_vs_dense"] = s["best_tokens_per_s"] / dense["best_tokens_per_s"]
            if s.get("admitted_max") and dense.get("admitted_max"):
                s["admitted_vs_dense"] = s["admitted_max"] / dense["admitted_max"]
            if s.get("tpot_p50_ms_at_1") and dense.get("tpot_p50_ms_at_1"):
                s["tpot_at_1_vs_dense"] = s["tpot_p50_ms_at_1"] / dense["tpot_p50_ms_at_1"]
    return out


def headline(summary: Dict[str, Dict[str, Dict[str, Any]]], model: str) -> str:
    """One line for the results index: at the longest input, each server's best tokens/s and most admitted."""
    if not summary:
        return ""
    longest = max(summary, key=int)
    parts = [f"{s}: {v['best_tokens_per_s']:.0f} tok/s, {v.get('admitted_max', '?')} at once"
             for s, v in summary[longest].items()]
    return f"{model}, input {longest}: " + "; ".join(parts)


def _num(v: Any, fmt: str = "{:.1f}") -> str:
    return "" if v is None else fmt.format(v)


def table(rows: List[Dict[str, Any]], summary: Dict[str, Dict[str, Dict[str, Any]]], servers: List[Dict[str, Any]],
          *, title: str, caption: str) -> str:
    lines = [f"# {title}", "", caption, "", "## Against dense (best level of each)", "",
             "| input | server | best output tok/s | at concurrency | most admitted at once | TPOT p50 @1 ms "
             "| tok/s vs dense | admitted vs dense | TPOT @1 vs dense |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for inp in sorted(summary, key=int):
        for name, s in summary[inp].items():
            lines.append(f"| {inp} | {name} | {s['best_tokens_per_s']:.1f} | {s['best_concurrency']} | "
                         f"{_num(s.get('admitted_max'), '{}')} | {_num(s.get('tpot_p50_ms_at_1'))} | "
                         f"{_num(s.get('tokens_per_s_vs_dense'), '{:.2f}x')} | "
                         f"{_num(s.get('admitted_vs_dense'), '{:.2f}x')} | "
                         f"{_num(s.get('tpot_at_1_vs_dense'), '{:.2f}x')} |")
    lines += ["", "## Every level", "",
              "| server | input | concurrency | prompts | completed | output tok/s | TPOT p50 / p99 ms "
              "| TTFT p50 / p99 s | admitted at once | device GiB | host GiB | status |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append(
            f"| {r['server']} | {r['input_len']} | {r['concurrency']} | {r['prompts']} | "
            f"{_num(r.get('completed'), '{}')} | {_num(r.get('output_tokens_per_s')) if ok else ''} | "
            + (f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {r['ttft_p50_ms'] / 1e3:.2f} / "
               f"{r['ttft_p99_ms'] / 1e3:.2f}" if ok else " | ")
            + f" | {_num(r.get('admitted_max'), '{}')} | {_num(r.get('device_peak_gib'))} | "
            f"{_num(r.get('host_peak_gib'))} | {r.get('status', '')} |")
    lines += ["", "## Servers", "", "| server | launch (after the model) | KV pool tokens | expected for the card "
              "| ready s | stopped sweeps |", "|---|---|---:|---:|---:|---|"]
    for s in servers:
        if s.get("skipped"):
            lines.append(f"| {s['server']} | skipped: {s['skipped']} | | | | |")
            continue
        stops = "; ".join(f"{k}: {v}" for k, v in (s.get("stops") or {}).items())
        lines.append(f"| {s['server']} | `{' '.join(s.get('launch', []))}` | {_num(s.get('pool_tokens'), '{}')} | "
                     f"{_num(s.get('expected_pool_tokens'), '{}')} | {_num(s.get('ready_s'), '{:.0f}')} | {stops} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict[str, Any]], path, *, title: str) -> bool:
    """Output tokens/s and TPOT p50 against concurrency, one column per input length; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = _ok(rows)
    inputs = sorted({r["input_len"] for r in ok})
    if not inputs:
        return False
    fig, axes = plt.subplots(2, len(inputs), figsize=(5 * len(inputs), 7), squeeze=False)
    for col, inp in enumerate(inputs):
        for server in dict.fromkeys(r["server"] for r in ok):
            pts = sorted((r["concurrency"], r["output_tokens_per_s"], r["tpot_p50_ms"]) for r in ok
                         if r["server"] == server and r["input_len"] == inp)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0][col].plot(xs, [p[1] for p in pts], marker="o", label=server)
            axes[1][col].plot(xs, [p[2] for p in pts], marker="o", label=server)
        axes[0][col].set_title(f"input {inp} tokens")
        axes[0][col].set_ylabel("output tokens/s")
        axes[1][col].set_ylabel("TPOT p50 ms")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max concurrency")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


__all__ = ["DENSE", "headline", "plot", "stop_reason", "summarize", "table"]
