"""One small class per policy, registered by name; `policy_for(config)` builds one.

Every module of this package is imported here, so a new policy is a new file whose
class is decorated with `@register`.
"""

import importlib
import pkgutil

from .base import REGISTRY, EngineArgs, Policy, PolicyUnavailableError, policy_for, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["REGISTRY", "EngineArgs", "Policy", "PolicyUnavailableError", "policy_for", "register"]
