"""The serving matrix: every server, every input length, concurrency swept until throughput stops growing.

For each server (stock sglang with CUDA graphs, then `--kv-tier` with each policy
that builds) one `sglang.launch_server` runs with dummy weights of the chosen
model and a static memory fraction that gives the KV pool of an 80 GB card; for
each input length the levels of max concurrency run one after the other, each a
run of sglang's own client, until a level adds less than --min-gain output
tokens/s or fails. Each level records the client's numbers (output tokens/s,
TPOT and TTFT p50/p99), the requests the server admitted at once (its decode
batches), and the card's and the server's host memory at their peaks.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import subprocess
import tempfile
from typing import Any, Dict, List, NamedTuple, Optional

import yaml

from ...config import ConfigError, env, load, loads
from ...config.host import host_memory_available
from ..results import machine, write
from . import report
from .client import ClientError, Level, client_command, missing_flags, progress, read_result
from .memory import GIB, MemoryArgError, MemorySampler, expected_kv_gib, gpu_memory, mem_fraction
from .models import ModelSpec, write_model_dir
from .server import LogReader, Server, ServerError, launch_command, parse_log, pool_tokens, python, tail

DENSE = report.DENSE


class ServerPlan(NamedTuple):
    name: str
    source: Optional[str]  # the policy file as named (None: stock sglang)
    skipped: Optional[str]  # why it does not run (None: it runs)


def plan_servers(names: List[str], policies_dir: pathlib.Path) -> List[ServerPlan]:
    """Each name: `dense` (stock sglang), a policy of policies_dir (`hgca` for hgca.yaml) or a YAML path.
    A policy that does not load or whose runtime this version lacks is skipped, with the reason."""
    from ...policies import PolicyUnavailableError, policy_for

    out = []
    for name in names:
        if name == DENSE:
            out.append(ServerPlan(DENSE, None, None))
            continue
        path = pathlib.Path(name) if name.endswith((".yaml", ".yml")) else policies_dir / f"{name}.yaml"
        label = path.stem if path.suffix else name
        if not path.is_file():
            out.append(ServerPlan(label, str(path), f"no policy file {path.name}"))
            continue
        try:
            policy_for(load(path))
        except ConfigError as exc:
            out.append(ServerPlan(label, str(path), f"does not validate: {exc}"))
            continue
        except PolicyUnavailableError as exc:
            out.append(ServerPlan(label, str(path), str(exc)))
            continue
        out.append(ServerPlan(label, str(path), None))
    return out


def policy_with_capacity(source: pathlib.Path, capacity_gib: float, out: pathlib.Path) -> Dict[str, Any]:
    """Copy the policy file to out with host_store.capacity_gib set (validated); the settings changed."""
    data = yaml.safe_load(source.read_text())
    store = dict(data.get("host_store") or {})
    store["capacity_gib"] = round(float(capacity_gib), 2)
    data["host_store"] = store
    text = yaml.safe_dump(data, sort_keys=False)
    config = loads(text, str(source))
    out.write_text(text)
    return {"host_store.capacity_gib": store["capacity_gib"]} if config.offloads else {}


def levels(concurrency: List[int], *, rate: float, per_level: int, min_prompts: int) -> List[Level]:
    return [Level(c, rate, max(min_prompts, per_level * c)) for c in sorted(set(concurrency))]


def check_inputs(spec: ModelSpec, input_lens: List[int], output_len: int) -> Optional[str]:
    too_long = [n for n in input_lens if n + output_len > spec.context_tokens]
    if too_long:
        return (f"input {too_long[0]} + output {output_len} tokens exceeds {spec.name}'s context of "
                f"{spec.context_tokens}; the longest input is {spec.context_tokens - output_len}")
    return None


def client_help(py: str, timeout_s: float = 300) -> str:
    out = subprocess.run([py, "-m", "sglang.bench_serving", "--help"], capture_output=True, text=True,
                         timeout=timeout_s)
    if out.returncode != 0:
        raise ClientError(f"python -m sglang.bench_serving --help exited with {out.returncode}:\n"
                          + "\n".join((out.stdout + out.stderr).splitlines()[-15:]))
    return out.stdout


class Matrix:
    """One run of the matrix (see the module docstring); rows are written after every level."""

    def __init__(self, args: argparse.Namespace, spec: ModelSpec, work: pathlib.Path, fraction: float,
                 host_gib: float, plans: List[ServerPlan]):
        self.args, self.spec, self.work, self.fraction, self.host_gib = args, spec, work, fraction, host_gib
        self.plans = plans
        self.model_dir = work / spec.name
        self.rows: List[Dict[str, Any]] = []
        self.servers: List[Dict[str, Any]] = []
        self.failed = False  # a server did not start
        self.child_env = env.child_environment({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                env.STATS_INTERVAL.name: "5"})
        self.expected_pool = int(expected_kv_gib(weight_bytes=spec.weight_bytes, reference_gib=args.as_gpu_gib,
                                                 reference_fraction=args.reference_mem_fraction) * GIB
                                 / spec.kv_bytes_per_token)

    # --- commands ---------------------------------------------------------

    def policy_file(self, plan: ServerPlan) -> Optional[pathlib.Path]:
        return None if plan.source is None else self.work / f"policy-{plan.name}.yaml"

    def launch(self, plan: ServerPlan) -> List[str]:
        policy = self.policy_file(plan)
        return launch_command(python=python(), model_dir=str(self.model_dir), port=self.args.port,
                              mem_fraction=self.fraction, policy=None if policy is None else str(policy),
                              attention_backend=self.args.attention_backend, extra=self.args.extra)

    def client(self, plan: ServerPlan, input_len: int, level: Level) -> List[str]:
        out = self.work / f"client-{plan.name}-{input_len}-c{level.concurrency}.jsonl"
        return client_command(python=python(), host="127.0.0.1", port=self.args.port, model_dir=str(self.model_dir),
                              input_len=input_len, output_len=self.args.output_len, level=level,
                              output_file=str(out), seed=self.args.seed)

    def host_requests(self, plan: ServerPlan) -> Optional[int]:
        """Requests of the longest input and the output the host store holds under plan's policy."""
        if plan.source is None:
            return None
        config = load(plan.source)
        if not config.offloads:
            return None
        tokens = max(self.args.input_lens) + self.args.output_len
        return int(self.host_gib * GIB // (config.host_bytes_per_token(self.spec.shape) * tokens))

    def shown(self, cmd: List[str], plan: ServerPlan) -> List[str]:
        """A command as recorded: no interpreter, the model and policy by name rather than by path."""
        subs = {str(self.model_dir): self.spec.name}
        policy = self.policy_file(plan)
        if policy is not None:
            subs[str(policy)] = f"{plan.source} (host_store.capacity_gib: {self.host_gib:g})"
        return [subs.get(c, c) for c in cmd[3:]]

    # --- running ----------------------------------------------------------

    def run(self) -> int:
        args = self.args
        write_model_dir(self.spec, self.model_dir, tokenizer=args.tokenizer)
        progress(f"model directory {self.model_dir} ({self.spec.note}); work files in {self.work}")
        for plan in self.plans:
            if plan.skipped:
                progress(f"{plan.name}: skipped ({plan.skipped})")
                self.servers.append({"server": plan.name, "policy": plan.source, "skipped": plan.skipped})
                continue
            self.run_server(plan)
            self.save()
        return self.finish()

    def run_server(self, plan: ServerPlan) -> None:
        args = self.args
        record: Dict[str, Any] = {"server": plan.name, "policy": plan.source, "stops": {}}
        self.servers.append(record)
        if plan.source is not None:
            record["changed"] = policy_with_capacity(pathlib.Path(plan.source), self.host_gib, self.policy_file(plan))
        cmd = self.launch(plan)
        record["launch"] = self.shown(cmd, plan)
        record["host_store_requests"] = self.host_requests(plan)
        log = self.work / f"server-{plan.name}.log"
        server: Optional[Server] = None
        try:
            for input_len in args.input_lens:
                if server is None or not server.alive():
                    if server is not None:
                        server.stop()
                    server = self.start(plan, cmd, log, record)
                    if server is None:
                        return
                record["stops"][str(input_len)] = self.sweep(plan, server, input_len)
                if record["stops"][str(input_len)].startswith(("timed out", "the server exited")):
                    server.stop()  # a level cut short leaves requests running: the next input starts afresh
        finally:
            if server is not None:
                server.stop()

    def start(self, plan: ServerPlan, cmd: List[str], log: pathlib.Path, record: Dict[str, Any]) -> Optional[Server]:
        progress(f"{plan.name}: starting the server (log {log})")
        server = Server(cmd, log, env=self.child_env, base=f"http://127.0.0.1:{self.args.port}").start()
        sampler = MemorySampler(server.sid, gpu_index=self.args.gpu_index).start()
        try:
            record["ready_s"] = server.wait_ready(self.args.ready_timeout, report=progress)
        except ServerError as exc:
            sampler.stop()
            server.stop()
            record["error"] = str(exc).splitlines()[0]
            progress(f"{plan.name}: {exc}")
            self.failed = True
            return None
        startup = sampler.stop()
        idle = MemorySampler(server.sid, gpu_index=self.args.gpu_index).start().stop()
        info = server.get_json("/server_info") or server.get_json("/get_server_info")
        record.update(pool_tokens=pool_tokens(info), expected_pool_tokens=self.expected_pool,
                      startup_device_peak_gib=startup.device_gib, startup_host_peak_gib=startup.host_gib,
                      ready_device_gib=idle.device_gib, ready_host_gib=idle.host_gib)
        pool = record["pool_tokens"]
        progress(f"{plan.name}: serving after {record['ready_s']:.0f} s; KV pool {pool} tokens (an "
                 f"{self.args.as_gpu_gib:g} GiB card at fraction {self.args.reference_mem_fraction:g}: about "
                 f"{self.expected_pool})")
        return server

    def sweep(self, plan: ServerPlan, server: Server, input_len: int) -> str:
        """The levels at one input length; returns why the sweep stopped."""
        args = self.args
        reader = LogReader(server.log)
        reader.since()  # what came before this sweep is not its own
        throughputs: List[float] = []
        for level in levels(args.concurrency, rate=args.request_rate, per_level=args.prompts_per_level,
                            min_prompts=args.min_prompts):
            row: Dict[str, Any] = {"server": plan.name, "input_len": input_len, "output_len": args.output_len,
                                   "concurrency": level.concurrency, "request_rate": level.request_rate,
                                   "prompts": level.prompts}
            self.rows.append(row)
            server.post("/flush_cache")
            progress(f"{plan.name}: input {input_len}, concurrency {level.concurrency}, {level.prompts} requests")
            sampler = MemorySampler(server.sid, gpu_index=args.gpu_index).start()
            cmd = self.client(plan, input_len, level)
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.level_timeout,
                                     env=self.child_env)
            except subprocess.TimeoutExpired:
                out = None
            peaks = sampler.stop()
            stats = parse_log(reader.since())
            row.update(device_peak_gib=peaks.device_gib, host_peak_gib=peaks.host_gib,
                       admitted_max=stats.admitted_max, queued_max=stats.queued_max,
                       token_usage_max=stats.token_usage_max, host_tokens_max=stats.host_tokens_max,
                       tier_decode=stats.decode)
            if out is None:
                row["status"] = f"timed out after {args.level_timeout:.0f} s"
                self.save()
                return row["status"]
            if not server.alive():
                row["status"] = f"the server exited with {server.proc.returncode}"
                progress(f"{plan.name}: {row['status']}; its log ({server.log}) ends:\n{tail(server.log)}")
                self.save()
                return row["status"]
            try:
                if out.returncode != 0:
                    raise ClientError(f"the client exited with {out.returncode}: "
                                      + " | ".join((out.stdout + out.stderr).strip().splitlines()[-5:]))
                res = read_result(pathlib.Path(cmd[cmd.index("--output-file") + 1]), prompts=level.prompts)
            except ClientError as exc:
                row["status"] = f"client failed: {exc}"
                progress(f"{plan.name}: {row['status']}")
                self.save()
                return row["status"]
            row.update(res._asdict())
            row["status"] = "ok" if res.failed == 0 else f"{res.failed} requests failed: {res.first_error}"
            progress(f"{plan.name}: input {input_len}, concurrency {level.concurrency}: "
                     f"{res.output_tokens_per_s:.1f} output tok/s, TPOT p50 {res.tpot_p50_ms:.1f} ms, TTFT p50 "
                     f"{res.ttft_p50_ms / 1e3:.2f} s, admitted {stats.admitted_max}, device "
                     f"{_gib(peaks.device_gib)}, host {peaks.host_gib:.1f} GiB")
            self.save()
            if res.failed:
                return row["status"]
            throughputs.append(res.output_tokens_per_s)
            why = report.stop_reason(throughputs, args.min_gain)
            if why:
                return why
        return "every level ran"

    # --- results ----------------------------------------------------------

    def payload(self) -> Dict[str, Any]:
        args = self.args
        summary = report.summarize(self.rows)
        return {"bench": "serve", "model": self.spec.name, "model_note": self.spec.note, "machine": machine(),
                "settings": {"input_lens": args.input_lens, "output_len": args.output_len,
                             "concurrency": args.concurrency, "request_rate": args.request_rate,
                             "min_gain": args.min_gain, "as_gpu_gib": args.as_gpu_gib,
                             "reference_mem_fraction": args.reference_mem_fraction,
                             "mem_fraction_static": self.fraction, "host_store_gib": self.host_gib,
                             "kv_bytes_per_token": self.spec.kv_bytes_per_token,
                             "weight_gib": self.spec.weight_bytes / GIB, "seed": args.seed},
                "servers": self.servers, "rows": self.rows, "summary": summary,
                "headline": report.headline(summary, self.spec.name)}

    def save(self) -> pathlib.Path:
        payload = self.payload()
        title = f"Serving matrix: {self.spec.name}, dummy weights, sglang's bench_serving"
        caption = (f"{self.spec.note}. Inputs {', '.join(map(str, self.args.input_lens))} tokens (random ids, exact), "
                   f"{self.args.output_len} output tokens each. `--mem-fraction-static {self.fraction:g}`: the KV pool "
                   f"of a {self.args.as_gpu_gib:g} GiB card at {self.args.reference_mem_fraction:g}. Host store "
                   f"{self.host_gib:g} GiB per kvtier server. Admitted at once: the most requests in one of the "
                   "server's decode batches; device: the card's used memory at its peak; host: the server's "
                   "resident memory at its peak.")
        return write(self.args.name, payload,
                     report.table(self.rows, payload["summary"], self.servers, title=title, caption=caption),
                     out_dir=self.args.results_dir)

    def finish(self) -> int:
        path = self.save()
        if report.plot(self.rows, path.with_suffix(".png"), title=f"{self.spec.name}: {self.args.name}"):
            progress(f"plot {path.with_suffix('.png')}")
        print(f"wrote {path}")
        summary = report.summarize(self.rows)
        for inp, servers in summary.items():
            for name, s in servers.items():
                vs = "" if name == DENSE else (f" tok/s_vs_dense={s.get('tokens_per_s_vs_dense', math.nan):.2f} "
                                               f"admitted_vs_dense={s.get('admitted_vs_dense', math.nan):.2f}")
                print(f"input={inp} server={name} best_tokens_per_s={s['best_tokens_per_s']:.1f} "
                      f"admitted_max={s.get('admitted_max')}{vs}")
        ran = [r for r in self.rows if r.get("status") == "ok"]
        return 0 if ran and not self.failed else 1


def _gib(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.1f} GiB"


def default_host_gib() -> float:
    """Three quarters of the memory available now, in whole GiB (0 when unknown)."""
    return float(int(0.75 * host_memory_available() / GIB))


def work_dir(given: Optional[str]) -> pathlib.Path:
    if given:
        path = pathlib.Path(given)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return pathlib.Path(tempfile.mkdtemp(prefix="kvtier-serve-"))


def device_fraction(args: argparse.Namespace) -> float:
    """--mem-fraction-static for this card: --mem-fraction if given, else the arithmetic of memory.py over
    --device-gib or what nvidia-smi reports."""
    if args.mem_fraction:
        return args.mem_fraction
    total = args.device_gib
    if not total:
        mem = gpu_memory(args.gpu_index)
        if mem is None:
            raise MemoryArgError("nvidia-smi does not answer here: pass --device-gib (the card's memory) or "
                                 "--mem-fraction")
        total = mem["total_gib"]
    return mem_fraction(total, reference_gib=args.as_gpu_gib, reference_fraction=args.reference_mem_fraction)


__all__ = ["Matrix", "ServerPlan", "check_inputs", "client_help", "default_host_gib", "device_fraction", "levels",
           "plan_servers", "policy_with_capacity", "work_dir"]
