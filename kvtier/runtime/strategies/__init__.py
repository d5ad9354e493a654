"""Host strategies: how a policy's host part is answered (one class per file, registered by name).

`strategy_class(policy.strategy)` finds the class; a strategy module not imported yet is
imported by its name (`kvtier.runtime.strategies.<name>`).
"""

from .base import (
    STRATEGIES, HostBatch, HostStrategy, StrategyContext, StrategyUnavailable, UnknownStrategyError, register_strategy,
    strategy_class,
)

__all__ = ["STRATEGIES", "HostBatch", "HostStrategy", "StrategyContext", "StrategyUnavailable", "UnknownStrategyError",
           "register_strategy", "strategy_class"]
