"""sglang's own benchmark client, `python -m sglang.bench_serving`: its command line and its results.

One sweep level is one client run: `--dataset-name random-ids --tokenize-prompt`
sends each request as exactly `input_len` token ids (random ids need no
dataset download; token ids need no re-tokenization, so the lengths are
exact), `--random-range-ratio 1` fixes input and output lengths, and
`ignore_eos` (the client's default) makes every request generate all its
output tokens. The client appends one JSON object per run to
`--output-file`; the keys read here are the ones its `benchmark()` writes
(`sglang/benchmark/serving.py` on the 0.5.2x line, `sglang/bench_serving.py`
before), with `--output-details` adding per-request lists such as `errors`.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

MODULE = "sglang.bench_serving"
# Every flag client_command passes, checked against the installed client's --help before a run.
FLAGS = ("--backend", "--host", "--port", "--model", "--tokenizer", "--dataset-name", "--tokenize-prompt",
         "--random-input-len", "--random-output-len", "--random-range-ratio", "--num-prompts", "--max-concurrency",
         "--request-rate", "--seed", "--warmup-requests", "--output-file", "--output-details", "--disable-tqdm")
# Result keys: required (a run without them did not measure), then optional (newer clients only).
REQUIRED = ("completed", "duration", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "p99_tpot_ms")
OPTIONAL = ("request_throughput", "total_output_tokens", "median_itl_ms", "p99_itl_ms", "concurrency",
            "max_concurrent_requests", "max_output_tokens_per_s")


class Level(NamedTuple):
    """One point of a sweep: at most `concurrency` requests in flight (None: unbounded), arriving at
    `request_rate` per second (inf: all at once), `prompts` requests in all."""

    concurrency: Optional[int]
    request_rate: float
    prompts: int


class ClientError(RuntimeError):
    """The client could not run, or wrote no result."""


class ClientResult(NamedTuple):
    completed: int
    failed: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: Optional[float]
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: Optional[float]
    mean_concurrency: Optional[float]  # requests in flight, averaged over the run (the client's own count)
    client_peak_concurrency: Optional[int]  # requests in flight at most (clients from the 0.5.2x line)
    first_error: Optional[str]


def client_command(*, python: str, host: str, port: int, model_dir: str, input_len: int, output_len: int,
                   level: Level, output_file: str, seed: int, warmup_requests: int = 1) -> List[str]:
    cmd = [python, "-m", MODULE, "--backend", "sglang", "--host", host, "--port", str(port),
           "--model", model_dir, "--tokenizer", model_dir, "--dataset-name", "random-ids", "--tokenize-prompt",
           "--random-input-len", str(input_len), "--random-output-len", str(output_len),
           "--random-range-ratio", "1.0", "--num-prompts", str(level.prompts),
           "--request-rate", "inf" if math.isinf(level.request_rate) else f"{level.request_rate:g}",
           "--seed", str(seed), "--warmup-requests", str(warmup_requests), "--output-file", output_file,
           "--output-details", "--disable-tqdm"]
    if level.concurrency is not None:
        cmd += ["--max-concurrency", str(level.concurrency)]
    return cmd


def missing_flags(help_text: str, flags: Sequence[str] = FLAGS) -> List[str]:
    """The flags of client_command that the installed client's --help does not list."""
    return [f for f in flags if f not in help_text]


def read_result(path: pathlib.Path, *, prompts: int) -> ClientResult:
    """The last run the client appended to path (JSON lines; `Infinity` for an unbounded rate parses)."""
    path = pathlib.Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except OSError as exc:
        raise ClientError(f"the client wrote no result file ({path}: {exc.strerror})") from None
    if not lines:
        raise ClientError(f"the client's result file {path} is empty")
    try:
        data: Dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ClientError(f"the client's result file {path} does not end with a JSON line: {exc}") from None
    if not isinstance(data, dict):
        raise ClientError(f"the client's result file {path} ends with {type(data).__name__}, not an object")
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise ClientError(f"the client's result lacks {', '.join(missing)} (found {', '.join(sorted(data))})")
    errors = [e for e in data.get("errors") or [] if e]

    def opt(key: str, cast=float):
        value = data.get(key)
        return None if value is None else cast(value)

    completed = int(data["completed"])
    return ClientResult(completed, max(0, prompts - completed), float(data["duration"]),
                        float(data["output_throughput"]), opt("request_throughput"),
                        float(data["median_ttft_ms"]), float(data["p99_ttft_ms"]), float(data["median_tpot_ms"]),
                        float(data["p99_tpot_ms"]), opt("median_itl_ms"), opt("concurrency"),
                        opt("max_concurrent_requests", int), _first_line(errors[0]) if errors else None)


def _first_line(error: str, limit: int = 300) -> str:
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]  # a traceback's last line names the error


def progress(text: str) -> None:
    print(f"[kvtier bench serve] {text}", file=sys.stderr, flush=True)


__all__ = ["ClientError", "ClientResult", "FLAGS", "Level", "MODULE", "client_command", "missing_flags",
           "progress", "read_result"]
