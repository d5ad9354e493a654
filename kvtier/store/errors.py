"""Typed errors of the host store."""

from __future__ import annotations


class CapacityError(RuntimeError):
    """The host store cannot take what was asked; nothing stored was changed."""

    def __init__(self, what: str, needed_pages: int, free_pages: int, page_bytes: int):
        self.needed_pages = needed_pages
        self.free_pages = free_pages
        self.page_bytes = page_bytes
        gib = 1 << 30
        super().__init__(
            f"host store full: {what} needs {needed_pages} pages ({needed_pages * page_bytes / gib:.3f} GiB), "
            f"{free_pages} pages ({free_pages * page_bytes / gib:.3f} GiB) are free; raise "
            f"host_store.capacity_gib or set host_store.on_full: evict"
        )


class UnknownRequestError(KeyError):
    """A request id the store has never admitted, or already released."""
