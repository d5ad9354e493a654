"""kvtier: a KV-cache tier for long-context LLM decoding.

The GPU keeps each request's sink tokens and recent window; the rest lives in
a host store with quantized keys and stays attendable there. Dense attention
over the window and sparse attention over the host store are merged by
log-sum-exp. See ``kvtier/README.md`` for the layer map.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
