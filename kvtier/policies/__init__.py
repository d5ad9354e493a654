"""One small class per policy, registered by name; `policy_for(config)` builds one."""

from . import builtin  # noqa: F401  (registers the built-in policies)
from .base import REGISTRY, EngineArgs, Policy, PolicyUnavailableError, policy_for, register

__all__ = ["REGISTRY", "EngineArgs", "Policy", "PolicyUnavailableError", "policy_for", "register"]
