"""Sections shared by every policy: device window, host store, CPU engine, budget.

Every model is frozen and forbids unknown keys, so a typo in a YAML file is an
error rather than a silently ignored setting. Types are strict: `true` is not
a number and `"64"` is not an integer (enums still take their names). Sizes
have ceilings, so an absurd value fails here rather than in an allocation.
Units are in the field names.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator


# The engine counts tokens in int32.
MAX_TOKENS = (1 << 31) - 1
# 64 TiB: beyond the memory of any one host today; the real bound is checked against the host.
MAX_CAPACITY_GIB = 65536.0
MAX_THREADS = 4096


class FieldError(ValueError):
    """A cross-field rule's failure that names the field at fault (dotted, relative to the model)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class Frozen(BaseModel):
    """Base of every config model: immutable, strict about unknown keys and about types."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False, strict=True)


class KeyFormat(str, Enum):
    INT8_CHANNEL = "int8_channel"
    INT8 = "int8"
    INT4 = "int4"
    BF16 = "bf16"


class ValueFormat(str, Enum):
    BF16 = "bf16"
    INT8 = "int8"


class OnFull(str, Enum):
    REJECT = "reject"
    EVICT = "evict"


class Isa(str, Enum):
    AUTO = "auto"
    GENERIC = "generic"
    AVX2 = "avx2"
    AVX512 = "avx512"
    AVX512BW = "avx512bw"
    AMX = "amx"


class WindowConfig(Frozen):
    """What stays on the device: the first sink tokens and the recent window."""

    sink_tokens: int = Field(64, ge=0, le=MAX_TOKENS, description="First tokens of each request, never evicted.")
    window_tokens: int = Field(
        1024, gt=0, le=MAX_TOKENS,
        description="Recent tokens kept on the device; whole pages leave once it is exceeded. At most max_context_tokens."
    )
    page_tokens: int = Field(
        16, gt=0, le=MAX_TOKENS,
        description="Tokens per page, the unit of eviction and of the host store. Must divide window_tokens."
    )

    @model_validator(mode="after")
    def _check(self) -> "WindowConfig":
        if self.window_tokens < self.sink_tokens:
            raise FieldError(
                "window_tokens", f"window_tokens must be >= sink_tokens, found window_tokens={self.window_tokens} "
                f"< sink_tokens={self.sink_tokens}"
            )
        if self.window_tokens % self.page_tokens:
            raise FieldError(
                "page_tokens", f"page_tokens must divide window_tokens, found {self.window_tokens} % {self.page_tokens} "
                f"= {self.window_tokens % self.page_tokens}"
            )
        return self

    @property
    def device_tokens_max(self) -> int:
        """Most tokens one request keeps on the device (window plus one page in flight)."""
        return self.sink_tokens + self.window_tokens + self.page_tokens - 1


class HostStoreConfig(Frozen):
    """The host tier: a (pinned) arena of pages with compressed keys."""

    capacity_gib: float = Field(16.0, gt=0, le=MAX_CAPACITY_GIB, allow_inf_nan=False, description="Size of the host arena in GiB, shared by all requests (per rank under tensor parallelism). Checked against the memory this host has available: `kvtier validate` warns, a launch refuses.")
    key_format: KeyFormat = Field(KeyFormat.INT8_CHANNEL, strict=False, description="Key storage: int8_channel (int8 with a bf16 scale and zero point per channel of each page and kv-head, as KIVI quantizes keys: an outlier channel keeps its own range; 4 * head_dim / page_tokens more bytes per token and kv-head than the keys, 25% at 16-token pages), int8 (a scale per token: outlier channels flatten the others), int4 (a scale per token and group of key_group_channels) or bf16 (exact).")
    key_group_channels: int = Field(32, gt=0, le=1024, description="Channels per int4 scale group: even (two channels a byte) and a divisor of head_dim (checked when the tier is built for a model).")
    value_format: ValueFormat = Field(ValueFormat.BF16, strict=False, description="Value storage: bf16 or int8 (per-token scale).")
    pinned: Union[Literal["auto"], StrictBool] = Field("auto", description="Page-locked host memory for fast PCIe copies, on CUDA machines only: true, false, or auto (pin when the policy's host strategy copies host pages to the GPU, as offload_all does; a store that only the CPU engine reads gains nothing from it).")
    summary_tokens: int = Field(16, gt=0, le=MAX_TOKENS, description="Tokens per key min/max summary chunk, the finest block for block scoring. Must divide page_tokens.")
    on_full: OnFull = Field(OnFull.REJECT, strict=False, description="When the arena is full: reject the new request, or evict by the policy's rule.")

    @model_validator(mode="after")
    def _check(self) -> "HostStoreConfig":
        if self.key_format is KeyFormat.INT4 and self.key_group_channels % 2:
            raise FieldError("key_group_channels", f"expected an even number of channels per int4 scale group "
                             f"(two channels a byte), found {self.key_group_channels}")
        return self


class EngineConfig(Frozen):
    """The native CPU engine."""

    threads: int = Field(0, ge=0, le=MAX_THREADS, description="Worker threads of the CPU engine; 0 = all cores this process may use (but one when the CUDA decode path is pipelined, or on more than two cores when the engine runs beside the window on the CPU). At most the cores this process may use (`kvtier validate` and a launch check).")
    window_threads: int = Field(0, ge=0, le=MAX_THREADS, description="When the device is the CPU and the engine runs beside the window's attention, torch's intra-op threads for the window meanwhile; 0 = the cores the engine does not use, at least 1 (torch's own count, every core, made a 1,088-token window call 3-16x slower on 2 cores). Elsewhere unused. At most the cores this process may use.")
    isa: Isa = Field(Isa.AUTO, strict=False, description="SIMD variant, process-wide: auto (the best the CPU and OS allow), generic, avx2, avx512, avx512bw (AVX-512 without VNNI) or amx; a named one must run on this CPU and OS (`kvtier validate` and a launch check). KVTIER_ISA, when set, wins.")


class AllBudget(Frozen):
    """Attend every host token: exact attention, the reference for the tier."""

    kind: Literal["all"] = "all"


class TokensBudget(Frozen):
    """A fixed number of host tokens per (request, kv-head)."""

    kind: Literal["tokens"] = "tokens"
    tokens: int = Field(2048, gt=0, le=MAX_TOKENS, description="Distinct host tokens read per (request, kv-head), whatever the group reduction: its query heads share them.")


class FractionBudget(Frozen):
    """A fraction of each request's context, clamped to [min_tokens, max_tokens]."""

    kind: Literal["fraction"] = "fraction"
    fraction: float = Field(0.1, gt=0, le=1, allow_inf_nan=False, description="Fraction of the context attended from the host.")
    min_tokens: int = Field(256, gt=0, le=MAX_TOKENS, description="Lower clamp of the per-head budget.")
    max_tokens: int = Field(8192, gt=0, le=MAX_TOKENS, description="Upper clamp of the per-head budget.")

    @model_validator(mode="after")
    def _check(self) -> "FractionBudget":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens, found {self.min_tokens} > {self.max_tokens}")
        return self


class MassBudget(Frozen):
    """The smallest set of top tokens in which every query head holds `threshold` of its own softmax mass over the host tokens, capped."""

    kind: Literal["mass"] = "mass"
    threshold: float = Field(0.95, gt=0, le=1, allow_inf_nan=False, description="Share of each query head's own softmax mass over the host tokens that the selection must hold (every head, whatever the group reduction, which only orders the tokens).")
    max_tokens: int = Field(4096, gt=0, le=MAX_TOKENS, description="Cap of the selection: distinct host tokens per (request, kv-head); a head that needs more stops short of the threshold.")


Budget = Annotated[
    Union[AllBudget, TokensBudget, FractionBudget, MassBudget], Field(discriminator="kind")
]


def budget_tokens(budget: Budget, *, host_tokens: int, context_tokens: int) -> int:
    """Per-head token cap that `budget` gives one request.

    A fraction is of the whole context (device and host tokens), the way
    papers state KV budgets; the engine clamps any cap to the host tokens.
    """
    if isinstance(budget, AllBudget):
        return max(host_tokens, 1)
    if isinstance(budget, TokensBudget):
        return budget.tokens
    if isinstance(budget, FractionBudget):
        want = round(budget.fraction * context_tokens)
        return min(max(want, budget.min_tokens), budget.max_tokens)
    return budget.max_tokens
