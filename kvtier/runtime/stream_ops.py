"""CUDA stream memory operations: a stream writes, or waits for, a 32-bit value in host memory.

The pipelined decode path (`hybrid.py`) hands each layer's query to the CPU
engine and takes its result back through flags in page-locked memory: the
stream stores "query ready" after the query's copy, and waits for "result
ready" before copying the result back, so the host thread that queues the
step's kernels never waits for the engine. torch does not expose these
operations; they come from the CUDA driver (libcuda, `cuStreamWaitValue32`
and `cuStreamWriteValue32`, CUDA 11.7 and newer) through ctypes.

`available()` is False without CUDA or where the driver lacks them; callers
then wait on the host instead.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Optional

import torch

_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0
_WRITE_DEFAULT = 0x0  # a system-wide memory fence, then the write


@lru_cache(maxsize=1)
def _driver() -> Optional[ctypes.CDLL]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fns = (lib.cuStreamWaitValue32_v2, lib.cuStreamWriteValue32_v2, lib.cuMemHostGetDevicePointer_v2,
               lib.cuGetErrorString)
    except (OSError, AttributeError):
        return None
    for fn in fns[:2]:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        fn.restype = ctypes.c_int
    fns[2].argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
    fns[2].restype = ctypes.c_int
    fns[3].argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and _driver() is not None


def _check(rc: int, what: str) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        text = msg.value.decode() if msg.value else "unknown error"
        raise RuntimeError(f"{what}: CUDA driver error {rc} ({text})")


def device_address(t: torch.Tensor) -> int:
    """The device's address of a page-locked host tensor's first element."""
    if t.device.type != "cpu" or not t.is_pinned():
        raise ValueError("device_address: expected a page-locked (pinned) CPU tensor")
    addr = ctypes.c_uint64()
    _check(_driver().cuMemHostGetDevicePointer_v2(ctypes.byref(addr), ctypes.c_void_p(t.data_ptr()), 0),
           "cuMemHostGetDevicePointer")
    return addr.value


def write_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """After the stream's earlier work (and a system-wide fence), store value at address."""
    _check(_driver().cuStreamWriteValue32_v2(stream.cuda_stream, address, value, _WRITE_DEFAULT),
           "cuStreamWriteValue32")


def wait_value(stream: torch.cuda.Stream, address: int, value: int) -> None:
    """The stream's later work waits until the int32 at address reaches value (wrapping compare)."""
    _check(_driver().cuStreamWaitValue32_v2(stream.cuda_stream, address, value, _WAIT_GEQ),
           "cuStreamWaitValue32")


__all__ = ["available", "device_address", "wait_value", "write_value"]
