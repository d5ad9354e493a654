"""`kvtier policies`: the policy reference, generated from the config models."""

from __future__ import annotations

import argparse

from ..config.reference import policy_reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    print(policy_reference(), end="")
    return 0
