"""End-to-end check of a real sglang server under `--kv-tier`, policy against policy.

    python -m kvtier_sglang.serve_check --model-path MODEL [--load-format dummy] \
        --policies policies/dense.yaml,policies/hgca.yaml --contexts 8192,30000

For each policy file it launches `python -m sglang.launch_server --kv-tier
FILE`, waits for it to serve, sends the same seeded long-context requests
(greedy, streamed: the first chunk times the prefill, the chunks after it
the decode), then a mixed-length batch, and stops it. It writes what each
policy answered, the decode speed and the server's kvtier log lines to
`serve-<name>.json` and `.md` under the results directory, and prints
`match_tokens=<min over requests of the fraction of generated tokens equal to
the first policy's> decode_vs_first=<decode tokens/s against the first policy's>`.

It needs a machine where sglang can serve (a GPU); it talks to the server over
HTTP only and imports nothing from sglang.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from kvtier.bench.results import add_results_dir_argument, results_dir
from kvtier.config import env as kvtier_env


def _post(url: str, body: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before serving; its log ({log}) ends:\n"
                               + _tail(log))
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        print(f"  waiting for the server ({time.monotonic() - start:.0f} s)", flush=True)
        time.sleep(5)
    raise TimeoutError(f"the server did not serve within {timeout:.0f} s; its log ({log}) ends:\n" + _tail(log))


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _prompt(n: int, seed: int, vocab: int) -> List[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(n)]


def _greedy(ids, new_tokens: int, *, stream: bool = False) -> Dict[str, Any]:
    """A /generate body: greedy, exactly new_tokens tokens."""
    return {"input_ids": ids, "stream": stream, "sampling_params": {
        "max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}}


def _generate(base: str, ids, new_tokens: int, timeout: float) -> Any:
    return _post(base + "/generate", _greedy(ids, new_tokens), timeout)


class Streamed(NamedTuple):
    out: Dict[str, Any]  # the last chunk: the whole answer so far
    first_s: float  # request sent to the first chunk (prefill and the first token)
    first_tokens: int  # tokens the first chunk carried
    last_s: float  # request sent to the last chunk
    chunks: Tuple[Tuple[float, int], ...] = ()  # (seconds since the request was sent, completion tokens so far) per chunk


def _generate_streamed(base: str, ids, new_tokens: int, timeout: float) -> Streamed:
    """One greedy request read as sglang's server-sent events ("data: {...}" lines, then "data: [DONE]")."""
    req = urllib.request.Request(base + "/generate", data=json.dumps(_greedy(ids, new_tokens, stream=True)).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    last: Optional[Dict[str, Any]] = None
    got: List[int] = []
    first_s = last_s = 0.0
    first_tokens = 0
    chunks: List[Tuple[float, int]] = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter() - t0
            piece = _ids(chunk)
            # Cumulative chunks (sglang's default) carry every id so far; incremental ones only the new ids.
            got = piece if len(piece) >= _completion_tokens(chunk) else got + piece
            if last is None:
                first_s, first_tokens = now, _completion_tokens(chunk)
            last, last_s = chunk, now
            chunks.append((now, _completion_tokens(chunk)))
    if last is None:
        raise RuntimeError("the server's stream ended without a chunk")
    return Streamed({**last, "output_ids": got}, first_s, first_tokens, last_s, tuple(chunks))


def _completion_tokens(out: Dict[str, Any]) -> int:
    meta = out.get("meta_info") or {}
    n = meta.get("completion_tokens")
    return int(n) if n is not None else len(_ids(out))


def decode_rate(s: Streamed) -> Optional[float]:
    """Tokens per second after the first chunk (None when one chunk carried everything)."""
    n = _completion_tokens(s.out) - s.first_tokens
    span = s.last_s - s.first_s
    return n / span if n > 0 and span > 0 else None


def steady_decode_rate(s: Streamed) -> Optional[float]:
    """Tokens per second after the second chunk: without the first decode step, which under an
    offloading policy also moves the whole prompt's out-of-window pages to the host."""
    if len(s.chunks) < 3:
        return None
    (t1, n1), (t2, n2) = s.chunks[1], s.chunks[-1]
    return (n2 - n1) / (t2 - t1) if n2 > n1 and t2 > t1 else None


def first_decode_step_s(s: Streamed) -> Optional[float]:
    """Seconds from the first chunk to the second (the first decode step, when chunks carry one token)."""
    return s.chunks[1][0] - s.chunks[0][0] if len(s.chunks) >= 2 else None


def _finish_reason(out: Dict[str, Any]) -> Any:
    return (out.get("meta_info") or {}).get("finish_reason")


def _ids(out: Dict[str, Any]) -> List[int]:
    ids = out.get("output_ids")
    return list(ids) if ids is not None else []


def run_policy(policy: Path, args: argparse.Namespace, log_dir: Path) -> Dict[str, Any]:
    log = log_dir / f"server-{policy.stem}.log"
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model_path, "--kv-tier", str(policy),
           "--port", str(args.port), "--attention-backend", args.attention_backend,
           "--mem-fraction-static", str(args.mem_fraction), "--log-level", "info", *args.extra]
    if args.load_format:
        cmd += ["--load-format", args.load_format]
    print(f"{policy.name}: {' '.join(cmd)}", flush=True)
    base = f"http://127.0.0.1:{args.port}"
    with open(log, "w") as f:
        # Tier statistics every second, so that the short check's log shows slots released and pages moved.
        child_env = {**os.environ, kvtier_env.STATS_INTERVAL.name: "1"}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=child_env)
    result: Dict[str, Any] = {"policy": str(policy), "command": cmd, "seed": args.seed, "vocab": args.vocab,
                              "requests": []}
    try:
        _wait_ready(base, proc, log, args.ready_timeout)
        # Warm-up: kernels compiled on first use must not count as decode time.
        _generate(base, _prompt(min(args.contexts), seed=args.seed - 1, vocab=args.vocab), 4, args.request_timeout)
        for ctx in args.contexts:
            ids = _prompt(ctx, seed=args.seed + ctx, vocab=args.vocab)
            st = _generate_streamed(base, ids, args.new_tokens, args.request_timeout)
            out = st.out
            rec = {"context": ctx, "output_ids": _ids(out), "text": out.get("text", ""),
                   "finish_reason": _finish_reason(out),
                   "prefill_s": st.first_s, "total_s": st.last_s,  # prefill_s: time to the first token
                   "decode_tokens_per_s": decode_rate(st), "steady_decode_tokens_per_s": steady_decode_rate(st),
                   "first_decode_step_s": first_decode_step_s(st)}
            result["requests"].append(rec)
            if not rec["output_ids"]:
                print(f"  context {ctx}: no tokens came back (finish reason {rec['finish_reason']})", flush=True)
            print(f"  context {ctx}: {rec['total_s']:.2f} s for {args.new_tokens} tokens, decode "
                  f"{rec['decode_tokens_per_s'] or float('nan'):.1f} tokens/s (after the first decode step "
                  f"{rec['steady_decode_tokens_per_s'] or float('nan'):.1f}; that step "
                  f"{rec['first_decode_step_s'] or float('nan'):.3f} s)", flush=True)
        if args.follow_ups:
            # A follow-up on each long context: its prompt minus the last 64 tokens, then new ones. The
            # first request has finished, so a prefix cache serves the shared part (under an offloading
            # policy, host pages included) and only the rest is prefilled.
            for ctx in args.contexts:
                ids = _prompt(ctx, seed=args.seed + ctx, vocab=args.vocab)[:-64] + _prompt(
                    96, seed=args.seed + ctx + 1, vocab=args.vocab)
                st = _generate_streamed(base, ids, args.new_tokens, args.request_timeout)
                meta = st.out.get("meta_info") or {}
                rec = {"context": len(ids), "shares": ctx - 64, "output_ids": _ids(st.out),
                       "finish_reason": _finish_reason(st.out), "prefill_s": st.first_s, "total_s": st.last_s,
                       "cached_tokens": meta.get("cached_tokens")}
                result.setdefault("follow_ups", []).append(rec)
                print(f"  follow-up sharing {ctx - 64} tokens: first token after {rec['prefill_s']:.2f} s, "
                      f"{rec['cached_tokens']} prompt tokens from the cache", flush=True)
        if args.turns > 1:
            # A conversation on the longest context: each turn's prompt is the previous prompt,
            # its answer and 64 new tokens, so a prefix cache can serve all of the previous turn.
            ctx = max(args.contexts)
            ids = _prompt(ctx, seed=args.seed + 3 * ctx, vocab=args.vocab)
            for turn in range(args.turns):
                st = _generate_streamed(base, ids, args.new_tokens, args.request_timeout)
                meta = st.out.get("meta_info") or {}
                rec = {"turn": turn + 1, "context": len(ids), "output_ids": _ids(st.out),
                       "finish_reason": _finish_reason(st.out), "prefill_s": st.first_s,
                       "cached_tokens": meta.get("cached_tokens")}
                result.setdefault("turns", []).append(rec)
                print(f"  turn {turn + 1}: {len(ids)} prompt tokens, {rec['cached_tokens']} from the cache, first "
                      f"token after {rec['prefill_s']:.2f} s", flush=True)
                ids = ids + rec["output_ids"] + _prompt(64, seed=args.seed + ctx + 100 + turn, vocab=args.vocab)
        # Mixed lengths in one batch: long ones with pages on the host, short ones with none yet.
        lens = [max(args.contexts), max(args.contexts) // 2, 900, 200]
        batch = [_prompt(n, seed=args.seed + 7 * n, vocab=args.vocab) for n in lens]
        outs = _generate(base, batch, args.new_tokens, args.request_timeout)
        result["batch"] = [{"context": n, "output_ids": _ids(o), "text": o.get("text", ""),
                            "finish_reason": _finish_reason(o)}
                           for n, o in zip(lens, outs)]
        print(f"  mixed batch {lens}: done", flush=True)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        lines = [line for line in _tail(log, 100000).splitlines() if "kvtier" in line and "server_args=" not in line]
        result["kvtier_log"] = lines if len(lines) <= 50 else lines[:10] + lines[-40:]
        result["decode_steps"] = decode_steps(lines)
        result["returncode"] = proc.returncode
    return result


_DECODE_LINE = re.compile(r"kvtier: decode (\d+) steps, ([\d.]+) ms/step: attention ([\d.]+) \(engine ([\d.]+), "
                          r"window GPU ([\d.]+)\), plan ([\d.]+)")


def decode_steps(lines: List[str]) -> Optional[Dict[str, float]]:
    """The scheduler's `kvtier: decode ...` statistics lines summed up: steps, and the
    step-weighted mean of each part in ms (None when no line was logged)."""
    parts = ("step_ms", "attention_ms", "engine_ms", "window_gpu_ms", "plan_ms")
    total = {k: 0.0 for k in parts}
    steps = 0
    for line in lines:
        m = _DECODE_LINE.search(line)
        if m:
            n = int(m.group(1))
            steps += n
            for k, v in zip(parts, m.groups()[1:]):
                total[k] += n * float(v)
    if not steps:
        return None
    return {"steps": steps, **{k: v / steps for k, v in total.items()}}


def agree_tokens(a: List[int], b: List[int]) -> int:
    """Generated tokens equal up to the first difference (greedy decoding diverges after one)."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def _agreement(a: List[int], b: List[int]) -> float:
    """agree_tokens as a fraction of the longer answer."""
    n = max(len(a), len(b))
    return agree_tokens(a, b) / n if n else 0.0


def compare(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    first = results[0]
    out = {}
    for res in results[1:]:
        pairs = (list(zip(first["requests"], res["requests"])) + list(zip(first.get("batch", []), res.get("batch", [])))
                 + list(zip(first.get("follow_ups", []), res.get("follow_ups", [])))
                 + list(zip(first.get("turns", []), res.get("turns", []))))
        match = [_agreement(a["output_ids"], b["output_ids"]) for a, b in pairs]
        speed = [b["decode_tokens_per_s"] / a["decode_tokens_per_s"] for a, b in zip(first["requests"],
                                                                                   res["requests"])
                 if a.get("decode_tokens_per_s") and b.get("decode_tokens_per_s")]
        out[res["policy"]] = {"match_tokens": min(match) if match else None,
                              "match_per_request": match,
                              "decode_vs_first": speed[-1] if speed else None}
    return out


def reference_from(path: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """The first policy's result of an earlier run, checked to have sent the same prompts."""
    ref = json.loads(path.read_text())["results"][0]
    contexts = [r["context"] for r in ref["requests"]]
    if contexts != list(args.contexts):
        raise ValueError(f"it ran contexts {contexts}, this run {list(args.contexts)}")
    lens = {len(r["output_ids"]) for r in ref["requests"]}
    if lens - {args.new_tokens}:
        raise ValueError(f"it generated {sorted(lens)} tokens per request, this run {args.new_tokens}")
    if ref.get("seed", args.seed) != args.seed or ref.get("vocab", args.vocab) != args.vocab:
        raise ValueError(f"it drew prompts with seed {ref.get('seed')} below {ref.get('vocab')}, this run with "
                         f"seed {args.seed} below {args.vocab}")
    return ref


def _num(x: Optional[float], digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _extra_table(results: List[Dict[str, Any]], key: str, title: str, heads: Tuple[str, ...], cells) -> List[str]:
    """Markdown lines of the requests under results[i][key] (follow-ups, turns): cells(r) gives the
    leading columns, then the tokens from the cache, the first token's time and agreement with the
    first policy's answers ([] when no result has any)."""
    first, lines = results[0], []
    for res in results:
        ref = first.get(key, [])
        for i, r in enumerate(res.get(key, [])):
            agree = "(reference)" if res is first else (
                f"{_agreement(ref[i]['output_ids'], r['output_ids']):.2f}" if i < len(ref) else "n/a")
            lead = " | ".join(str(c) for c in cells(r))
            lines.append(f"| {Path(res['policy']).stem} | {lead} | {r.get('cached_tokens', 'n/a')} | "
                         f"{r['prefill_s']:.2f} | {agree} |")
    if not lines:
        return []
    return ["", title, "", "| policy | " + " | ".join(heads) + " | first token s | tokens equal to the first "
            "policy's |", "|---" * (len(heads) + 3) + "|", *lines]


def _markdown(results: List[Dict[str, Any]], cmp: Dict[str, Any], new_tokens: int) -> str:
    rows = ["| policy | context | decode tokens/s | after the first step | first decode step s | first token s "
            "| tokens equal to the first policy's |", "|---|---|---|---|---|---|---|"]
    first = results[0]
    for res in results:
        for i, r in enumerate(res["requests"]):
            if res is first:
                agree = "(reference)"
            else:
                agree = f"{_agreement(first['requests'][i]['output_ids'], r['output_ids']):.2f}"
            tps, steady, step1 = (r.get(k) for k in ("decode_tokens_per_s", "steady_decode_tokens_per_s",
                                                     "first_decode_step_s"))
            rows.append(f"| {Path(res['policy']).stem} | {r['context']} | {_num(tps, 1)} | {_num(steady, 1)} | "
                        f"{_num(step1, 3)} | {r['prefill_s']:.2f} | {agree} |")
    rows += _extra_table(results, "follow_ups", "Follow-ups (a prompt sharing all but the last 64 tokens of a finished "
                         "one, then 96 new tokens):", ("context", "shared tokens", "prompt tokens from the cache"),
                         lambda r: (r["context"], r["shares"]))
    rows += _extra_table(results, "turns", "A conversation (each turn: the previous prompt, its answer and 64 new "
                         "tokens):", ("turn", "prompt tokens", "from the cache"), lambda r: (r["turn"], r["context"]))
    steps = [f"- {Path(r['policy']).stem}: {d['steps']} steps, {d['step_ms']:.1f} ms/step: attention "
             f"{d['attention_ms']:.1f} (engine {d['engine_ms']:.1f}, window GPU {d['window_gpu_ms']:.1f}), plan "
             f"{d['plan_ms']:.1f}" for r in results for d in [r.get("decode_steps")] if d]
    launches = [f"- {Path(r['policy']).stem}: `{' '.join(r['command'][r['command'].index('--kv-tier'):])}`"
                for r in results if "--kv-tier" in r.get("command", [])]
    return (f"# sglang server under --kv-tier\n\nGreedy, {new_tokens} new tokens per request, seeded random "
            "token prompts, streamed: decode tokens/s counts the tokens after the first chunk over the time "
            "after it; the next column the same after the second chunk, leaving out the first decode step, "
            "which under an offloading policy also evicts the prompt's out-of-window pages.\n\n" + "\n".join(rows)
            + ("\n\nDecode steps as the tier's scheduler logged them (every step of the check, weighted by "
               "steps):\n\n" + "\n".join(steps) if steps else "")
            + "\n\nLaunched with (after the model arguments):\n\n" + "\n".join(launches) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvtier_sglang.serve_check", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--load-format", default=None, help="e.g. dummy: random weights from the model's config")
    p.add_argument("--policies", default="policies/dense.yaml,policies/hgca.yaml",
                   help="comma-separated policy files; the first is the reference")
    p.add_argument("--contexts", default="8192,30000")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000, help="prompt token ids are drawn below this")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--attention-backend", default="flashinfer")
    p.add_argument("--mem-fraction", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=400)
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--follow-ups", action="store_true",
                   help="after each long request, one sharing its prompt but the last 64 tokens (a prefix cache hit)")
    p.add_argument("--turns", type=int, default=0,
                   help="also a conversation of this many turns on the longest context (each turn's prompt: the "
                        "previous prompt, its answer and 64 new tokens)")
    p.add_argument("--name", default="serve")
    add_results_dir_argument(p, "--out-dir")
    p.add_argument("--reference", default=None,
                   help="an earlier run's JSON whose first policy is the reference (e.g. dense launched with other "
                        "arguments); it must have used the same --contexts, --seed, --vocab and --new-tokens")
    p.add_argument("extra", nargs="*", help="more launch_server arguments, after --")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",")]
    policies = [Path(x) for x in args.policies.split(",")]
    for path in policies:
        if not path.is_file():
            print(f"serve_check: policy file {path} not found", file=sys.stderr)
            return 2
    results: List[Dict[str, Any]] = []
    if args.reference:
        try:
            results.append(reference_from(Path(args.reference), args))
        except (OSError, ValueError) as exc:
            print(f"serve_check: --reference {args.reference}: {exc}", file=sys.stderr)
            return 2
    out_dir = results_dir(args.results_dir)
    for path in policies:
        try:
            results.append(run_policy(path, args, out_dir))
        except (RuntimeError, TimeoutError, urllib.error.URLError) as exc:
            print(f"serve_check: {path}: {exc}", file=sys.stderr)
            return 1
        # Written after every policy, so a run cut short keeps what it measured.
        cmp = compare(results)
        (out_dir / f"{args.name}.json").write_text(json.dumps({"results": results, "comparison": cmp}, indent=1))
        (out_dir / f"{args.name}.md").write_text(_markdown(results, cmp, args.new_tokens))
        if len(results) > 1:
            c = cmp[str(path)]
            print(f"{path.stem}: match_tokens={c['match_tokens']} decode_vs_first={c['decode_vs_first']}", flush=True)
    print(f"wrote {out_dir / f'{args.name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
