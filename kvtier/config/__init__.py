"""Typed, frozen policy configs and their YAML loading.

`load(path)` is the one way in: it returns one of the `PolicyConfig` models,
chosen by the file's ``policy:`` tag. Deeper layers receive these objects,
never dicts.
"""

from .errors import ConfigError, Problem
from .host import HostFacts, check_host
from .loader import check_capacity, check_shape, dump, from_mapping, load, loads, shape_problems
from .policies import (
    POLICY_CLASSES,
    DenseConfig,
    FluxionConfig,
    GroupReduce,
    HcattentionConfig,
    HgcaConfig,
    OffloadAllConfig,
    PolicyConfig,
    QuestConfig,
    SpardaConfig,
    TierConfig,
    WindowOnlyConfig,
)
from .sections import (
    AllBudget,
    Budget,
    EngineConfig,
    FractionBudget,
    HostStoreConfig,
    Isa,
    KeyFormat,
    MassBudget,
    OnFull,
    TokensBudget,
    ValueFormat,
    WindowConfig,
    budget_tokens,
)
from .shape import GIB_BYTES, ModelShape, TokenBytes, device_bytes_per_token, host_bytes_per_token, token_bytes

__all__ = [
    "AllBudget", "Budget", "ConfigError", "GIB_BYTES", "DenseConfig", "EngineConfig", "FluxionConfig", "FractionBudget",
    "GroupReduce", "HcattentionConfig", "HgcaConfig", "HostStoreConfig", "Isa", "KeyFormat", "MassBudget",
    "ModelShape", "OffloadAllConfig", "OnFull", "POLICY_CLASSES", "PolicyConfig", "Problem", "QuestConfig",
    "SpardaConfig", "TierConfig", "TokensBudget", "ValueFormat", "WindowConfig", "WindowOnlyConfig", "budget_tokens",
    "HostFacts", "check_capacity", "check_host", "check_shape", "device_bytes_per_token", "dump", "from_mapping",
    "host_bytes_per_token", "load", "loads", "shape_problems", "TokenBytes", "token_bytes",
]
