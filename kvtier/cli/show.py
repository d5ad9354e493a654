"""`kvtier show FILE`: the resolved policy, defaults filled in."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, dump, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="policy YAML file")


def run(args: argparse.Namespace) -> int:
    try:
        config = load(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    sys.stdout.write(dump(config))
    return 0
