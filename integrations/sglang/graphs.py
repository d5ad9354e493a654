"""Breakable decode CUDA graphs for causal language models.

sglang's breakable graph backend keeps one output buffer per captured size
and knows tensors, tuples, lists and pipeline proxies, but not the
`LogitsProcessorOutput` that a causal LM's decode forward returns: capture
stops with "Unsupported BCG output type" (seen on 0.5.17; 0.5.23 has the same
four methods). These AROUND hooks add that one case, treating the output's
tensor fields like the items of a tuple; every other output goes to sglang's
own code unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch

BCG = "sglang.srt.model_executor.runner_backend.breakable_cuda_graph_backend.BreakableCudaGraphBackend"


def _is_logits(x: Any) -> bool:
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput

    return isinstance(x, LogitsProcessorOutput)


def _tensors(x: Any) -> Dict[str, torch.Tensor]:
    """The output's tensor fields, by name (per-token rows first)."""
    return {f.name: getattr(x, f.name) for f in dataclasses.fields(x) if torch.is_tensor(getattr(x, f.name))}


def alloc_full_buffer(original, self, output, size, *args, **kwargs):
    if not _is_logits(output):
        return original(self, output, size, *args, **kwargs)
    return dataclasses.replace(output, **{n: t.new_empty((size, *t.shape[1:])) for n, t in _tensors(output).items()})


def slice_output(original, self, output, num_tokens, *args, **kwargs):
    if not _is_logits(output):
        return original(self, output, num_tokens, *args, **kwargs)
    return dataclasses.replace(output, **{n: t[:num_tokens] for n, t in _tensors(output).items()})


def output_rows(original, self, output, cap, *args, **kwargs):
    if not _is_logits(output):
        return original(self, output, cap, *args, **kwargs)
    return min([cap, *(t.shape[0] for t in _tensors(output).values())])


def copy_output_to_buffer(original, self, output, output_buffer, num_tokens, *args, **kwargs):
    if not _is_logits(output):
        return original(self, output, output_buffer, num_tokens, *args, **kwargs)
    have = _tensors(output)
    into = _tensors(output_buffer) if _is_logits(output_buffer) else None
    if into is None or into.keys() != have.keys():
        raise ValueError("breakable CUDA graph: the decode output's tensor fields changed between capture sizes: "
                         f"{sorted(have)} against {sorted(into or {})}")
    for name, t in have.items():
        into[name][:num_tokens].copy_(t[:num_tokens])
    return None


METHODS = {"_alloc_full_buffer": alloc_full_buffer, "_slice_output": slice_output, "_output_rows": output_rows,
           "_copy_output_to_buffer": copy_output_to_buffer}


def targets() -> Dict[str, Any]:
    """target -> AROUND hook, for the methods this sglang has (none without breakable graphs)."""
    import pkgutil

    out = {}
    for name, hook in METHODS.items():
        target = f"{BCG}.{name}"
        try:
            pkgutil.resolve_name(target)
        except (ImportError, AttributeError):
            continue
        out[target] = hook
    return out


__all__: List[str] = ["targets", "METHODS", "BCG"]
