"""Argument checks done in Python before any pointer reaches C (C checks its own
invariants again)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._loader import NativeValueError, ffi

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(
    name: str,
    t: object,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
) -> torch.Tensor:
    """Check a CPU, contiguous tensor of one of dtypes with the given shape (None = any)."""
    if not isinstance(t, torch.Tensor):
        raise NativeValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise NativeValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise NativeValueError(f"{name}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is None and shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise NativeValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                exp = tuple("*" if s is None else s for s in shape)
                raise NativeValueError(f"{name}: expected shape {exp}, got {tuple(t.shape)} (dim {i})")
    if not t.is_contiguous():
        raise NativeValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t


def int32_vector(name: str, t: object, length: int | None = None) -> torch.Tensor:
    """Integer tensors are accepted in any integer dtype and copied to contiguous int32."""
    if not isinstance(t, torch.Tensor):
        raise NativeValueError(f"{name}: expected an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise NativeValueError(f"{name}: expected an integer dtype, got {str(t.dtype).replace('torch.', '')}")
    if t.device.type != "cpu":
        raise NativeValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    if t.dim() != 1 or (length is not None and t.numel() != length):
        want = f"[{length}]" if length is not None else "1-D"
        raise NativeValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if t.dtype == torch.int64 and t.numel() and (t.max() > 2**31 - 1 or t.min() < -(2**31)):
        raise NativeValueError(f"{name}: values do not fit int32")
    return t.to(torch.int32).contiguous()


def ptr(ctype: str, t: torch.Tensor | None):
    return ffi.NULL if t is None else ffi.cast(ctype, t.data_ptr())


def positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise NativeValueError(f"{name}: expected a positive int, got {v!r}")
    return v
