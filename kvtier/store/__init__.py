"""The host store: a (pinned) arena of quantized KV pages with page tables."""

from .errors import CapacityError, UnknownRequestError
from .host_store import HostStore, PageTable, StoreStats

__all__ = ["CapacityError", "HostStore", "PageTable", "StoreStats", "UnknownRequestError"]
