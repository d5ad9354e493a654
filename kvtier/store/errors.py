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


class HostMemoryError(CapacityError):
    """The host store's arena cannot be allocated: more bytes than this machine can give."""

    def __init__(self, n_pages: int, page_bytes: int, nbytes: int, available: int | None, detail: str = ""):
        self.needed_pages = n_pages
        self.free_pages = 0
        self.page_bytes = page_bytes
        self.nbytes = nbytes
        self.available = available
        gib = 1 << 30
        have = f"{available / gib:.3f} GiB of host memory is available" if available is not None else \
            "the allocation failed"
        RuntimeError.__init__(
            self,
            f"host store: {n_pages} pages of {page_bytes} bytes ({nbytes / gib:.3f} GiB in all buffers) cannot be "
            f"allocated: {have}; lower host_store.capacity_gib" + (f" ({detail})" if detail else "")
        )


class PageOwnerError(ValueError):
    """A write to a page that is not in the writing request's table (released, evicted, or never its own)."""


class UnknownRequestError(KeyError):
    """A request id the store has never admitted, or already released."""
