"""One `python -m sglang.launch_server` for the serving matrix: its command, its process, its log.

The server runs in its own session (its scheduler and detokenizer with it), logs
to a file, and is stopped with its whole process group. Its log is read in
pieces, one per sweep level (`LogReader.since`): sglang's `Decode batch, #running-req:
N` lines give the requests it admitted at once, its `#queue-req` lines those
that waited, and kvtier's `kvtier:` statistics lines the tier's host tokens and
decode steps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

# Every recorded server run's flags: FlashInfer (kvtier's window and sglang's dense alike), prefill graphs off.
COMMON = ("--cuda-graph-backend-prefill", "disabled", "--log-level", "info")


class ServerError(RuntimeError):
    """The server did not start, or stopped serving."""


def launch_command(*, python: str, model_dir: str, port: int, mem_fraction: float, policy: Optional[str],
                   attention_backend: str = "flashinfer", extra: Sequence[str] = ()) -> List[str]:
    """policy: the kvtier YAML (None: stock sglang, nothing of the tier). extra: more launch_server arguments."""
    cmd = [python, "-m", "sglang.launch_server", "--model-path", model_dir, "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(port), "--mem-fraction-static", f"{mem_fraction:g}",
           "--attention-backend", attention_backend, *COMMON]
    if policy is not None:
        cmd += ["--kv-tier", policy]
    return cmd + list(extra)


def tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Server:
    """A launched server (use as a context manager: it is stopped on the way out, whatever happened)."""

    def __init__(self, cmd: List[str], log: Path, *, env: Dict[str, str], base: str):
        self.cmd, self.log, self.env, self.base = cmd, log, env, base
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Server":
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env)
        return self

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def sid(self) -> int:
        return self.proc.pid  # start_new_session: the launcher leads its own session

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(f"the server exited with {code}; its log ({self.log}) ends:\n{tail(self.log)}")

    def wait_ready(self, timeout_s: float, *, report=None, every_s: float = 30.0) -> float:
        """Seconds until /health answered 200; ServerError with the log's tail when it exits or times out."""
        start = last = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if not self.alive():
                raise ServerError(f"the server exited with {self.proc.returncode} before serving; its log "
                                  f"({self.log}) ends:\n{tail(self.log)}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if report is not None and time.monotonic() - last >= every_s:
                last = time.monotonic()
                report(f"waiting for the server ({last - start:.0f} s)")
            time.sleep(2)
        raise ServerError(f"the server did not serve within {timeout_s:.0f} s; its log ({self.log}) ends:\n"
                          f"{tail(self.log)}")

    def get_json(self, path: str, timeout: float = 30) -> Optional[Dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                data = json.loads(r.read())
            return data if isinstance(data, dict) else None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
            return None

    def post(self, path: str, timeout: float = 60) -> bool:
        req = urllib.request.Request(self.base + path, data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return 200 <= r.status < 300
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, grace_s: float = 60) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.proc = proc  # kept for its return code


def pool_tokens(server_info: Optional[Dict[str, Any]]) -> Optional[int]:
    """The KV pool's tokens from /server_info (or /get_server_info): max_total_num_tokens, at the top or in
    a data-parallel rank's internal state."""
    if not server_info:
        return None
    value = server_info.get("max_total_num_tokens")
    if value is None:
        states = server_info.get("internal_states") or []
        values = [s.get("max_total_num_tokens") for s in states if isinstance(s, dict)]
        value = next((v for v in values if v is not None), None)
    return int(value) if value is not None else None


_RUNNING = re.compile(r"Decode batch.*?#running-req:\s*(\d+)")
_QUEUED = re.compile(r"#queue-req:\s*(\d+)")
_TOKEN_USAGE = re.compile(r"token usage:\s*([0-9.]+)")
_TIER = re.compile(r"kvtier: (\d+) requests, (\d+) tokens on the device, (\d+) on the host")
_STEP = re.compile(r"kvtier: decode (\d+) steps, ([\d.]+) ms/step: attention ([\d.]+) \(engine ([\d.]+), "
                   r"window GPU ([\d.]+)\), plan ([\d.]+)")


class LogStats(NamedTuple):
    admitted_max: Optional[int]  # most requests in one decode batch (sglang's #running-req)
    queued_max: Optional[int]  # most requests waiting (sglang's #queue-req)
    token_usage_max: Optional[float]  # highest share of the KV pool in use
    tier_requests_max: Optional[int]  # the tier's requests at most (kvtier's statistics lines)
    host_tokens_max: Optional[int]  # tokens in the host store at most
    decode: Optional[Dict[str, float]]  # kvtier's decode step parts in ms, weighted by steps


def parse_log(text: str) -> LogStats:
    running = [int(m.group(1)) for m in _RUNNING.finditer(text)]
    queued = [int(m.group(1)) for line in text.splitlines() if "Decode batch" in line or "Prefill batch" in line
              for m in [_QUEUED.search(line)] if m]
    usage = [float(m.group(1)) for m in _TOKEN_USAGE.finditer(text)]
    tier = [(int(m.group(1)), int(m.group(3))) for m in _TIER.finditer(text)]
    parts = ("step_ms", "attention_ms", "engine_ms", "window_gpu_ms", "plan_ms")
    steps, sums = 0, dict.fromkeys(parts, 0.0)
    for m in _STEP.finditer(text):
        n = int(m.group(1))
        steps += n
        for k, v in zip(parts, m.groups()[1:]):
            sums[k] += n * float(v)
    decode = {"steps": steps, **{k: v / steps for k, v in sums.items()}} if steps else None
    return LogStats(max(running) if running else None, max(queued) if queued else None,
                    max(usage) if usage else None, max((r for r, _ in tier), default=None),
                    max((h for _, h in tier), default=None), decode)


class LogReader:
    """Reads a growing log in pieces: since() returns what was written after the previous call."""

    def __init__(self, log: Path):
        self.log, self.offset = log, 0

    def since(self) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return ""
        self.offset += len(data)
        return data.decode("utf-8", errors="replace")


def python() -> str:
    return sys.executable


__all__ = ["COMMON", "LogReader", "LogStats", "Server", "ServerError", "launch_command", "parse_log", "pool_tokens",
           "python", "tail"]
