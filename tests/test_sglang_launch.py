"""The sglang plugin's launch: --kv-tier in the server's arguments, the config file and the Engine API,
the refusals, and where the launch routes prefill, the radix cache and the decode graphs.

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import os
import pickle

import pytest

pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

from kvtier.config import load  # noqa: E402
from kvtier_sglang import launch, lifecycle, plugin, prefix, versions  # noqa: E402
from sglang_kit import registered, tiny_model  # noqa: E402, F401 - pytest finds fixtures by name
from sglang_kit import _launch, _stage2_backend, _tier_yaml  # noqa: E402


def test_version_in_supported_range():
    versions.check(versions.running())
    with pytest.raises(versions.UnsupportedSglangError, match="supports sglang >= 0.5.17"):
        versions.check("0.5.10")


def test_every_hook_applied_and_backend_registered():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    assert plugin.missing_hooks() == []
    assert "kvtier" in ATTENTION_BACKENDS


def test_flag_in_launch_server_help():
    proc = _launch("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--kv-tier PATH" in proc.stdout


def test_bad_yaml_stops_the_launch_with_exit_2(tmp_path, tiny_model):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: hgca\nwindow: {sinks: 4}\n")
    proc = _launch("--model-path", str(tiny_model), "--device", "cpu", "--kv-tier", str(bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}: window.sinks: unknown key" in proc.stderr
    assert "Load weight" not in proc.stderr + proc.stdout  # stopped before any model loads


def test_a_codebook_file_that_does_not_fit_the_model_stops_the_launch(tmp_path, tiny_model):
    """The tiny model: 2 layers, 2 kv-heads, head_dim 16 (4 groups of 4 channels); a file for another
    shape, or none, is refused at launch with the field path, before any model loads."""
    import torch

    from kvtier.runtime.key_index import save_codebooks

    policy = tmp_path / "hc.yaml"
    for books, want in ((None, "found no file"),
                        (torch.zeros(2, 2, 4, 8, 4), r"expected codebooks of shape (2, 2, 4, 16, 4)")):
        path = tmp_path / "books.pt"
        if books is not None:
            save_codebooks(path, books, {})
        policy.write_text(f"policy: hcattention\nhost_store: {{capacity_gib: 0.1}}\n"
                          f"hcattention: {{codebook: {{entries: 16, path: {path}}}}}\n")
        proc = _launch("--model-path", str(tiny_model), "--device", "cpu", "--kv-tier", str(policy))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{policy}: hcattention.codebook.path: " in proc.stderr and want in proc.stderr, proc.stderr[-1000:]
        assert "Load weight" not in proc.stderr + proc.stdout


def test_arguments_parse_into_the_typed_policy(tmp_path, tiny_model, root):
    from sglang.srt.server_args import prepare_server_args

    policy = root / "policies" / "hgca.yaml"
    args = prepare_server_args(["--model-path", str(tiny_model), "--device", "cpu", "--kv-tier", str(policy)])
    assert launch.config_for(args) == load(policy)
    assert args.decode_attention_backend == "kvtier"
    # the record is what reaches the scheduler processes
    assert launch.config_for(pickle.loads(pickle.dumps(args))) == load(policy)
    assert load(os.environ["KVTIER_CONFIG"]) == load(policy)


def test_flag_from_sglang_config_yaml(tmp_path, tiny_model, root):
    from sglang.srt.server_args import prepare_server_args

    cfg = tmp_path / "server.yaml"
    cfg.write_text(f"model-path: {tiny_model}\ndevice: cpu\nkv-tier: {root / 'kvtier.yaml'}\n")
    args = prepare_server_args(["--config", str(cfg)])
    assert launch.config_for(args) == load(root / "kvtier.yaml")


def test_refusals_are_clear():
    assert "speculative decoding" in launch.refusals(type("A", (), {"speculative_algorithm": "EAGLE"})())
    assert "pipeline parallelism" in launch.refusals(type("A", (), {"pp_size": 2})())
    assert "--decode-attention-backend" in launch.refusals(type("A", (), {"decode_attention_backend": "triton"})())


def test_engine_api_accepts_kv_tier(tmp_path, root):
    args, kwargs = launch.engine_init(object(), model_path="m", kv_tier=str(root / "policies" / "hgca.yaml"))
    assert "kv_tier" not in kwargs and kwargs["decode_attention_backend"] == "kvtier"
    from kvtier.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("budget: {tokens: -1}\n")
    with pytest.raises(ConfigError, match="budget.tokens"):
        launch.engine_init(object(), model_path="m", kv_tier=str(bad))


def test_both_backend_names_give_the_runner_one_instance(monkeypatch, tmp_path):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from kvtier_sglang import attention

    monkeypatch.setenv("KVTIER_CONFIG", str(_tier_yaml(tmp_path)))
    _, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)
    decode = ATTENTION_BACKENDS[launch.BACKEND](runner)  # as sglang builds its two backends
    assert ATTENTION_BACKENDS[launch.PREFILL_BACKEND](runner) is decode is attention.create_backend(runner)


def test_a_runner_that_cannot_hold_the_backend_is_refused_clearly(monkeypatch, tmp_path):
    from kvtier_sglang import attention

    monkeypatch.setenv("KVTIER_CONFIG", str(_tier_yaml(tmp_path)))  # how a scheduler finds the policy
    _, _, runner = _stage2_backend(prefill_backend=launch.PREFILL_BACKEND)

    class Sealed:  # what a runner with __slots__ would do
        __slots__ = tuple(vars(runner))

    sealed = Sealed()
    for name, value in vars(runner).items():
        setattr(sealed, name, value)
    with pytest.raises(launch.KvTierLaunchError, match="refused it"):
        attention.create_backend(sealed)


def test_launch_routes_prefill_to_the_tier_under_an_offloading_policy(tmp_path):
    import argparse

    ns = argparse.Namespace(disable_radix_cache=False, enable_mixed_chunk=False)
    launch.apply_to_namespace(ns, load(_tier_yaml(tmp_path)))
    assert ns.prefill_attention_backend == launch.PREFILL_BACKEND
    ns = argparse.Namespace(disable_radix_cache=True, enable_mixed_chunk=False, prefill_attention_backend="triton")
    launch.apply_to_namespace(ns, load(_tier_yaml(tmp_path)))
    assert ns.prefill_attention_backend == "triton"  # the user's choice stands (stage 3 off)


def test_launch_keeps_prefix_caching_on_its_own_cache_or_turns_it_off(tmp_path, tiny_model, capsys):
    import argparse

    config = load(_tier_yaml(tmp_path))
    ns = argparse.Namespace(disable_radix_cache=False, enable_mixed_chunk=False)
    launch.apply_to_namespace(ns, config)
    assert ns.decode_attention_backend == launch.BACKEND
    if prefix.registry_present():  # the 0.5.23 line: the kvtier radix cache
        assert not ns.disable_radix_cache and ns.radix_cache_backend == prefix.NAME
        assert prefix.NAME in __import__("sglang.srt.mem_cache.registry", fromlist=["x"]).registered_radix_cache_backends()
    else:
        assert ns.disable_radix_cache
    if prefix.registry_present():  # what the scheduler's tree-cache factory builds from that name
        from types import SimpleNamespace

        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.registry import get_radix_cache_factory

        backend, _, runner = _stage2_backend(disable_radix_cache=False, radix_cache_backend=prefix.NAME,
                                             prefill_backend=launch.PREFILL_BACKEND)
        params = CacheInitParams(disable=False, req_to_token_pool=runner.req_to_token_pool,
                                 token_to_kv_pool_allocator=runner.token_to_kv_pool_allocator, page_size=1)
        tree = get_radix_cache_factory(prefix.NAME)(SimpleNamespace(params=params, is_hybrid_swa=False,
                                                                    is_hybrid_ssm=False))
        assert isinstance(tree, prefix.cache_class()) and lifecycle.cache_of(runner.req_to_token_pool) is tree
        with pytest.raises(launch.KvTierLaunchError, match="full-attention models only"):
            get_radix_cache_factory(prefix.NAME)(SimpleNamespace(params=params, is_hybrid_swa=True))
    # Another radix cache, or prefill kept off the tier: prefix caching goes off, and the operator is told.
    for other in (dict(radix_cache_backend="flexkv"), dict(prefill_attention_backend="triton")):
        ns = argparse.Namespace(disable_radix_cache=False, enable_mixed_chunk=False, **other)
        launch.apply_to_namespace(ns, config)
        assert ns.disable_radix_cache
        assert "prefix caching is off under an offloading policy" in capsys.readouterr().err


def test_launch_refuses_mixed_chunks(tmp_path, tiny_model):
    import argparse

    config = load(_tier_yaml(tmp_path))
    assert "enable-mixed-chunk" in launch.tier_refusals(argparse.Namespace(enable_mixed_chunk=True), config)
    r = _launch("--model-path", str(tiny_model), "--kv-tier", str(_tier_yaml(tmp_path)), "--enable-mixed-chunk")
    assert r.returncode == 2 and "--enable-mixed-chunk" in r.stderr


def test_launch_refuses_the_next_query_forecast(tmp_path, tiny_model):
    """The backend sees each layer's q, k, v, not the model's hidden states: sparda's next_query stops the
    launch (exit 2) with the field and what it needs; reuse passes."""
    import argparse

    reuse = load(_tier_yaml(tmp_path, policy="sparda", knobs="sparda: {block_tokens: 32}\n"))
    assert launch.tier_refusals(argparse.Namespace(), reuse) is None
    bad = _tier_yaml(tmp_path, policy="sparda", knobs="sparda: {block_tokens: 32, forecast: {source: next_query}}\n")
    why = launch.tier_refusals(argparse.Namespace(), load(bad))
    assert "sparda.forecast.source: next_query needs the model's hidden states" in why
    r = _launch("--model-path", str(tiny_model), "--kv-tier", str(bad))
    assert r.returncode == 2 and "next_query needs the model's hidden states" in r.stderr


def test_launch_chooses_breakable_decode_graphs_where_they_can_run(tmp_path, monkeypatch, capsys):
    import argparse
    import importlib.machinery
    import importlib.util

    config = load(_tier_yaml(tmp_path))

    def launched(**fields):
        ns = argparse.Namespace(**{"disable_radix_cache": False, "enable_mixed_chunk": False, "device": "cuda",
                                   "cuda_graph_backend_decode": None, **fields})
        launch.apply_to_namespace(ns, config)
        return ns.cuda_graph_backend_decode, capsys.readouterr().err

    real = importlib.util.find_spec
    present = importlib.machinery.ModuleSpec("cuda.bindings", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: present if name == "cuda.bindings" else real(name, *a))
    mode, err = launched()  # the default where cuda-python is there
    assert mode == "breakable" and "CUDA graphs" not in err
    mode, err = launched(cuda_graph_backend_decode="disabled")  # eager, as asked
    assert mode == "disabled" and "CUDA graphs" not in err
    mode, err = launched(cuda_graph_backend_decode="full")
    assert mode == "disabled" and "would record the tier's attention" in err and "breakable" in err
    mode, err = launched(cuda_graph_backend_decode="breakable")
    assert mode == "breakable" and "CUDA graphs" not in err
    for off in ({"disable_cuda_graph": True}, {"disable_decode_cuda_graph": True}):
        assert launched(cuda_graph_backend_decode="breakable", **off)[0] == "disabled", off
    mode, err = launched(cuda_graph_backend_decode="breakable", device="cpu")
    assert mode == "disabled" and "CUDA device" in err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cuda.bindings" else real(name, *a))
    mode, err = launched(cuda_graph_backend_decode="breakable")
    assert mode == "disabled" and "cuda-python" in err
    mode, err = launched()
    assert mode == "disabled" and "cuda-python" in err
    # The dense policy leaves sglang's own graphs alone.
    ns = argparse.Namespace(device="cuda", cuda_graph_backend_decode=None)
    launch.apply_to_namespace(ns, loads_dense())
    assert ns.cuda_graph_backend_decode is None


def loads_dense():
    from kvtier.config import loads

    return loads("policy: dense\n", "<test>")


def _policy_file(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    return f


def test_launch_refuses_what_this_host_cannot_run(tmp_path, tiny_model):
    cores = len(os.sched_getaffinity(0))
    bad = _policy_file(tmp_path, f"engine: {{threads: {cores + 1}}}\n")
    proc = _launch("--model-path", str(tiny_model), "--device", "cpu", "--kv-tier", str(bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{bad}: engine.threads: expected at most {cores} (the {cores} cores this process may use)" in proc.stderr
    assert "Load weight" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_launch_checks_isa_and_memory_of_this_host(tmp_path, root):
    from kvtier._native import isa_supported
    from kvtier.config import ConfigError
    from kvtier.config.host import host_memory_available

    if not isa_supported("amx"):
        with pytest.raises(ConfigError, match="engine.isa: expected auto or a variant this CPU and OS run"):
            launch.check_this_host(load(_policy_file(tmp_path, "engine: {isa: amx}\n")), ranks_on_host=1,
                                   model_path=None, source="p.yaml")
    have = host_memory_available()
    default = load(root / "kvtier.yaml")  # 16 GiB of host store per rank
    ranks = int(have // (16 << 30)) + 1
    with pytest.raises(ConfigError, match="host_store.capacity_gib: expected at most"):
        launch.check_this_host(default, ranks_on_host=ranks, model_path=None, source="kvtier.yaml")


def test_launch_checks_int4_groups_against_a_local_models_head_dim(tmp_path):
    import json

    from kvtier.config import ConfigError

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_attention_heads": 32,
                                                         "num_hidden_layers": 32, "num_key_value_heads": 8}))
    config = load(_policy_file(tmp_path, "host_store: {key_format: int4, key_group_channels: 48}\n"))
    with pytest.raises(ConfigError) as info:
        launch.check_this_host(config, ranks_on_host=1, model_path=str(model), source="p.yaml")
    assert "p.yaml: host_store.key_group_channels: expected an even divisor of the model's head_dim 128" in \
        str(info.value)
    launch.check_this_host(config, ranks_on_host=1, model_path="org/hub-model", source="p.yaml")  # unknown: later
