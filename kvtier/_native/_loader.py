"""Loads the compiled engine and refuses a missing or stale build.

This module and its siblings are the only Python that touches ``ffi``/``lib``.
"""

from __future__ import annotations

import hashlib
import pathlib

import kvtier

_REBUILD = "run `pip install -e .` (or `python native/build_engine.py`) from the repository root"

try:
    from kvtier._native._engine import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - exercised through a subprocess test
    raise ImportError(f"kvtier native engine is not built: {_REBUILD} ({exc})") from exc

_NATIVE_SRC = pathlib.Path(__file__).resolve().parents[2] / "native"


def source_hash(src_dir: pathlib.Path = _NATIVE_SRC) -> str | None:
    """SHA-256 of the C sources beside the package (a source checkout), else None.

    Must hash exactly what native/build_engine.py hashes: names and bytes of the
    sorted *.c and *.h files.
    """
    if not (src_dir / "build_engine.py").is_file():
        return None
    h = hashlib.sha256()
    for p in sorted(q for q in src_dir.iterdir() if q.suffix in (".c", ".h")):
        h.update(p.name.encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _text(ptr) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def check_build(expected_version: str | None = None, src_dir: pathlib.Path = _NATIVE_SRC) -> None:
    """Raise ImportError when the compiled engine does not match this checkout."""
    want = kvtier.__version__ if expected_version is None else expected_version
    built = _text(lib.kvt_version())
    if built != want:
        raise ImportError(
            f"kvtier native engine is stale: built for version {built}, package is {want}; {_REBUILD}"
        )
    src = source_hash(src_dir)
    if src is not None and src != _text(lib.kvt_build_hash()):
        raise ImportError(
            f"kvtier native engine is stale: native/ sources changed since it was built "
            f"(sources {src[:12]}, build {_text(lib.kvt_build_hash())[:12]}); {_REBUILD}"
        )


check_build()


class NativeError(RuntimeError):
    """An error reported by the native engine (or caught before calling it)."""

    code = 7

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NativeValueError(NativeError, ValueError):
    code = 1


class NativeIndexError(NativeError, IndexError):
    code = 2


class NativeHandleError(NativeError, ValueError):
    code = 3


class NativeStateError(NativeError):
    code = 4


class NativeMemoryError(NativeError, MemoryError):
    code = 5


class NativeUnsupportedError(NativeError):
    code = 6


class NativeTimeoutError(NativeError, TimeoutError):
    code = 8


_BY_CODE = {
    1: NativeValueError,
    2: NativeIndexError,
    3: NativeHandleError,
    4: NativeStateError,
    5: NativeMemoryError,
    6: NativeUnsupportedError,
    8: NativeTimeoutError,
}


def check(rc: int) -> None:
    """Turn a C return code into the matching exception carrying the C message."""
    if rc != 0:
        cls = _BY_CODE.get(rc, NativeError)
        raise cls(_text(lib.kvt_last_error()) or f"native error code {rc}", rc)


_rc = lib.kvt_init()
if _rc != 0:
    raise ImportError(f"kvtier native engine cannot start: {_text(lib.kvt_last_error())}")


def active_isa() -> str:
    return _text(lib.kvt_active_isa())


def isa_supported(name: str) -> bool:
    return bool(lib.kvt_isa_supported(name.encode()))


def set_isa(name: str) -> None:
    """Switch kernel variant in this process (tests and benchmarks only)."""
    check(lib.kvt_set_isa(name.encode()))


def build_info() -> dict[str, str]:
    return {
        "version": _text(lib.kvt_version()),
        "build_hash": _text(lib.kvt_build_hash()),
        "isa": active_isa(),
    }
