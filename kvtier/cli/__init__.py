"""The `kvtier` command: one module per subcommand, registered here.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) ->
int``; exit codes are 0 for success, 2 for invalid input, 1 otherwise.

Only the module of the command being run is imported (`kvtier --version` and a
usage error load no torch), and the project's typed errors end a command as
one line per problem with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence

from .. import __version__

# name -> (module, one-line help)
COMMANDS = {
    "validate": ("kvtier.cli.validate", "check policy YAML files against the schema, this host's cores, SIMD "
                                        "variants and memory; exit 2 on any problem"),
    "show": ("kvtier.cli.show", "print a policy with every default filled in"),
    "policies": ("kvtier.cli.policies", "print the policy reference (markdown)"),
    "demo": ("kvtier.cli.demo", "decode a synthetic long context through the tier and compare with dense"),
    "bench": ("kvtier.cli.bench", "run a benchmark (engine, decode, compare, prefill, serve, capture-kv, codebooks, "
                                  "random-checkpoint)"),
    "eval": ("kvtier.cli.eval", "accuracy of every policy against full attention on a real model, offline (RULER-style)"),
}

ALL = "*"

# Typed errors that mean "this input cannot run", by module: a class is looked up only when its
# module is loaded already (an instance of it cannot exist otherwise), so none is imported here.
_INPUT_ERRORS = (
    ("kvtier.store.errors", "CapacityError"),
    ("kvtier._native._loader", "NativeError"),
    ("kvtier.policies.base", "PolicyUnavailableError"),
    ("kvtier.runtime.device_pool", "PoolFullError"),
)


def chosen_command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand `argv` names (the first word that is not an option), or None."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def build_parser(command: Optional[str] = ALL) -> argparse.ArgumentParser:
    """The parser; only `command`'s arguments are declared (ALL: every command's; None: none)."""
    parser = argparse.ArgumentParser(prog="kvtier", description="KV-cache tier for long-context decoding.")
    parser.add_argument("--version", action="version", version=f"kvtier {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs.required = True
    for name, (module, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if command in (ALL, name):
            mod = importlib.import_module(module)
            mod.add_arguments(sub)
            sub.set_defaults(_run=mod.run)
    return parser


def input_error(exc: BaseException) -> bool:
    """Whether `exc` says the input cannot run (exit 2, one line) rather than that kvtier failed."""
    if isinstance(exc, (ValueError, MemoryError)):  # ConfigError, NativeValueError, constructors' checks
        return True
    for module, name in _INPUT_ERRORS:
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, getattr(mod, name)):
            return True
    return False


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    if hasattr(args, "results_dir"):  # a command that writes results: they name the commit it starts from
        from ..bench.results import started_commit

        started_commit()
    try:
        return int(args._run(args) or 0)
    except Exception as exc:  # noqa: BLE001 - sorted just below: anything else keeps its traceback
        if not input_error(exc):
            raise
        from ..config import ConfigError

        lines = str(exc).splitlines() or [type(exc).__name__]
        for line in lines:
            print(line if isinstance(exc, ConfigError) else f"kvtier {args.command}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
