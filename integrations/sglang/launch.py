"""`--kv-tier`: the flag, its parse-time validation and the launch-time refusals.

The YAML is validated while the arguments are parsed; a bad file stops the
launch with exit code 2 and kvtier's `FILE: field.path: ...` message before
any model loads. So does a policy this host or model cannot run: threads
beyond the cores, a SIMD variant the CPU lacks, stores beyond the memory
available, group sizes that do not divide a local model's head_dim, a host-strategy setting
that needs what the attention backend does not see (sparda's next_query forecast needs the
model's hidden states). The resolved policy rides on the ServerArgs record (which
is pickled to the scheduler processes) and in KVTIER_CONFIG for processes
built from the Python API.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Optional

from kvtier.config import (ConfigError, Isa, ModelShape, Problem, TierConfig, check_host, check_shape, dump, env, load,
                           loads)

from . import prefix, serving, versions
from .hooks import verify_hooks
from .names import BACKEND, CONFIG_ATTR, GRAPH_MODE, PREFILL_BACKEND, RADIX_CACHE, KvTierLaunchError
from .serving import decode_graph_mode


def add_cli_args(result: Any, parser: argparse.ArgumentParser) -> Any:
    """AFTER ServerArgs.add_cli_args: add --kv-tier."""
    parser.add_argument(
        "--kv-tier", metavar="PATH", default=None,
        help="kvtier policy YAML (e.g. kvtier.yaml, policies/hgca.yaml): keep sinks + a recent window of each "
             "request's KV on the GPU and attend the rest from a host store (validated at launch; see "
             "`kvtier validate`).",
    )
    return result


def refusals(values: Any) -> Optional[str]:
    """Why this launch cannot run with the tier, or None."""
    spec = getattr(values, "speculative_algorithm", None)
    if spec:
        return f"--kv-tier does not support speculative decoding yet, found --speculative-algorithm {spec}"
    pp = getattr(values, "pp_size", 1) or 1
    if pp > 1:
        return f"--kv-tier does not support pipeline parallelism yet, found --pp-size {pp}"
    decode = getattr(values, "decode_attention_backend", None)
    if decode not in (None, BACKEND):
        return (f"--kv-tier attends decode through the '{BACKEND}' backend, found --decode-attention-backend "
                f"{decode}; drop that flag")
    return None


def tier_refusals(values: Any, config: TierConfig) -> Optional[str]:
    """Why this policy cannot serve this launch, or None."""
    from kvtier.policies import PolicyUnavailableError, policy_for
    from kvtier.runtime.strategies import strategy_class

    try:
        policy = policy_for(config)
    except PolicyUnavailableError as exc:
        return f"--kv-tier: {exc}"
    # the backend sees each layer's q, k, v only: no forecast queries (the tier is built without them)
    why = strategy_class(policy.strategy).refusal(policy, forecasts=False)
    if why:
        return f"--kv-tier: {why}"
    if serving.can_release_slots(config) and getattr(values, "enable_mixed_chunk", False):
        return ("--kv-tier with an offloading policy frees evicted device slots, and --enable-mixed-chunk "
                "would prefill decode requests over them; drop --enable-mixed-chunk")
    return None


# ServerArgs fields apply_to_namespace may set (the Python API copies these into Engine kwargs).
APPLIED = ("decode_attention_backend", "cuda_graph_backend_decode", "disable_cuda_graph", "disable_radix_cache",
           "radix_cache_backend",
           "prefill_attention_backend", "cuda_graph_backend_prefill")


def _server_args_field(name: str) -> bool:
    from sglang.srt.server_args import ServerArgs

    return hasattr(ServerArgs, name)


def prefix_cache_unavailable(values: Any, stage3: bool) -> Optional[str]:
    """Why the kvtier radix cache (prefix.py) cannot run under this launch, or None."""
    if not prefix.registry_present():
        return ("this sglang has no radix-cache registry, and its radix cache would match evicted "
                "device slots that were freed")
    if not _server_args_field("radix_cache_backend"):
        return "this sglang has no --radix-cache-backend"
    chosen = getattr(values, "radix_cache_backend", None)
    if chosen not in (None, RADIX_CACHE):
        return f"--radix-cache-backend {chosen} does not know host-resident pages"
    if not stage3:
        return "prefill does not come to the tier (--prefill-attention-backend)"
    for flag in ("enable_hierarchical_cache", "enable_lmcache", "enable_flexkv"):
        if getattr(values, flag, False):
            return f"--{flag.replace('_', '-')} runs its own cache"
    return None


def apply_to_namespace(values: Any, config: TierConfig) -> None:
    """Select the kvtier decode backend and the graph-free decode it needs."""
    if config.policy == "dense":
        return  # the baseline runs sglang unchanged
    values.decode_attention_backend = BACKEND
    stage3 = False
    if serving.can_release_slots(config):
        prefill = getattr(values, "prefill_attention_backend", None)
        if prefill in (None, PREFILL_BACKEND):
            # Stage 3: prefill chunks come to the tier too, which evicts between them, so a
            # prompt needs sinks + window + two chunks of the GPU pool rather than its length.
            values.prefill_attention_backend = PREFILL_BACKEND
            if hasattr(values, "cuda_graph_backend_prefill"):
                values.cuda_graph_backend_prefill = "disabled"
            stage3 = True
        else:
            print(f"kvtier: --prefill-attention-backend {prefill} keeps prefill off the tier, so a prompt must "
                  "fit the GPU pool whole", file=sys.stderr)
    if serving.can_release_slots(config) and not getattr(values, "disable_radix_cache", False):
        # A freed evicted slot must never be matched as a cached prefix: the kvtier radix cache
        # keeps host addresses in their place (prefix.py); any other cache is turned off.
        why = prefix_cache_unavailable(values, stage3)
        if why is None:
            values.radix_cache_backend = RADIX_CACHE
        else:
            print(f"kvtier: prefix caching is off under an offloading policy: {why}", file=sys.stderr)
            values.disable_radix_cache = True
    # The hybrid decode waits on the CPU engine each layer, which no full CUDA graph can record.
    # Decode graphs break at every attention call instead (sglang's breakable backend): the rest
    # of the forward replays, the tier's attention runs between the segments. That is the default
    # where it can run; elsewhere, or when asked, decode runs eagerly.
    if not hasattr(values, "cuda_graph_backend_decode"):
        if hasattr(values, "disable_cuda_graph"):  # releases with one graph switch
            values.disable_cuda_graph = True
        return
    chosen = values.cuda_graph_backend_decode
    off = getattr(values, "disable_cuda_graph", False) or getattr(values, "disable_decode_cuda_graph", False)
    if off or chosen == "disabled":
        values.cuda_graph_backend_decode = "disabled"
        return
    if chosen in (None, GRAPH_MODE):
        why = breakable_graphs_unavailable(values)
        if why is None:
            values.cuda_graph_backend_decode = GRAPH_MODE
            return
        print(f"kvtier: decode runs without CUDA graphs: {why}", file=sys.stderr)
    else:
        print(f"kvtier: --cuda-graph-backend-decode {chosen} would record the tier's attention into the graph; "
              f"decode runs without CUDA graphs (--cuda-graph-backend-decode {GRAPH_MODE}, the default, keeps "
              "graphs for the rest of the forward)", file=sys.stderr)
    values.cuda_graph_backend_decode = "disabled"


BREAKABLE_MODULE = "sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph"


def breakable_graphs_unavailable(values: Any) -> Optional[str]:
    """None when this launch can capture breakable decode graphs, else why not."""
    import importlib.util

    device = str(getattr(values, "device", None) or "cuda")
    if not device.startswith("cuda"):
        return f"CUDA graphs need a CUDA device, found --device {device}"
    try:
        if importlib.util.find_spec(BREAKABLE_MODULE) is None:
            raise ImportError
    except ImportError:
        return "this sglang release has no breakable CUDA graphs"
    try:
        found = importlib.util.find_spec("cuda.bindings") is not None
    except ImportError:
        found = False
    if not found:
        return "sglang's breakable CUDA graphs need the cuda-python package (pip install cuda-python)"
    return None


def load_or_exit(path: str) -> TierConfig:
    try:
        versions.check(versions.running())
        return load(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
    except versions.UnsupportedSglangError as exc:
        print(f"--kv-tier: {exc}", file=sys.stderr)
    raise SystemExit(2)


def _local_shape(model_path: Any) -> Optional[ModelShape]:
    """The attention shape from a local model directory's config.json, or None (a hub id, no such file)."""
    try:
        with open(os.path.join(str(model_path), "config.json")) as f:
            hf = json.load(f)
        cfg = hf.get("text_config", hf)
        hq = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // hq)
        return ModelShape(int(cfg["num_hidden_layers"]), hq, int(cfg.get("num_key_value_heads") or hq), head_dim)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _codebook_problem(config: TierConfig, shape: Optional[ModelShape], tp_size: int) -> Optional[str]:
    """Why hcattention's codebook file cannot serve this launch, or None."""
    book = getattr(getattr(config, "hcattention", None), "codebook", None)
    if book is None or not book.path:
        return None
    from kvtier.runtime.key_index import CodebookFileError, load_codebooks

    if not os.path.isfile(book.path):
        return f"expected a codebook file (kvtier bench codebooks), found no file {book.path}"
    if tp_size > 1:
        return f"expected --tp-size 1: a codebook file holds every kv-head, and ranks load their own (found {tp_size})"
    if shape is not None:
        try:
            load_codebooks(book.path, shape, book.groups or max(1, shape.head_dim // 4), book.entries, field="")
        except CodebookFileError as exc:
            return str(exc).lstrip(": ")
    return None


def check_this_host(config: TierConfig, *, ranks_on_host: int, model_path: Any, source: str) -> None:
    """ConfigError for what this host (cores, SIMD variant, memory) or a local model cannot run."""
    isa_supported = None
    if config.engine.isa is not Isa.AUTO:
        try:
            from kvtier._native import isa_supported
        except ImportError:  # not built: the scheduler says so, with the rebuild command, when it loads the tier
            pass
    check_host(config, source=source, ranks_on_host=ranks_on_host, isa_supported=isa_supported)
    shape = _local_shape(model_path) if model_path else None
    if shape:
        check_shape(config, shape, source=source)
    why = _codebook_problem(config, shape, ranks_on_host)
    if why:
        raise ConfigError(source, [Problem("hcattention.codebook.path", why)])


def publish(config: TierConfig) -> str:
    """Write the resolved policy where spawned processes find it; returns the YAML."""
    text = dump(config)
    fd, path = tempfile.mkstemp(prefix="kvtier-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.environ[env.CONFIG.name] = path
    return text


def from_cli_args(original, cls, args: argparse.Namespace):
    """AROUND ServerArgs.from_cli_args: validate --kv-tier and route decode to the tier."""
    path = getattr(args, "kv_tier", None)
    if not path:
        return original(cls, args)
    verify_hooks()
    config = load_or_exit(path)
    why = refusals(args) or tier_refusals(args, config)
    if why:
        print(why, file=sys.stderr)
        raise SystemExit(2)
    try:
        check_this_host(config, ranks_on_host=int(getattr(args, "tp_size", 1) or 1),
                        model_path=getattr(args, "model_path", None), source=path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(2)
    apply_to_namespace(args, config)
    server_args = original(cls, args)
    _attach(server_args, publish(config))
    if config.offloads:
        serving.attach(server_args, serving.decide(server_args, config))
    return server_args


def engine_init(*args, **kwargs):
    """BEFORE Engine.__init__: accept kv_tier=PATH from the Python API."""
    path = kwargs.pop("kv_tier", None)
    if path is None:
        return args, kwargs
    versions.check(versions.running())
    config = load(path)  # ConfigError propagates: the caller gets the typed error
    check_this_host(config, ranks_on_host=int(kwargs.get("tp_size", 1) or 1), model_path=kwargs.get("model_path"),
                    source=path)
    ns = argparse.Namespace(**kwargs)
    why = refusals(ns) or tier_refusals(ns, config)
    if why:
        raise KvTierLaunchError(why)
    apply_to_namespace(ns, config)
    kwargs.update({k: v for k, v in vars(ns).items() if k in APPLIED})
    publish(config)
    return args, kwargs


def config_for(server_args: Any) -> TierConfig:
    """The policy a scheduler process serves: from the record, else from KVTIER_CONFIG."""
    text = getattr(server_args, CONFIG_ATTR, None) if server_args is not None else None
    if text:
        return loads(text, "<--kv-tier>")
    path = env.get(env.CONFIG)
    if path:
        return load(path)
    raise KvTierLaunchError(f"attention backend '{BACKEND}' needs a policy: launch with --kv-tier PATH")


def _attach(server_args: Any, text: str) -> None:
    try:
        setattr(server_args, CONFIG_ATTR, text)
    except (AttributeError, TypeError):
        object.__setattr__(server_args, CONFIG_ATTR, text)
