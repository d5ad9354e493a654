"""The host store: a (pinned) arena of quantized KV pages with page tables."""

from .errors import CapacityError, HostMemoryError, PageOwnerError, UnknownRequestError
from .host_store import HostStore, PageTable, StoreStats

__all__ = ["CapacityError", "HostMemoryError", "HostStore", "PageOwnerError", "PageTable", "StoreStats",
           "UnknownRequestError"]
