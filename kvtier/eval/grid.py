"""The evaluation grid: prompts x policies, scores, budgets used, fidelity, and the reports."""

from __future__ import annotations

import json
import math
import pathlib
import re
import time
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

import torch

from ..bench import results
from ..config import ConfigError, load
from ..policies import REGISTRY
from ..runtime.standalone import resolve_device
from . import models, user_prompts
from .runner import PolicySpec, entry_label, is_policy_file, policy_specs, run_prompt
from .tasks import TASKS, build, score

PROMPTS_CONTEXT = "prompts"  # the context label of a grid over the user's own prompts

GAP_BUDGET = 0.1
TIMES = ("attn_ms_per_step", "engine_ms_per_step", "window_ms_per_step")  # per policy, summed over layers


class Report(NamedTuple):
    table: str
    json_path: pathlib.Path
    worst_gap: float  # points; nan when the grid has no budgeted policy at 10%
    window_only_gap: float  # points; nan without window_only


def check_settings(s: dict) -> None:
    """Checks the grid's settings; with `prompts` (a JSONL file) it reads the file and sets the
    grid's tasks (the prompts' labels), contexts and samples from it."""
    if s.get("prompts"):
        read = user_prompts.read(s["prompts"])
        counts: Dict[str, int] = defaultdict(int)
        for up in read:
            counts[up.task] += 1
        s["tasks"], s["contexts"], s["samples"] = sorted(counts), [PROMPTS_CONTEXT], max(counts.values())
        s["prompt_count"] = len(read)
    for t in s["tasks"]:
        if t not in TASKS and not s.get("prompts"):
            raise ValueError(f"--tasks: expected names from {sorted(TASKS)}, found {t!r}")
    runnable = sorted(set(REGISTRY) - {"offload_all"})
    for p in s["policies"]:
        kind = p
        if is_policy_file(p):
            try:
                kind = load(p).policy
            except ConfigError as exc:
                raise ValueError(f"--policies: {exc}") from None
        if kind not in runnable:
            where = f"{p}: " if is_policy_file(p) else ""
            raise ValueError(f"--policies: {where}expected names from {runnable} or policy YAML files, found {kind!r}")
    if "dense" not in s["policies"]:
        raise ValueError(f"--policies: expected dense among them (the reference), found {s['policies']}")
    labels = [entry_label(p) for p in s["policies"]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--policies: expected distinct labels (a file is labelled by its stem), found {labels}")
    if s.get("name") is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", s["name"]):
        raise ValueError(f"--name: expected letters, digits, '.', '_' or '-', found {s['name']!r}")
    device = s.get("device", "cpu")
    try:
        dev = resolve_device(device)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, found {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, found {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: expected a CUDA GPU, but torch {torch.__version__} sees none")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: expected a GPU index below {torch.cuda.device_count()}")
    chunk = s.get("prefill_chunk")
    if chunk is not None and chunk < 1:
        raise ValueError(f"--prefill-chunk: expected a token count >= 1, found {chunk}")
    if any(not 0 < b <= 1 for b in s["budgets"]) or any(c <= 0 for c in s["contexts"] if c != PROMPTS_CONTEXT) \
            or s["samples"] <= 0:
        raise ValueError(f"expected budgets in (0, 1], positive contexts and samples, found {s['budgets']}, "
                         f"{s['contexts']}, {s['samples']}")
    # The grid's policies, built before any model loads: a bad --window fails here, with its field.
    policy_specs(s["policies"], s["budgets"], window_tokens=s["window"], keep_budget=s.get("keep_budget", False))


def _stop_ids(tok, model) -> List[int]:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return sorted({int(i) for i in ids + [tok.eos_token_id] if i is not None})


class PolicyTime(NamedTuple):
    """One policy's own decode attention per step, summed over the model's layers (ms), mean over prompts."""

    attn_ms_per_step: float  # the decoding thread's time in the tier's attention
    engine_ms_per_step: float  # the host part (the CPU engine's time over host tokens)
    window_ms_per_step: float  # the device window's kernels
    n_prompts: float  # prompts averaged


def policy_times(records: List[dict]) -> Dict[tuple, PolicyTime]:
    """Per (context, policy label) of a grid's records (`run_grid`'s JSON `records`): its timing.

    Every policy of a prompt decodes in one batch, so these are each policy's own shares of a
    step (`run_prompt`'s `attention`), not serving speed."""
    timed: Dict[tuple, List[dict]] = defaultdict(list)
    for rec in records:
        if all(k in rec for k in TIMES):
            timed[(rec["context"], rec["policy"])].append(rec)
    return {key: PolicyTime(*(_mean(r[k] for r in rs) for k in TIMES), float(len(rs))) for key, rs in timed.items()}


class GridItem(NamedTuple):
    context: object  # the prompt length asked for, or PROMPTS_CONTEXT
    task: str
    sample: int
    prompt: object  # tasks.Prompt
    scoring: Optional[user_prompts.Scoring]  # None: RULER's string match of the built-in tasks


def grid_items(s: dict, tok, *, seed: int) -> Iterator[GridItem]:
    """The grid's prompts in order: the built-in tasks at each context (every task's first prompt,
    then every task's second, ...: a run stopped early holds each task alike), or the user's file."""
    if s.get("prompts"):
        seen: Dict[str, int] = defaultdict(int)
        for up in user_prompts.read(s["prompts"]):
            yield GridItem(PROMPTS_CONTEXT, up.task, seen[up.task], user_prompts.build(up, tok), up.score)
            seen[up.task] += 1
        return
    for ctx in s["contexts"]:
        for i in range(s["samples"]):
            for task in s["tasks"]:
                yield GridItem(ctx, task, i, build(task, tok, ctx, seed=seed, sample=i), None)


def run_grid(s: dict, *, seed: int, quick: bool, fidelity: bool, log: Callable[[str], None],
             results_dir: Optional[str] = None) -> Report:
    """Run the grid; results go to `results_dir` (None: `results.results_dir()`'s default)."""
    t_start = time.perf_counter()
    out = results.results_dir(results_dir)
    device = resolve_device(s.get("device", "cpu"))
    log(f"eval: loading {s['model']} on {device}")
    tok, model = models.load(models.resolve(s["model"]))
    model.to(device)  # the tiers' device pools follow the model; host stores and engines stay on the CPU
    specs = policy_specs(s["policies"], s["budgets"], window_tokens=s["window"], keep_budget=s.get("keep_budget", False))
    stops = _stop_ids(tok, model)
    records: List[dict] = []
    fid: Dict[tuple, List[List[tuple]]] = defaultdict(list)  # (ctx, label) -> per prompt, per layer
    usage: Dict[tuple, List[tuple]] = defaultdict(list)  # (ctx, label) -> (host_frac, device_tokens)
    host_reports: Dict[tuple, dict] = {}  # (ctx, label) -> the host strategies' diagnostics, summed over prompts
    n_total = s["prompt_count"] if s.get("prompts") else len(s["contexts"]) * len(s["tasks"]) * s["samples"]
    done, t_prompts = 0, 0.0
    for ctx, task, i, p, rule in grid_items(s, tok, seed=seed):
        t0 = time.perf_counter()
        r = run_prompt(model, specs, p.context_ids, p.tail_ids, max_new_tokens=p.max_new_tokens,
                       stop_ids=stops, fidelity=fidelity, prefill_chunk=s.get("prefill_chunk"))
        t_prompts += time.perf_counter() - t0
        done += 1
        scores = []
        for j, spec in enumerate(specs):
            text = tok.decode(r.generations[j], skip_special_tokens=True)
            sc = score(text, p.answers) if rule is None else user_prompts.score(text, p.answers, rule)
            scores.append(sc)
            at = r.attention[j]
            records.append(dict(context=ctx, task=task, sample=i, policy=spec.label, score=sc,
                                answer=text.strip()[:200], expected=list(p.answers), tokens=p.length,
                                min_margin=min(r.margins[j], default=float("nan")),
                                prefill_s=r.prefill_s, decode_s=r.decode_s, decode_steps=r.decode_steps,
                                attn_ms_per_step=1e3 * at.wall_s / max(r.decode_steps, 1),
                                engine_ms_per_step=1e3 * at.cpu_s / max(r.decode_steps, 1),
                                window_ms_per_step=1e3 * at.gpu_s / max(r.decode_steps, 1)))
            if rule is not None:
                records[-1]["scoring"] = rule.value
            host = float("nan")  # measured with the fidelity (the engine's selection at that step)
            if r.fidelity is not None:
                layers = r.fidelity[j]
                fid[(ctx, spec.label)].append([tuple(x) for x in layers])
                host = sum(x.host_frac for x in layers) / len(layers)
            usage[(ctx, spec.label)].append((host, r.device_tokens[j]))
            if r.host_reports[j]:
                key = (ctx, spec.label)
                host_reports[key] = _add_reports(host_reports.get(key), r.host_reports[j])
        _checkpoint(out / _partial_name(s, quick), s, seed, records, done, n_total)
        eta = t_prompts / done * (n_total - done)
        log(f"[{done}/{n_total}] {task} {ctx} #{i}: prefill {r.prefill_s:.1f}s, {r.decode_steps} steps "
            f"{r.decode_s:.1f}s, eta {eta / 60:.1f} min | "
            + " ".join(f"{sp.label}={sc:.2f}" for sp, sc in zip(specs, scores)))
    report = _report(s, specs, records, fid, usage, seed=seed, quick=quick, seconds=time.perf_counter() - t_start,
                     device=str(device), out=out, host_reports=host_reports)
    (out / _partial_name(s, quick)).unlink(missing_ok=True)
    return report


def _name(s: dict, quick: bool) -> str:
    if s.get("name"):
        return s["name"]
    return "eval-" + (s["model"] if s["model"] in models.KNOWN else pathlib.Path(s["model"]).stem) + \
        ("-quick" if quick else "")


def _partial_name(s: dict, quick: bool) -> str:
    return f"{_name(s, quick)}.partial.json"


def _checkpoint(path: pathlib.Path, s: dict, seed: int, records: List[dict], done: int, total: int) -> None:
    """The answers so far, after every prompt: a long run that stops early keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(settings=s, seed=seed, prompts_done=done, prompts_total=total,
                                   records=records), indent=1))
    tmp.replace(path)


def _fmt(x: float, spec: str) -> str:
    """A table cell: n/a for what was not measured (NaN)."""
    return "n/a" if math.isnan(x) else format(x, spec)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _add_reports(a: Optional[dict], b: dict) -> dict:
    """Two host strategies' reports summed leaf by leaf (numbers, nested lists and dicts); rates are
    the last prompt's."""
    if a is None:
        return b
    out = {}
    for k, v in b.items():
        if k == "rates" or k not in a:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = _add_reports(a[k], v)
        elif isinstance(v, list):
            out[k] = [_add_reports({"x": x}, {"x": y})["x"] for x, y in zip(a[k], v)]
        else:
            out[k] = a[k] + v
    return out


def _report(s, specs: List[PolicySpec], records, fid, usage, *, seed, quick, seconds, device: str,
            out: pathlib.Path, host_reports: Optional[Dict[tuple, dict]] = None) -> Report:
    acc: Dict[tuple, List[float]] = defaultdict(list)
    for rec in records:
        acc[(rec["context"], rec["task"], rec["policy"])].append(100.0 * rec["score"])
    task_acc = {k: _mean(v) for k, v in acc.items()}
    times = policy_times(records)
    ctx_acc = {(c, sp.label): _mean(task_acc[(c, t, sp.label)] for t in s["tasks"])
               for c in s["contexts"] for sp in specs}
    cells = []
    for c in s["contexts"]:
        for sp in specs:
            f = fid.get((c, sp.label), [])
            n_layers = len(f[0]) if f else 0
            per_layer = [[_mean(p[layer][m] for p in f) for m in range(3)] for layer in range(n_layers)]
            cells.append(dict(
                context=c, policy=sp.label, kind=sp.policy, budget=sp.budget, accuracy=ctx_acc[(c, sp.label)],
                gap=ctx_acc[(c, "dense")] - ctx_acc[(c, sp.label)],
                tasks={t: task_acc[(c, t, sp.label)] for t in s["tasks"]},
                host_frac=_mean(u[0] for u in usage[(c, sp.label)]),
                device_tokens=_mean(u[1] for u in usage[(c, sp.label)]),
                rel_err=_mean(x[0] for x in per_layer), lse_err=_mean(x[1] for x in per_layer),
                topk_recall=_mean(x[2] for x in per_layer), per_layer=per_layer,
                **times.get((c, sp.label), PolicyTime(*([float("nan")] * 4)))._asdict(),
                **({"host_report": host_reports[(c, sp.label)]} if (c, sp.label) in (host_reports or {}) else {})))
    at_gap = [x for x in cells if x["budget"] is not None and math.isclose(x["budget"], GAP_BUDGET)]
    worst = max((x["gap"] for x in at_gap), default=float("nan"))
    worst_task = max((ctx_acc_d - x["tasks"][t] for x in at_gap for t in s["tasks"]
                      for ctx_acc_d in [task_acc[(x["context"], t, "dense")]]), default=float("nan"))
    wo = [x["gap"] for x in cells if x["kind"] == "window_only"]
    window_gap = max(wo) if wo else float("nan")
    name = _name(s, quick)
    summary = dict(worst_gap_points=worst, worst_task_drop_points=worst_task, window_only_gap_points=window_gap,
                   gap_budget=GAP_BUDGET, seconds=seconds, drops=_drops(records, specs),
                   timing=_timing(records, device))
    table = _markdown(s, specs, cells, summary)
    payload = dict(name=name, settings=s, seed=seed, machine=results.machine(), summary=summary, cells=cells,
                   fidelity_top_k=32, records=records)
    path = results.write(name, payload, table, out_dir=out)
    _plot(s, specs, cells, path.with_suffix(".png"))
    return Report(table, path, worst, window_gap)


def _drops(records: List[dict], specs: List[PolicySpec]) -> List[dict]:
    """Each prompt where a budgeted policy at the gap budget scored below dense, with dense's smallest margin."""
    at_gap = {sp.label for sp in specs if sp.budget is not None and math.isclose(sp.budget, GAP_BUDGET)}
    dense = {(r["context"], r["task"], r["sample"]): r for r in records if r["policy"] == "dense"}
    out = []
    for r in records:
        d = dense.get((r["context"], r["task"], r["sample"]))
        if r["policy"] in at_gap and d is not None and r["score"] < d["score"]:
            out.append(dict(context=r["context"], task=r["task"], sample=r["sample"], policy=r["policy"],
                            points=100.0 * (d["score"] - r["score"]), dense_min_margin=d.get("min_margin", float("nan"))))
    return out


def _markdown(s, specs, cells, summary) -> str:
    by = {(x["context"], x["policy"]): x for x in cells}
    ctxs = s["contexts"]
    what = (f"Prompts of {pathlib.Path(s['prompts']).name} ({s.get('prompt_count', '?')}, labelled "
            f"{', '.join(s['tasks'])}; scored by each prompt's rule)" if s.get("prompts") else
            f"Tasks {', '.join(s['tasks'])}; {s['samples']} prompts per task and context")
    budgets = ("policy files keep their own budgets, named policies attend fractions of the context from the "
               "host" if s.get("keep_budget") else "budgets are fractions of the context attended from the host")
    scoring = "each prompt's rule" if s.get("prompts") else "RULER string match"
    lines = [f"# kvtier eval: {s['model']}", "",
             f"{what}; device window "
             f"{s['window']} + 64 sinks; {budgets}. "
             f"Accuracy in points ({scoring}, averaged over tasks); fidelity at the first question token, "
             f"averaged over layers: relative output error and LSE error against full attention, recall of the "
             f"true top-32 tokens. " + (f"Context prefilled in chunks of {s['prefill_chunk']} tokens through each "
                                       "policy's tier." if s.get("prefill_chunk") else
                                       "Context prefilled once with full attention, shared by the policies."), "",
             "| policy | " + " | ".join(f"acc @{c}" for c in ctxs) + " | " + " | ".join(f"gap @{c}" for c in ctxs)
             + " | host frac | device tokens | rel err | LSE err | top-32 recall |",
             "|" + "---|" * (1 + 2 * len(ctxs) + 5)]
    for sp in specs:
        xs = [by[(c, sp.label)] for c in ctxs]
        lines.append(f"| {sp.label} | " + " | ".join(f"{x['accuracy']:.1f}" for x in xs) + " | "
                     + " | ".join(f"{x['gap']:+.1f}" for x in xs) + " | "
                     + f"{_fmt(_mean(x['host_frac'] for x in xs), '.3f')} | {_mean(x['device_tokens'] for x in xs):.0f} | "
                     + f"{_fmt(_mean(x['rel_err'] for x in xs), '.3g')} | {_fmt(_mean(x['lse_err'] for x in xs), '.3g')} | "
                     + f"{_fmt(_mean(x['topk_recall'] for x in xs), '.3f')} |")
    lines += ["", "Per task (points):", "",
              "| context | policy | " + " | ".join(s["tasks"]) + " |", "|" + "---|" * (2 + len(s["tasks"]))]
    for c in ctxs:
        for sp in specs:
            x = by[(c, sp.label)]
            lines.append(f"| {c} | {sp.label} | " + " | ".join(f"{x['tasks'][t]:.0f}" for t in s["tasks"]) + " |")
    lines += _timing_lines(s, specs, by, summary)
    lines += _class_lines(s, specs, by)
    drops = summary.get("drops", [])
    if drops:
        lines += ["", f"Prompts a budgeted policy at {100 * GAP_BUDGET:g}% scored below dense, with dense's "
                  "smallest top-1 minus top-2 logit margin over its answer (a small margin is a near tie that any "
                  "perturbation can tip, a large one a lost needle):", "",
                  "| context | task | prompt | policy | points lost | dense's smallest margin |", "|---|---|---|---|---|---|"]
        lines += [f"| {d['context']} | {d['task']} | {d['sample']} | {d['policy']} | {d['points']:.0f} | "
                  f"{d['dense_min_margin']:.2f} |" for d in drops]
    lines += ["", f"worst gap of a budgeted policy at {100 * GAP_BUDGET:g}% (task average, per context): "
              f"{summary['worst_gap_points']:.1f} points; worst single-task drop: "
              f"{summary['worst_task_drop_points']:.1f} points; window_only gap: "
              f"{summary['window_only_gap_points']:.1f} points. Wall time {summary['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def _timing_lines(s, specs, by, summary) -> List[str]:
    t = summary.get("timing")
    if not t:
        return []
    lines = ["", f"Timings on {t['device']} ({t['machine']}): prefill {t['prefill_s']:.2f} s per prompt "
             f"({'per policy, chunked' if s.get('prefill_chunk') else 'once, shared by the policies'}); decode "
             f"{t['step_ms']:.1f} ms per step with every policy's row in one batch, {t['steps']:.0f} steps per "
             "prompt. Each policy's own attention per decode step, summed over the model's layers: the decoding "
             "thread's time in the tier's attention, the CPU engine's time over host tokens, and the device "
             "window's time (kernel time from CUDA events on a GPU, where the thread does not wait for those "
             "kernels; wall time on the CPU):", "",
             "| context | policy | attention ms/step | engine ms/step | window ms/step |", "|---|---|---|---|---|"]
    for c in s["contexts"]:
        for sp in specs:
            x = by[(c, sp.label)]
            lines.append(f"| {c} | {sp.label} | " + " | ".join(f"{x[k]:.2f}" for k in TIMES) + " |")
    return lines


def _class_lines(s, specs, by) -> List[str]:
    """Head classes per layer and host tokens per class, for the policies whose strategy reports them."""
    lines = []
    for c in s["contexts"]:
        for sp in specs:
            rep = by[(c, sp.label)].get("host_report") or {}
            classes, tokens = rep.get("head_classes"), rep.get("class_tokens")
            if not classes:
                continue
            names = list(classes)
            lines += ["", f"{sp.label} at {c} tokens: heads per class at each layer (kv-heads x prompts), and per "
                      "class the host tokens a head kept per step against its cap (means over its (request, layer, "
                      "kv-head) selections):", "", "| layer | " + " | ".join(names) + " |",
                      "|" + "---|" * (1 + len(names))]
            for layer in range(len(classes[names[0]])):
                lines.append(f"| {layer} | " + " | ".join(str(sum(classes[n][layer])) for n in names) + " |")
            if tokens:
                lines += ["", "| class | selections | kept tokens | cap tokens |", "|---|---|---|---|"]
                for n in names:
                    t = tokens[n]
                    k = max(t["selections"], 1)
                    lines.append(f"| {n} | {t['selections']} | {t['kept_tokens'] / k:.0f} | {t['cap_tokens'] / k:.0f} |")
    return lines


def _timing(records: List[dict], device: str) -> Optional[dict]:
    """Prefill and batched decode times averaged over prompts (each of a prompt's records carries
    the same prompt times; one per prompt counts)."""
    seen = {}
    for r in records:
        if "decode_s" in r:
            seen.setdefault((r["context"], r["task"], r["sample"]), r)
    if not seen:
        return None
    xs = list(seen.values())
    steps = sum(r["decode_steps"] for r in xs)
    return dict(device=device, machine=_machine_words(), prefill_s=_mean(r["prefill_s"] for r in xs),
                step_ms=1e3 * sum(r["decode_s"] for r in xs) / max(steps, 1), steps=steps / len(xs))


def _machine_words() -> str:
    m = results.machine()
    return f"{m['cpu_cores']} CPU cores" + (f", {m['gpu']}" if "gpu" in m else "")


def _family(sp: PolicySpec) -> str:
    """"hgca" for "hgca@10%": one curve per policy entry of the grid."""
    return sp.label.rsplit("@", 1)[0]


def _plot(s, specs, cells, path: pathlib.Path) -> Optional[pathlib.Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ctxs = s["contexts"]
    fig, axes = plt.subplots(1, len(ctxs), figsize=(5 * len(ctxs), 4), squeeze=False)
    by = {(x["context"], x["policy"]): x for x in cells}
    for ax, c in zip(axes[0], ctxs):
        families = sorted({_family(sp) for sp in specs if sp.budget is not None})
        for k in families:
            pts = sorted((sp.budget, by[(c, sp.label)]["accuracy"]) for sp in specs if _family(sp) == k)
            ax.plot([100 * b for b, _ in pts], [a for _, a in pts], marker="o", label=k)
        for base, style in (("dense", "k-"), ("window_only", "r--")):
            if (c, base) in by:
                ax.axhline(by[(c, base)]["accuracy"], color=style[0], linestyle=style[1:], label=base)
        ax.set_xscale("log")
        ax.set_xlabel("host budget (% of context)")
        ax.set_ylabel("accuracy (points)")
        ax.set_title(f"{s['model']}, {c} tokens, window {s['window']}")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["GAP_BUDGET", "PROMPTS_CONTEXT", "GridItem", "PolicyTime", "Report", "check_settings", "grid_items",
           "policy_times", "run_grid"]
