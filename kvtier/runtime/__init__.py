"""The runtime: tier split, reference hybrid attention and the LSE merge."""

from .merge import AttnPart, lse_from_base2, merge
from .reference import HybridResult, dense_attention, hybrid_attention, masked_attention, selection_mask
from .split import TierSplit, host_pages, split_window

__all__ = [
    "AttnPart", "HybridResult", "TierSplit", "dense_attention", "host_pages", "hybrid_attention",
    "lse_from_base2", "masked_attention", "merge", "selection_mask", "split_window",
]
