"""The runtime: tier split and manager, hybrid attention (plan/run), LSE merge, references."""

from .merge import AttnPart, lse_from_base2, merge
from .reference import HybridResult, dense_attention, hybrid_attention, masked_attention, selection_mask
from .split import TierSplit, host_pages, split_window

__all__ = [
    "AttnPart", "HybridResult", "TierSplit", "dense_attention", "host_pages", "hybrid_attention",
    "lse_from_base2", "merge", "masked_attention", "selection_mask", "split_window",
]
# The tier proper (TierManager, HybridAttention, StandaloneTier) needs the
# native engine; import it from kvtier.runtime.tier / .hybrid / .standalone so
# that the reference path above works without a native build.
