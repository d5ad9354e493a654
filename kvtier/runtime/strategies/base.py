"""The host-strategy contract: how the host part of one layer's decode attention is answered.

A policy decides *what* to attend (selection, budgets); a host strategy answers the
host part of one layer and returns it as an `AttnPart` (float32 out, natural-log LSE)
for the LSE merge with the device window. `HybridAttention` owns the window, the
merge and the timing; it calls its strategy and never asks which one it is.

Who calls what, and when (all on the decoding thread):
- `prepare(rids)` once per decode batch, after the tier has settled and before the
  host side is read: a strategy with its own eviction rule drops pages here.
- `plan(batch)` once per decode batch, after `prepare`: the batch's host
  page tables and lengths (`HostBatch`). The strategy owns every scratch buffer of
  the batch from here on. Only batches with host tokens to attend are planned.
- per layer, `submit(q, layer)` before the window's kernels are queued and
  `collect(q, layer)` after them; what runs between the two overlaps the window.
  `collect` returns the host part on q's device.
- `forecast(q, layer)`, only where the tier was built by a caller that sees the model's
  hidden states (`StrategyContext.forecasts`, `kvtier eval`) and only to a strategy that
  `takes_forecasts`: a forecast of layer's query, handed after `plan` and before that
  layer's `submit` of the same batch (while an earlier layer runs). A layer may get none.
- `detail(q, layer)`: the same part computed without overlap, with the host-token
  selection where the strategy selects tokens (diagnostics and evaluation).
- `stop()` ends anything still reading the host store; it is registered with the
  tier (`TierManager.host_readers`), which calls it before the store changes, and
  called before every plan. `take_cpu_s()` returns the host-side seconds since the
  last call. `report()` returns the strategy's own diagnostics since it was built (a
  JSON-able dict; reports such as the evaluation's record it). `close()` releases the
  strategy's threads.

Class attributes tell the assembly (`kvtier.runtime.assembly`) what a strategy needs:
`needs_engine` (the native CPU engine), `copies_pages_to_device` (page-locked host
memory pays), `attends_host` (False: evicted tokens are never attended); two class
methods how it shares the cores: `pipelines` and `runs_beside_window`; and `refusal`
what it cannot run for its caller (a server's launch asks it before building). A strategy
registers itself by name (`@register_strategy`); a policy names its strategy
(`Policy.strategy`) and `strategy_class` finds it, importing
`kvtier.runtime.strategies.<name>` on first use, so adding a strategy adds a file
and edits none.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import ClassVar, Dict, Hashable, List, NamedTuple, Optional, Tuple, Type

import torch

from ...config import ModelShape
from ...policies import Policy
from ..merge import AttnPart


class StrategyContext(NamedTuple):
    """What a strategy is built with; fixed for the life of the tier."""

    policy: Policy
    shape: ModelShape
    tier: "TierManager"  # noqa: F821  (kvtier.runtime.tier; typed loosely to keep imports one-way)
    engine: Optional["Engine"]  # noqa: F821  the native engine when the strategy needs one, else None
    sm_scale: float
    soft_cap: float
    device: torch.device
    pipeline: bool  # the window runs fused on FlashInfer and the caller allows a pipelined host part
    # the caller hands layers' forecast queries before they run (`HostStrategy.forecast`): it sees the
    # model's hidden states (the evaluation's transformers model does; a server's attention backend and
    # the benches' stacks do not)
    forecasts: bool = False


class HostBatch(NamedTuple):
    """One decode batch's host side, in request order."""

    rids: List[Hashable]
    host_tokens: List[int]  # tokens attendable from the host store, per request
    context_tokens: List[int]  # each request's whole length
    page_table: torch.Tensor  # int32 [sum of pages], CPU: the requests' host pages, concatenated
    page_offsets: torch.Tensor  # int32 [B + 1], CPU: request i's pages are page_table[off[i]:off[i+1]]
    n_tokens: torch.Tensor  # int32 [B], CPU: host_tokens as a tensor
    window_empty: bool  # no request has a token on the device


class StrategyUnavailable(ValueError):
    """A policy setting its host strategy cannot run for the caller that builds it (`HostStrategy.refusal`)."""


class HostStrategy(ABC):
    """Base of every host strategy (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    attends_host: ClassVar[bool] = True
    needs_engine: ClassVar[bool] = False
    copies_pages_to_device: ClassVar[bool] = False
    attends_every_host_token: ClassVar[bool] = False  # detail() names no selection: it attends them all

    def __init__(self, ctx: StrategyContext):
        if self.needs_engine and ctx.engine is None and ctx.policy.offloads:
            raise ValueError(f"host strategy '{self.name}' (policy '{ctx.policy.name}') attends the host with "
                             "the native engine; pass engine=")
        self.check(ctx.policy, forecasts=ctx.forecasts)
        self.ctx = ctx
        self.batch: Optional[HostBatch] = None
        self._cpu_s = 0.0

    @classmethod
    def pipelines(cls, policy: Policy, device: torch.device, default: bool = True) -> bool:
        """Whether this strategy would hand its host part to a serving loop fed by the GPU stream
        (then the decoding thread leaves a core to the loop: `default_engine_threads`)."""
        return False

    @classmethod
    def runs_beside_window(cls, policy: Policy, device: torch.device) -> bool:
        """Whether, on this device, the host part runs on another thread of this host between
        `submit` and `collect` while the decoding thread computes the window with torch (the CPU
        path): then the two pools share the cores (`ranks.core_split`)."""
        return False

    @classmethod
    def refusal(cls, policy: Policy, *, forecasts: bool) -> Optional[str]:
        """Why this strategy cannot answer `policy` for a caller that hands forecast queries
        (`forecasts`) or not, naming the field and what is expected; None when it can. The
        constructor raises it; a server's launch asks before any model loads."""
        return None

    @classmethod
    def check(cls, policy: Policy, *, forecasts: bool) -> None:
        """Raise StrategyUnavailable with `refusal`'s reason, if there is one."""
        why = cls.refusal(policy, forecasts=forecasts)
        if why:
            raise StrategyUnavailable(why)

    @property
    def pipelined(self) -> bool:
        """Whether this strategy's plans run pipelined when they can."""
        return False

    @property
    def takes_forecasts(self) -> bool:
        """Whether `forecast` is used (the caller computes forecast queries only for such a strategy)."""
        return False

    @property
    def device_bytes(self) -> int:
        """Device memory the strategy holds besides the window (compressed keys, block caches)."""
        return 0

    @property
    def reads_in_background(self) -> bool:
        """Whether host-store reads may still run between calls (then `stop()` is registered
        with the tier, which calls it before the store changes)."""
        return self.pipelined

    def prepare(self, rids: List[Hashable]) -> None:
        """Before a decode batch's host side is read (the tier has settled): a strategy that
        evicts by its own rule may change the host store here."""

    def plan(self, batch: HostBatch) -> None:
        self.batch = batch

    def submit(self, q: torch.Tensor, layer: int) -> None:
        """Start the host part of layer for q [B, Hq, D] (on the device); default: nothing yet."""

    def forecast(self, q: torch.Tensor, layer: int) -> None:
        """A forecast q [B, Hq, D] (on the device, after RoPE) of layer's query, before its `submit` in
        this plan; only called where `takes_forecasts`."""

    @abstractmethod
    def collect(self, q: torch.Tensor, layer: int) -> AttnPart:
        """The host part of layer: out [B, Hq, D] float32 and lse [B, Hq] natural log, on q's device."""

    def detail(self, q: torch.Tensor, layer: int) -> Tuple[AttnPart, Optional[torch.Tensor]]:
        """The host part without overlap, and the selection ([B, Hq, cap] int32, -1 padded) if any."""
        self.submit(q, layer)
        return self.collect(q, layer), None

    def report(self) -> Dict[str, object]:
        """Diagnostics since the strategy was built, JSON-able (default: none)."""
        return {}

    def read_bytes(self, layer: int, selection: Optional[torch.Tensor]) -> Optional[float]:
        """Host-store bytes this layer's host part reads for the current plan, given the selection
        `detail` returned for it (keys scanned, values of the selected tokens, copies to the device),
        counted from the plan and the store's formats; None where the strategy does not count them.
        For benchmarks: never called on the decode path."""
        return None

    def token_bytes(self):
        """The host store's bytes per token at one layer and kv-head, by part (`config.TokenBytes`)."""
        from ...config import token_bytes

        cfg = self.ctx.policy.config
        return token_bytes(cfg.host_store, self.ctx.shape.head_dim, chunk_sums=cfg.chunk_sums,
                           page_tokens=cfg.window.page_tokens)

    def distinct_selected(self, selection: torch.Tensor) -> int:
        """Distinct (request, kv-head, token) triples of a [B, Hq, cap] selection (-1 padded): the
        rows a kv-head's query heads read once between them."""
        s = self.ctx.shape
        b, hq, cap = selection.shape
        per_kv = selection.reshape(b * s.kv_heads, (hq // s.kv_heads) * cap).long()
        rows = torch.arange(per_kv.shape[0])[:, None].expand_as(per_kv)
        keep = per_kv >= 0
        return int(torch.unique(rows[keep] * (1 << 40) + per_kv[keep]).numel())

    def stop(self) -> None:
        """End anything still reading the host store (raising its error, if any)."""

    def take_cpu_s(self) -> float:
        self.stop()
        s, self._cpu_s = self._cpu_s, 0.0
        return s

    def close(self) -> None:
        self.stop()


STRATEGIES: Dict[str, Type[HostStrategy]] = {}


def register_strategy(cls: Type[HostStrategy]) -> Type[HostStrategy]:
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"host strategy class {cls.__name__} needs a unique name, found {cls.name!r}")
    STRATEGIES[cls.name] = cls
    return cls


class UnknownStrategyError(LookupError):
    """A policy names a host strategy that no module registers."""


def strategy_class(name: str) -> Type[HostStrategy]:
    """The strategy registered as `name`, importing `kvtier.runtime.strategies.<name>` on first use."""
    cls = STRATEGIES.get(name)
    if cls is None and name.isidentifier():
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
        cls = STRATEGIES.get(name)
    if cls is None:
        raise UnknownStrategyError(f"no host strategy named {name!r}; registered: {', '.join(sorted(STRATEGIES))}")
    return cls
