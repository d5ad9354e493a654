"""What this host allows a policy: the cores it may use, its SIMD variants, its memory.

The models check what a file says about itself; these checks need the machine.
`kvtier validate` runs them (too little memory: a warning, since the file may be
meant for another host) and a launch runs them again (every problem refuses).
Nothing here imports the native engine: the caller passes `isa_supported`, the
engine's answer to "does this CPU and OS run that variant".
"""

from __future__ import annotations

import os
from typing import Callable, List, NamedTuple, Optional

from .errors import ConfigError, Problem
from .policies import TierConfig
from .sections import Isa
from .shape import GIB_BYTES


class HostFacts(NamedTuple):
    cpus: int  # cores this process may use (its affinity mask)
    available_bytes: int  # MemAvailable; 0 when unknown


class HostCheck(NamedTuple):
    errors: List[Problem]  # this host cannot run the policy
    memory: List[Problem]  # the host stores do not fit the memory available now


def host_memory_available() -> int:
    """MemAvailable in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def this_host() -> HostFacts:
    return HostFacts(usable_cpus(), host_memory_available())


def memory_problems(config: TierConfig, *, ranks_on_host: int, available_bytes: int) -> List[Problem]:
    """host_store.capacity_gib of every rank on this host against the memory available (unknown: none)."""
    if not config.offloads or not available_bytes:
        return []
    need = config.host_store.capacity_gib * GIB_BYTES * ranks_on_host
    if need <= available_bytes:
        return []
    return [Problem(
        "host_store.capacity_gib",
        f"expected at most {available_bytes / GIB_BYTES / ranks_on_host:.2f} GiB per rank: {ranks_on_host} rank(s) x "
        f"{config.host_store.capacity_gib} GiB = {need / GIB_BYTES:.2f} GiB, found {available_bytes / GIB_BYTES:.2f} "
        f"GiB available on this host")]


def host_problems(config: TierConfig, *, host: HostFacts, ranks_on_host: int = 1,
                  isa_supported: Optional[Callable[[str], bool]] = None) -> HostCheck:
    """What keeps this host from running `config` (isa_supported None: the variant is not checked)."""
    errors: List[Problem] = []
    threads = config.engine.threads
    if threads and threads * ranks_on_host > host.cpus:
        share = max(1, host.cpus // ranks_on_host)
        ranks = f", shared by {ranks_on_host} ranks" if ranks_on_host > 1 else ""
        errors.append(Problem("engine.threads", f"expected at most {share} (the {host.cpus} cores this process may "
                                                f"use{ranks}) or 0 for all of them, found {threads}"))
    window = config.engine.window_threads
    if window > max(1, host.cpus // ranks_on_host):
        errors.append(Problem("engine.window_threads", f"expected at most {max(1, host.cpus // ranks_on_host)} (the "
                                                       f"cores of a rank) or 0 for those the engine leaves, found {window}"))
    isa = config.engine.isa
    if isa is not Isa.AUTO and isa_supported is not None and not isa_supported(isa.value):
        runs = ", ".join(v.value for v in Isa if v is not Isa.AUTO and isa_supported(v.value))
        errors.append(Problem("engine.isa", f"expected auto or a variant this CPU and OS run ({runs}), "
                                            f"found '{isa.value}'"))
    memory = memory_problems(config, ranks_on_host=ranks_on_host, available_bytes=host.available_bytes)
    return HostCheck(errors, memory)


def check_host(config: TierConfig, *, source: str, ranks_on_host: int = 1, host: Optional[HostFacts] = None,
               isa_supported: Optional[Callable[[str], bool]] = None, memory_refuses: bool = True) -> List[Problem]:
    """Raise ConfigError for what this host cannot run; return the warnings (memory, unless it refuses)."""
    found = host_problems(config, host=this_host() if host is None else host, ranks_on_host=ranks_on_host,
                          isa_supported=isa_supported)
    errors = found.errors + (found.memory if memory_refuses else [])
    if errors:
        raise ConfigError(source, errors)
    return [] if memory_refuses else found.memory
