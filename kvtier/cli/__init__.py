"""The `kvtier` command: one module per subcommand, registered here.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) ->
int``; exit codes are 0 for success, 2 for invalid input, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from .. import __version__

# name -> (module, one-line help)
COMMANDS = {
    "validate": ("kvtier.cli.validate", "check policy YAML files; exit 2 on any problem"),
    "show": ("kvtier.cli.show", "print a policy with every default filled in"),
    "policies": ("kvtier.cli.policies", "print the policy reference (markdown)"),
    "demo": ("kvtier.cli.demo", "decode a synthetic long context through the tier and compare with dense"),
    "bench": ("kvtier.cli.bench", "run a benchmark (engine, decode, prefill, random-checkpoint)"),
    "eval": ("kvtier.cli.eval", "accuracy of every policy against full attention on a real model, offline (RULER-style)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="KV-cache tier for long-context decoding.")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs.required = True
    for name, (module, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(sub)
        sub.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
