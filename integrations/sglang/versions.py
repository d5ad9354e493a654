"""Which sglang releases the plugin supports, checked at launch.

The plugin entry point and HookRegistry arrived in 0.5.11; the attention
backend contract this plugin implements (init_forward_metadata split into
out-of-graph / in-graph parts, no legacy capture/replay methods) is the one
of 0.5.17 onward. 0.5.23 is the newest release tested.
"""

from __future__ import annotations

import re
from typing import Tuple

SUPPORTED_MIN: Tuple[int, int, int] = (0, 5, 17)
SUPPORTED_BELOW: Tuple[int, int, int] = (0, 6, 0)
TESTED = ("0.5.17", "0.5.23")


class UnsupportedSglangError(RuntimeError):
    """The running sglang is outside the supported range."""


def parse(version: str) -> Tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not m:
        raise UnsupportedSglangError(f"expected an sglang version like 0.5.23, found {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def check(version: str) -> None:
    v = parse(version)
    if not (SUPPORTED_MIN <= v < SUPPORTED_BELOW):
        low = ".".join(map(str, SUPPORTED_MIN))
        high = ".".join(map(str, SUPPORTED_BELOW))
        raise UnsupportedSglangError(
            f"kvtier supports sglang >= {low}, < {high} (tested: {', '.join(TESTED)}), found {version}"
        )


def running() -> str:
    import sglang

    return getattr(sglang, "__version__", "0.0.0")
