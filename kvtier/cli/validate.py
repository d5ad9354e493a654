"""`kvtier validate FILE...`: exit 0 when every file is a valid policy, else 2."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")


def run(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            config = load(path)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            status = 2
            continue
        if not args.quiet:
            print(f"{path}: ok ({config.policy})")
    return status
