"""Argument types the benchmarks share: a bad size is a usage error (exit 2), not a traceback later."""

from __future__ import annotations

import argparse
from typing import List


def positive_ints(text: str) -> List[int]:
    """`8192,32768` -> [8192, 32768]; anything but positive integers is refused."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, found {text[:100]!r}")
    return values
