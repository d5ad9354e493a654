"""The embedded default policy: the same text as the repository's kvtier.yaml."""

from __future__ import annotations

from importlib import resources

from .loader import loads
from .policies import TierConfig


def default_text() -> str:
    return resources.files("kvtier.config").joinpath("default.yaml").read_text(encoding="utf-8")


def default_config() -> TierConfig:
    return loads(default_text(), "<embedded kvtier.yaml>")
