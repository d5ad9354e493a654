"""The `kvtier` attention backend's registration with sglang, without importing its attention stack.

`register_backend()` adds both backend names to sglang's registry; `create_backend(runner)`
imports `backend.py` (and with it sglang's attention base class) only when a model runner
asks for the backend.
"""

from __future__ import annotations

from . import launch
from .names import BACKEND, PREFILL_BACKEND, KvTierLaunchError


def register_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend
    from sglang.srt.server_args import add_attention_backend_choices

    if BACKEND in ATTENTION_BACKENDS:
        return
    add_attention_backend_choices([BACKEND, PREFILL_BACKEND])
    register_attention_backend(BACKEND)(create_backend)
    register_attention_backend(PREFILL_BACKEND)(create_backend)


def create_backend(runner):
    """The model runner's one kvtier backend, for decode and (stage 3) prefill alike.

    sglang builds its prefill and decode backends separately when their names differ; both
    names return the same instance, so one tier sees every batch.
    """
    backend = getattr(runner, "_kvtier_backend", None)
    if backend is None:
        from .backend import KvTierAttnBackend

        backend = KvTierAttnBackend(runner, launch.config_for(getattr(runner, "server_args", None)))
        try:
            runner._kvtier_backend = backend
        except AttributeError as exc:  # a runner that takes no attributes would get two tiers
            raise KvTierLaunchError(f"kvtier keeps its backend on sglang's model runner, and "
                                    f"{type(runner).__name__} refused it: {exc}") from None
    return backend


__all__ = ["create_backend", "register_backend"]
