"""Python face of the native engine (``native/``). Importing this package loads
the compiled extension and raises ImportError if it is missing or stale."""

from ._loader import (
    NativeError,
    NativeHandleError,
    NativeIndexError,
    NativeMemoryError,
    NativeStateError,
    NativeTimeoutError,
    NativeUnsupportedError,
    NativeValueError,
    active_isa,
    build_info,
    isa_supported,
    set_isa,
)
from ._store import (
    HostStoreView,
    KeyFormat,
    StoreBuffers,
    ValueFormat,
    advise_hugepages,
    dequant_raw_keys,
    dequant_raw_values,
)
from ._engine_api import (ISA_NAMES, Engine, EngineResult, GroupReduce, SelectMode, ServeBuffers, stream_read_gbps,
                          use_isa)

__all__ = [
    "ISA_NAMES", "Engine", "EngineResult", "GroupReduce", "HostStoreView", "KeyFormat", "NativeError",
    "NativeHandleError", "NativeIndexError", "NativeMemoryError", "NativeStateError", "NativeTimeoutError",
    "NativeUnsupportedError", "NativeValueError", "SelectMode", "ServeBuffers", "StoreBuffers", "ValueFormat", "dequant_raw_keys",
    "dequant_raw_values",
    "active_isa", "advise_hugepages", "build_info", "isa_supported", "set_isa", "stream_read_gbps", "use_isa",
]
