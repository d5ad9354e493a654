"""The sglang plugin against the real sglang package (CPU).

Runs where sglang is installed (CI builds a second venv from
requirements/sglang-cpu.txt); skipped elsewhere.
"""

import os
import pickle
import subprocess
import sys
import unittest

import pytest
import torch

sglang = pytest.importorskip("sglang", reason="sglang is not installed (see requirements/sglang-cpu.txt)")

import kvtier_sglang  # noqa: E402
from kvtier.config import load  # noqa: E402
from kvtier_sglang import launch, lifecycle, plugin, versions  # noqa: E402

TIER = """policy: hgca
window: {sink_tokens: 2, window_tokens: 8, page_tokens: 4}
host_store: {capacity_gib: 0.01, key_format: KEYS, summary_tokens: 4}
budget: BUDGET
max_context_tokens: 256
engine: {threads: 1}
"""


@pytest.fixture(scope="module", autouse=True)
def registered():
    kvtier_sglang.register()


@pytest.fixture
def tiny_model(tmp_path):
    """A config-only llama directory: enough for argument resolution, no weights."""
    import json

    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "torch_dtype": "float32",
    }))
    return d


def _tier_yaml(tmp_path, keys="bf16", budget="{kind: all}"):
    path = tmp_path / "tier.yaml"
    path.write_text(TIER.replace("KEYS", keys).replace("BUDGET", budget))
    return path


def _launch(*args):
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True,
                          timeout=240)


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


def _run_kit(monkeypatch, config_path):
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

    from kvtier.runtime import hybrid

    monkeypatch.setenv("KVTIER_CONFIG", str(config_path))
    host_seen = []
    original = hybrid.HybridAttention.plan

    def plan(self, rids):
        original(self, rids)
        host_seen.append(sum(self.tier.host_tokens(r) for r in rids))

    monkeypatch.setattr(hybrid.HybridAttention, "plan", plan)
    tc = unittest.TestCase()
    cases = list(kit.make_dense_cases("kvtier"))
    for case in cases:
        with torch.no_grad():
            kit.run_dense_attention_case(tc, case, dtype=torch.float32, device="cpu")
    return cases, host_seen


def test_sglang_attention_kit_passes_with_budget_all(monkeypatch, tmp_path):
    cases, host_seen = _run_kit(monkeypatch, _tier_yaml(tmp_path))
    assert any(c.forward_mode.is_decode() for c in cases)
    assert max(host_seen) > 0, "no kit case put tokens on the host: the tier was not exercised"


def test_sglang_attention_kit_at_the_default_budget_with_int8_keys(monkeypatch, tmp_path):
    _, host_seen = _run_kit(monkeypatch, _tier_yaml(tmp_path, keys="int8", budget="{kind: tokens, tokens: 2048}"))
    assert max(host_seen) > 0


def test_finished_request_releases_host_pages_through_the_real_pool():
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)

    class Probe:
        req_to_token_pool = pool
        released = []

        def release(self, row):
            self.released.append(row)

    probe = Probe()
    lifecycle.track(probe)

    class Kv:  # where 0.5.23 keeps the row
        holds_kv = True
        req_pool_idx = 3

    class Req:  # the attributes ReqToTokenPool.free and the hook read, in either layout
        req_pool_idx = 3
        kv = Kv()

    pool.free(Req())
    assert probe.released == [3]
