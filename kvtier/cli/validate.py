"""`kvtier validate FILE...`: exit 0 when every file is a valid policy for this host, else 2.

Beyond the schema, each file is checked against this host: engine.threads
against the cores this process may use, a named engine.isa against what the
native engine says this CPU and OS run, and host_store.capacity_gib against
the memory available now. Too little memory is a warning only (the file may
be meant for another host); a launch on this host refuses it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Tuple

from ..config import ConfigError, Isa, TierConfig, check_host, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    parser.add_argument("--tp-size", type=int, default=1, metavar="N",
                        help="tensor-parallel ranks sharing this host's cores and memory (default 1)")


def _isa_check(config: TierConfig) -> Tuple[Optional[Callable[[str], bool]], Optional[str]]:
    """The engine's isa_supported when the config names a variant (loaded only then), or why not."""
    if config.engine.isa is Isa.AUTO:
        return None, None
    try:
        from .._native import isa_supported
    except ImportError as exc:
        return None, f"engine.isa: not checked against this CPU: {exc}"
    return isa_supported, None


def run(args: argparse.Namespace) -> int:
    if args.tp_size < 1:
        print(f"validate: --tp-size: expected at least 1, found {args.tp_size}", file=sys.stderr)
        return 2
    status = 0
    for path in args.files:
        try:
            config = load(path)
            isa_supported, unchecked = _isa_check(config)
            warnings = check_host(config, source=path, ranks_on_host=args.tp_size, isa_supported=isa_supported,
                                  memory_refuses=False)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            status = 2
            continue
        for problem in warnings:
            print(f"{problem.render(path)} (warning: a launch on this host refuses it)", file=sys.stderr)
        if unchecked:
            print(f"{path}: {unchecked} (warning)", file=sys.stderr)
        if not args.quiet:
            print(f"{path}: ok ({config.policy})")
    return status
