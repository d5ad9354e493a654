"""One model per policy: the common sections plus the policy's own knobs.

`PolicyConfig` is the tagged union on ``policy:``; it is what
`kvtier.config.load` returns.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Literal, Optional, Tuple, Union

from pydantic import Field, field_validator, model_validator

from .shape import ModelShape, host_bytes_per_token
from .sections import (
    MAX_TOKENS,
    AllBudget,
    Budget,
    EngineConfig,
    FieldError,
    Frozen,
    HostStoreConfig,
    KeyFormat,
    MassBudget,
    TokensBudget,
    WindowConfig,
)


# hgca.prefilter scores this many times the budget at most: beyond it, scoring every token is as cheap.
MAX_PREFILTER = 1024


class GroupReduce(str, Enum):
    MAX = "max"
    MEAN = "mean"
    PER_QHEAD = "per_qhead"


class TierConfig(Frozen):
    """Sections every policy has."""

    window: WindowConfig = Field(default_factory=WindowConfig, description="Device window.")
    host_store: HostStoreConfig = Field(default_factory=HostStoreConfig, description="Host store.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="CPU engine.")
    budget: Budget = Field(default_factory=TokensBudget, description="Host tokens attended per (request, kv-head).")
    max_context_tokens: int = Field(131072, gt=0, le=MAX_TOKENS, description="Longest request the deployment admits (at most 2^31 - 1); checked against host capacity for a model.")

    @field_validator("budget", mode="before")
    @classmethod
    def _infer_budget_kind(cls, value: object) -> object:
        # `budget: {tokens: 2048}` is unambiguous; spare users the tag.
        if isinstance(value, dict) and "kind" not in value:
            for key, kind in (("tokens", "tokens"), ("fraction", "fraction"), ("threshold", "mass")):
                if key in value:
                    return {"kind": kind, **value}
        return value

    @model_validator(mode="after")
    def _check_common(self) -> "TierConfig":
        store, window = self.host_store, self.window
        if window.page_tokens % store.summary_tokens:
            raise FieldError(
                "host_store.summary_tokens", f"host_store.summary_tokens must divide window.page_tokens, found "
                f"{window.page_tokens} % {store.summary_tokens} = {window.page_tokens % store.summary_tokens}"
            )
        if self.max_context_tokens < window.sink_tokens + window.window_tokens:
            if "max_context_tokens" not in self.model_fields_set:  # the window grew past the default context
                raise FieldError("window.window_tokens", f"expected at most max_context_tokens "
                                 f"({self.max_context_tokens}) - sink_tokens ({window.sink_tokens}), "
                                 f"found {window.window_tokens}")
            raise FieldError(
                "max_context_tokens", f"max_context_tokens must be >= window.sink_tokens + window.window_tokens "
                f"({window.sink_tokens + window.window_tokens}), found {self.max_context_tokens}"
            )
        return self

    @property
    def offloads(self) -> bool:
        """Whether this policy moves KV to the host at all."""
        return True

    @property
    def chunk_sums(self) -> bool:
        """Whether the host store keeps per-chunk key and value sums (for a residual estimate)."""
        return False

    def host_bytes_per_token(self, shape: ModelShape) -> float:
        """Host bytes one token of this policy's store occupies, across all layers and kv-heads."""
        return host_bytes_per_token(self.host_store, shape, chunk_sums=self.chunk_sums,
                                    page_tokens=self.window.page_tokens)


# --- HGCA -------------------------------------------------------------------


class HgcaKnobs(Frozen):
    group_reduce: GroupReduce = Field(
        GroupReduce.PER_QHEAD, strict=False,
        description="How a kv-head ranks host tokens for the one selection its query heads share (the budget counts distinct tokens per kv-head either way): max or mean of their logits, or per_qhead: the max over heads of each head's logit less its log-sum-exp over the host tokens (its log-probability), so every head's own top tokens come first and no head crowds out the others by the size of its logits.",
    )
    overlap: bool = Field(True, description="Run CPU sparse and GPU dense attention concurrently; false runs the engine "
                          "after the window, one after the other (to measure what overlap saves).")
    prefilter: Optional[float] = Field(
        None,
        ge=1,
        le=MAX_PREFILTER,
        allow_inf_nan=False,
        description=f"Rank the host store's summary chunks (host_store.summary_tokens each) by their key upper bound and score only the tokens of the best ones, this many times the budget (1 to {MAX_PREFILTER}); null scores every host token. Reads far fewer key bytes at long context; pair it with summary_tokens 32 or 64.",
    )
    residual: bool = Field(
        False,
        description="Let the host tokens the selection leaves out join its softmax as one pseudo-token per summary chunk (their mean key and value, counted as many times as they are), so the host part's weight against the window stays close to full attention's. The store keeps each chunk's key and value sums (float32: 8 * head_dim / summary_tokens more bytes per token and kv-head, about 16% more than int8 keys and bf16 values at 16-token chunks), and each step reads them.",
    )


class HgcaConfig(TierConfig):
    """HGCA: dense GPU window + per-head fine-grained top-k on the CPU."""

    policy: Literal["hgca"] = "hgca"
    hgca: HgcaKnobs = Field(default_factory=HgcaKnobs)

    @property
    def chunk_sums(self) -> bool:
        return self.hgca.residual


# --- Fluxion ----------------------------------------------------------------

# The predictor's roles: a class named after one takes the role's region of (window_mass, far_entropy)
# from the predictor's thresholds unless it gives its own ranges.
ROLES = ("retrieval", "mixed", "streaming")
# Fluxion's window pages: every class's block must divide the page, and 64 takes blocks of 16, 32 and 64.
FLUXION_PAGE_TOKENS = 64


class HeadClass(Frozen):
    name: str = Field(max_length=64, description="Label of the class, e.g. retrieval or streaming.")
    block_tokens: int = Field(description="Block size scored by summary upper bound: 16, 32 or 64 tokens.")
    budget_tokens: int = Field(gt=0, le=MAX_TOKENS, description="Host tokens this class attends per (request, kv-head).")
    window_mass: Optional[Tuple[float, float]] = Field(
        None, strict=False,
        description="[lo, hi]: heads whose window holds a share of the softmax mass in [lo, hi) (hi 1 included) "
                    "belong here; null: the role's range (retrieval, mixed, streaming) or [0, 1].")
    far_entropy: Optional[Tuple[float, float]] = Field(
        None, strict=False,
        description="[lo, hi]: heads whose normalized attention entropy over the host tokens is in [lo, hi) (hi 1 "
                    "included) belong here; null: the role's range or [0, 1].")

    @field_validator("window_mass", "far_entropy")
    @classmethod
    def _range(cls, value: Optional[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
        if value is not None:
            lo, hi = value
            if not all(math.isfinite(x) for x in value) or not 0 <= lo < hi <= 1:
                raise ValueError(f"expected [lo, hi] with 0 <= lo < hi <= 1, found [{lo}, {hi}]")
        return value

    @model_validator(mode="after")
    def _check(self) -> "HeadClass":
        if self.block_tokens not in (16, 32, 64):
            raise ValueError(f"block_tokens must be 16, 32 or 64, found {self.block_tokens}")
        if self.budget_tokens < self.block_tokens:
            raise ValueError(
                f"budget_tokens must be >= block_tokens ({self.block_tokens}), found {self.budget_tokens}"
            )
        return self


def _default_classes() -> Tuple[HeadClass, ...]:
    # 16-token blocks for every class: coarser blocks for the mixed and streaming classes lost
    # needle digits on a real model at 4K (docs/accuracy.md, "Fluxion's block sizes")
    return (
        HeadClass(name="retrieval", block_tokens=16, budget_tokens=2048),
        HeadClass(name="mixed", block_tokens=16, budget_tokens=1024),
        HeadClass(name="streaming", block_tokens=16, budget_tokens=256),
    )


class PredictorKnobs(Frozen):
    source: Literal["prefill", "early_decode"] = Field("prefill", description="Where head statistics come from: prefill, the query of a request's first decode step over its whole prompt (the row after the prompt's last), classified at once; early_decode, the mean over its first calibration_steps decode steps, during which its heads attend with the class of the largest budget.")
    calibration_steps: int = Field(8, gt=0, le=MAX_TOKENS, description="Decode steps observed when source is early_decode.")
    streaming_window_mass: float = Field(0.9, gt=0, lt=1, allow_inf_nan=False, description="A head whose window holds at least this softmax mass is streaming.")
    retrieval_entropy: float = Field(0.5, gt=0, lt=1, allow_inf_nan=False, description="Normalized attention entropy over the host tokens below which a head is retrieval (when not streaming); mixed otherwise.")

    def role_ranges(self, role: str) -> Tuple[Tuple[float, float], Tuple[float, float]]:
        """The (window_mass, far_entropy) ranges of a role."""
        w, e = self.streaming_window_mass, self.retrieval_entropy
        return {"streaming": ((w, 1.0), (0.0, 1.0)), "retrieval": ((0.0, w), (0.0, e)),
                "mixed": ((0.0, w), (e, 1.0))}[role]


def _in(x: float, r: Tuple[float, float]) -> bool:
    return r[0] <= x < r[1] or x == r[1] == 1.0


class FluxionKnobs(Frozen):
    head_classes: Tuple[HeadClass, ...] = Field(default_factory=_default_classes, strict=False, max_length=64, description="Block size and budget per head class: each item {name, block_tokens (16, 32 or 64, dividing window.page_tokens), budget_tokens, window_mass, far_entropy}; the classes' ranges must cover every head exactly once.")
    predictor: PredictorKnobs = Field(default_factory=PredictorKnobs, description="Head-property predictor.")
    class_budgets: Literal["share", "cap"] = Field("share", description="How the classes' budget_tokens meet the budget section: share, they are the heads' ratio and a layer's kv-heads' caps are scaled up or down together so that their mean is the budget section's tokens; cap, each head's cap is its class's budget_tokens, scaled down together only where their mean is above the budget section's.")
    block_rank: Literal["mean_key", "bound"] = Field("mean_key", description="How a head's blocks are ranked, from the host store's chunk summaries: mean_key, the largest logit of a chunk's mean key over the block's chunks and the kv-head's query heads (on a real model's keys its top blocks held more of each head's top-32 tokens: benchmarks/results/fluxion-block-rank-qwen-4k); bound, the largest upper bound of any token's logit (Quest's).")
    output_epsilon: float = Field(0.02, gt=0, lt=1, allow_inf_nan=False, description="Output-aware budgeting: smallest budget whose estimated relative output change stays under this (0 < epsilon < 1).")
    gpu_share: Literal["auto", "off"] = Field("auto", description="Priority scheduler: auto splits selected blocks between CPU compute and GPU (after a PCIe fetch); off keeps all on the CPU.")

    @field_validator("gpu_share", mode="before")
    @classmethod
    def _off(cls, value):
        # YAML 1.1 reads an unquoted `off` as false: that is the setting a user wrote
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check(self) -> "FluxionKnobs":
        names = [c.name for c in self.head_classes]
        if not names:
            raise ValueError("head_classes must name at least one class, found none")
        if len(set(names)) != len(names):
            raise ValueError(f"head_classes names must be unique, found {names}")
        for i, c in enumerate(self.head_classes):
            if c.name not in ROLES and c.window_mass is None and c.far_entropy is None:
                raise FieldError(f"head_classes.{i}", f"class '{c.name}' is not one of the predictor's roles "
                                 f"({', '.join(ROLES)}): expected window_mass or far_entropy ranges, found neither")
        self._check_partition()
        return self

    def ranges(self, i: int) -> Tuple[Tuple[float, float], Tuple[float, float]]:
        """Class i's (window_mass, far_entropy) ranges, its own or its role's."""
        c = self.head_classes[i]
        role = self.predictor.role_ranges(c.name) if c.name in ROLES else ((0.0, 1.0), (0.0, 1.0))
        return (c.window_mass or role[0], c.far_entropy or role[1])

    def classify(self, window_mass: float, far_entropy: float) -> int:
        """The index of the class whose ranges hold these statistics (the ranges partition [0, 1]^2)."""
        x, y = min(max(window_mass, 0.0), 1.0), min(max(far_entropy, 0.0), 1.0)
        for i in range(len(self.head_classes)):
            wm, fe = self.ranges(i)
            if _in(x, wm) and _in(y, fe):
                return i
        raise ValueError(f"no head class holds window_mass {window_mass} and far_entropy {far_entropy}")

    def _check_partition(self) -> None:
        """Every point of [0, 1]^2 in exactly one class: half-open ranges tile when every cell of the
        grid their ends draw has exactly one class at its centre."""
        boxes = [self.ranges(i) for i in range(len(self.head_classes))]
        xs = sorted({0.0, 1.0} | {v for b in boxes for v in b[0]})
        ys = sorted({0.0, 1.0} | {v for b in boxes for v in b[1]})
        for x0, x1 in zip(xs, xs[1:]):
            for y0, y1 in zip(ys, ys[1:]):
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                held = [i for i, (wm, fe) in enumerate(boxes) if _in(cx, wm) and _in(cy, fe)]
                where = (f"heads with window_mass in [{x0:g}, {x1:g}{']' if x1 == 1 else ')'} and far_entropy in "
                         f"[{y0:g}, {y1:g}{']' if y1 == 1 else ')'}")
                if not held:
                    raise FieldError("head_classes", f"head classes must cover every head: {where} fall in no "
                                     f"class")
                if len(held) > 1:
                    both = " and ".join(f"'{self.head_classes[i].name}'" for i in held)
                    raise FieldError("head_classes", f"head classes must not overlap: {where} fall in {both}")


def _fluxion_window() -> WindowConfig:
    return WindowConfig(page_tokens=FLUXION_PAGE_TOKENS)


class FluxionConfig(TierConfig):
    """Fluxion: per-head-class block-sparse attention with output-aware budgets.

    The budget section sets the mean cap over a layer's kv-heads: the classes' budget_tokens set
    the ratio between heads and are scaled together to meet it (`fluxion.class_budgets: share`),
    or scaled down only when their mean is above it (`cap`). Output-aware trimming then keeps
    each head's shortest prefix within its cap.
    """

    policy: Literal["fluxion"] = "fluxion"
    window: WindowConfig = Field(default_factory=_fluxion_window, description=f"Device window (page_tokens {FLUXION_PAGE_TOKENS} unless given: every head class's block must divide it).")
    fluxion: FluxionKnobs = Field(default_factory=FluxionKnobs)

    @field_validator("window", mode="before")
    @classmethod
    def _page_default(cls, value: object) -> object:
        if isinstance(value, dict) and "page_tokens" not in value:
            return {**value, "page_tokens": FLUXION_PAGE_TOKENS}
        return value

    @model_validator(mode="after")
    def _check_blocks(self) -> "FluxionConfig":
        page, chunk = self.window.page_tokens, self.host_store.summary_tokens
        for i, c in enumerate(self.fluxion.head_classes):
            if page % c.block_tokens or c.block_tokens % chunk:
                raise FieldError(f"fluxion.head_classes.{i}.block_tokens",
                                 f"block_tokens must divide window.page_tokens ({page}) and be a multiple of "
                                 f"host_store.summary_tokens ({chunk}), found {c.block_tokens}")
        return self

    @property
    def chunk_sums(self) -> bool:
        return True  # the output-aware budget estimates the unselected blocks from their mean key and value


# --- SparDA -----------------------------------------------------------------


class ForecastKnobs(Frozen):
    source: Literal["trained", "next_query", "reuse"] = Field(
        "reuse",
        description="reuse: each layer's blocks are the ones its query selected at the previous step (fetched during that step); next_query: layer l+1's input norm, query projection and RoPE over layer l's input hidden state select its blocks while layer l runs (layer 0, which has none before it, and any layer given no forecast fall back to reuse); trained: a per-layer forecast projection from weights_path (not built yet). next_query needs the model's hidden states: `kvtier eval` hands them; the sglang server, the demo and the benches see attention inputs only and refuse it (at launch, or when the tier is built).",
    )
    weights_path: Optional[str] = Field(None, max_length=4096, description="safetensors file of forecast projections (source: trained).")

    @model_validator(mode="after")
    def _check(self) -> "ForecastKnobs":
        if self.source == "trained" and not self.weights_path:
            raise ValueError("weights_path is required when source is 'trained', found none")
        return self


class SpardaKnobs(Frozen):
    forecast: ForecastKnobs = Field(default_factory=ForecastKnobs)
    block_tokens: int = Field(64, gt=0, le=MAX_TOKENS, description="Block size of selection and prefetch; a multiple of window.page_tokens.")
    prefetch_depth: int = Field(1, ge=1, le=4, description="Steps (reuse) or layers ahead the forecast prefetches; only 1 is built.")
    device_cache_blocks: Optional[int] = Field(None, gt=0, le=MAX_TOKENS, description="Cap of the device block cache, in blocks over all layers, kv-heads and requests (each request holds budget / block_tokens blocks per layer and kv-head); null: as many as the batch needs. A batch past it is refused with the numbers.")
    correction: Literal["none", "fetch", "cpu"] = Field("cpu", description="Blocks the real query selects but the forecast missed: none (SparDA: the forecast's set is the attended set), fetch them to the GPU before attending, or attend them on the CPU (merged by LSE).")


class SpardaConfig(TierConfig):
    """SparDA-style lookahead prefetch into a device block cache."""

    policy: Literal["sparda"] = "sparda"
    sparda: SpardaKnobs = Field(default_factory=SpardaKnobs)

    @model_validator(mode="after")
    def _check_blocks(self) -> "SpardaConfig":
        page = self.window.page_tokens
        if self.sparda.block_tokens % page:
            raise ValueError(
                f"sparda.block_tokens must be a multiple of window.page_tokens ({page}), found {self.sparda.block_tokens}"
            )
        return self


# --- HCAttention ------------------------------------------------------------


class CodebookKnobs(Frozen):
    groups: Optional[int] = Field(None, gt=0, le=1024, description="Channel groups of each key, each with its own codebook; must divide head_dim. null: head_dim/4 (4 channels a group: 32 groups at head_dim 128, what the paper found to work; 16 groups at head_dim 128 collapsed).")
    entries: int = Field(256, ge=2, le=32768, description="Centroids per group's codebook (k-means); up to 256 an index takes one byte, above two.")
    train_tokens: int = Field(16384, gt=0, le=MAX_TOKENS, description="Keys of a layer stored before its codebooks are trained on them (per kv-head); until then that layer's keys are kept as they came and scored exactly.")
    path: Optional[str] = Field(None, max_length=4096, description="Codebooks trained offline for this model (kvtier bench codebooks, from a capture of its keys); null: trained on each layer's first train_tokens keys.")


class EvictionKnobs(Frozen):
    rule: Literal["none", "low_attention"] = Field("none", description="none: the host store's own on_full applies. low_attention: pages whose approximate attention stays low are dropped, per request past capacity_tokens and (with on_full: evict) when the store is full; the newest window's worth of host pages is kept.")
    decay: float = Field(0.9, gt=0, lt=1, allow_inf_nan=False, description="Per step, a page's score becomes decay * score + (1 - decay) * its share of the approximate softmax (low_attention).")
    capacity_tokens: int = Field(1_048_576, gt=0, le=MAX_TOKENS, description="Host tokens a request keeps before its lowest-scored pages are dropped (low_attention).")


class HcattentionKnobs(Frozen):
    key_bits: Optional[int] = Field(None, description="Scalar quantization of the device-resident keys: 2, 4 or 8 bits with a scale per token and kv-head; null to use the codebook.")
    codebook: Optional[CodebookKnobs] = Field(default_factory=CodebookKnobs, description="Grouped vector quantization of the device-resident keys (the paper's form); null when key_bits is set.")
    logits: Literal["approximate", "exact"] = Field("exact", description="exact: the CPU recomputes the selected tokens' logits from the host store's keys (the default: at 4K on Qwen2.5-Coder-0.5B it matched dense where the approximate logits of the same codebook lost 2 of 8 prompts, eval-qwen2.5-coder-0.5b-4k-hcattention-cpu); approximate: the host part is weighted by the compressed keys' logits (the paper), reading only the selected values on the CPU.")
    exact_sets: Literal["query_head", "kv_head"] = Field("query_head", description="With exact logits, the host tokens each query head attends on the CPU: query_head, its own selection; kv_head, the union of its kv-head's query heads' selections (each host key and value row is then read once for the group, and every head attends at least its own tokens).")
    eviction: EvictionKnobs = Field(default_factory=EvictionKnobs)

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, value: object) -> object:
        # `key_bits: 4` alone means the scalar form: the codebook's default gives way.
        if isinstance(value, dict) and value.get("key_bits") is not None and "codebook" not in value:
            return {**value, "codebook": None}
        return value

    @model_validator(mode="after")
    def _check(self) -> "HcattentionKnobs":
        if (self.key_bits is None) == (self.codebook is None):
            raise ValueError("set exactly one of key_bits and codebook")
        if self.key_bits is not None and self.key_bits not in (2, 4, 8):
            raise ValueError(f"key_bits must be 2, 4 or 8, found {self.key_bits}")
        return self


def _hcattention_budget() -> MassBudget:
    return MassBudget(threshold=0.9, max_tokens=4096)


class HcattentionConfig(TierConfig):
    """HCAttention: compressed keys on the GPU select per query head, values on the host answer.

    The budget is per query head: mass (the smallest set reaching the threshold of the
    approximate softmax over the host tokens, capped; the paper's rule, 0.9), tokens or
    fraction (that many top tokens), or all (every host token with exact logits).
    """

    policy: Literal["hcattention"] = "hcattention"
    budget: Budget = Field(default_factory=_hcattention_budget, description="Host tokens attended per (request, query head).")
    hcattention: HcattentionKnobs = Field(default_factory=HcattentionKnobs)


# --- Baselines --------------------------------------------------------------


class DenseConfig(TierConfig):
    """All KV on the GPU, no tier: the accuracy and speed reference."""

    policy: Literal["dense"] = "dense"

    @property
    def offloads(self) -> bool:
        return False


class OffloadAllConfig(TierConfig):
    """All KV on the host, fetched over PCIe every step (FlexGen-like)."""

    policy: Literal["offload_all"] = "offload_all"
    host_store: HostStoreConfig = Field(
        default_factory=lambda: HostStoreConfig(key_format=KeyFormat.BF16), description="Host store (exact keys)."
    )
    budget: Budget = Field(default_factory=AllBudget, description="Always all: every host token is fetched.")

    @model_validator(mode="after")
    def _check_all(self) -> "OffloadAllConfig":
        if not isinstance(self.budget, AllBudget):
            raise ValueError(f"offload_all attends everything: budget.kind must be 'all', found '{self.budget.kind}'")
        if self.host_store.key_format is not KeyFormat.BF16:
            raise ValueError("offload_all fetches exact keys: host_store.key_format must be 'bf16', found "
                             f"'{self.host_store.key_format.value}'")
        return self


class QuestKnobs(Frozen):
    block_tokens: int = Field(16, gt=0, le=MAX_TOKENS, description="Block scored by its key min/max summary.")


class QuestConfig(TierConfig):
    """Quest's page selection (key min/max bound per block), scored and attended by the CPU engine; the paper fetches the selected pages to the GPU instead."""

    policy: Literal["quest"] = "quest"
    quest: QuestKnobs = Field(default_factory=QuestKnobs)


class WindowOnlyConfig(TierConfig):
    """Window only (StreamingLLM-style baseline): sinks + recent window on the device, nothing from the host."""

    policy: Literal["window_only"] = "window_only"


PolicyConfig = Annotated[
    Union[
        HgcaConfig,
        FluxionConfig,
        SpardaConfig,
        HcattentionConfig,
        DenseConfig,
        OffloadAllConfig,
        QuestConfig,
        WindowOnlyConfig,
    ],
    Field(discriminator="policy"),
]

POLICY_CLASSES = {
    cls.model_fields["policy"].default: cls
    for cls in (HgcaConfig, FluxionConfig, SpardaConfig, HcattentionConfig, DenseConfig, OffloadAllConfig, QuestConfig,
                WindowOnlyConfig)
}
