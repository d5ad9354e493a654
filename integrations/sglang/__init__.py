"""kvtier's SGLang plugin: the only code that imports sglang.

Installed as the `kvtier` entry point of the `sglang.srt.plugins` group, it
adds `--kv-tier PATH` to `python -m sglang.launch_server` (and `kv_tier=` to
`sglang.Engine`) and registers the `kvtier` decode attention backend.
"""

from .plugin import register

__all__ = ["register"]
