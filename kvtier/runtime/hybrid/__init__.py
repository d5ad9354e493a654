"""Hybrid attention through the tier: decode plan/run (`decode`), prefill chunks (`extend`),
and where the time goes (`timing`)."""

from .decode import HybridAttention, HybridDetail, pipeline_possible
from .extend import ExtendAttention, host_block
from .timing import StepTimes, WindowTimer, profile_spans, span

__all__ = ["ExtendAttention", "HybridAttention", "HybridDetail", "StepTimes", "WindowTimer", "host_block",
           "pipeline_possible", "profile_spans", "span"]
