"""The policy contract: placement and selection decisions, no I/O.

A policy is built from its frozen config and answers, per batch:
- whether KV leaves the device at all (`offloads`);
- which host strategy answers its host part (`strategy`, a name registered in
  `kvtier.runtime.strategies`): the native engine on the CPU (`cpu_engine`),
  fetching every host token to the device each step (`fetch_all`), or nothing
  (`window_only`); a new strategy is a new module there, found by this name;
- the engine's selection arguments (`engine_args`) for requests with the
  given host and context lengths;
- whether the host part runs concurrently with the device window (`overlap`).
Policies hold no tensors on any device and never touch the store.
"""

from __future__ import annotations

from typing import ClassVar, Dict, List, NamedTuple, Optional, Type

from ..config import AllBudget, MassBudget, TierConfig, budget_tokens


class EngineArgs(NamedTuple):
    """What the runtime passes to `Engine.plan` besides the page tables."""

    mode: str  # "topk" | "mass" | "blocks" | "all"
    group_reduce: str  # "max" | "mean" | "per_qhead"
    budgets: List[List[int]]  # [B][Hkv] token caps
    block_tokens: Optional[List[int]]  # [Hkv], blocks mode only
    mass_threshold: float
    prefilter: float = 0.0  # topk/mass: candidates from summary-chunk bounds, x budget; 0 = off
    residual: bool = False  # the unselected host tokens join the softmax per summary chunk


class Policy:
    """Base of every policy. Subclasses set `name` and register themselves."""

    name: ClassVar[str] = ""
    offloads: ClassVar[bool] = True
    strategy: ClassVar[str] = "cpu_engine"
    # With budget "all" the hybrid result equals dense attention (the
    # conformance test holds every policy that says so to it).
    exact_with_all_budget: ClassVar[bool] = True

    def __init__(self, config: TierConfig):
        if config.policy != self.name:
            raise ValueError(f"{type(self).__name__} needs a '{self.name}' config, found '{config.policy}'")
        self.config = config

    @property
    def overlap(self) -> bool:
        """Whether the engine's host part runs while the device attends the window."""
        return True

    def token_budgets(self, host_tokens: List[int], context_tokens: List[int], kv_heads: int) -> List[List[int]]:
        caps = [budget_tokens(self.config.budget, host_tokens=h, context_tokens=c)
                for h, c in zip(host_tokens, context_tokens)]
        return [[cap] * kv_heads for cap in caps]

    def engine_args(self, host_tokens: List[int], context_tokens: List[int], kv_heads: int) -> EngineArgs:
        budget = self.config.budget
        mode = "all" if isinstance(budget, AllBudget) else "mass" if isinstance(budget, MassBudget) else "topk"
        threshold = budget.threshold if isinstance(budget, MassBudget) else 1.0
        return EngineArgs(mode, "max", self.token_budgets(host_tokens, context_tokens, kv_heads), None, threshold)


REGISTRY: Dict[str, Type[Policy]] = {}


def register(cls: Type[Policy]) -> Type[Policy]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"policy class {cls.__name__} needs a unique name, found {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


class PolicyUnavailableError(RuntimeError):
    """The config names a policy whose runtime this version does not have."""


def policy_for(config: TierConfig) -> Policy:
    cls = REGISTRY.get(config.policy)
    if cls is None:
        raise PolicyUnavailableError(
            f"policy '{config.policy}' validates but has no runtime in this version; "
            f"available: {', '.join(sorted(REGISTRY))}"
        )
    return cls(config)
