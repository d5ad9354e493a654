"""The kvtier command against bad input: one line per problem and exit 2, never a traceback; the demo
within the policy's capacity and the host's memory; start-up without torch."""

import os
import subprocess
import sys

import pytest

from kvtier.cli import input_error, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kvtier(*argv, importtime=False):
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-m", "kvtier", *argv]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def _imported(importtime_stderr):
    """Top-level module names in a -X importtime report."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def _policy(tmp_path, text, name="p.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return str(f)


# --- start-up -----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, code", [
    (("--version",), 0),
    (("demo", "--context", "abc"), 2),
    (("bench", "nope"), 2),
    (("validate", os.path.join(ROOT, "kvtier.yaml")), 0),
])
def test_version_usage_errors_and_validate_do_not_import_torch(argv, code):
    proc = _kvtier(*argv, importtime=True)
    assert proc.returncode == code, proc.stderr[-2000:]
    loaded = _imported(proc.stderr)
    assert "kvtier" in loaded  # the report is read right
    assert "torch" not in loaded and "numpy" not in loaded


def test_bench_options_come_from_the_bench_module(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "decode", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvtier bench decode") and "--contexts" in out


# --- typed errors: one line, exit 2 ---------------------------------------------------------------


def test_input_errors_are_the_projects_typed_errors():
    from kvtier.config import ConfigError
    from kvtier.policies import PolicyUnavailableError
    from kvtier.store.errors import CapacityError

    assert input_error(ConfigError("f", []))
    assert input_error(CapacityError("request 1", 4, 2, 1024))
    assert input_error(PolicyUnavailableError("fluxion is config only"))
    assert input_error(ValueError("n_threads: expected an int >= 0"))
    assert not input_error(RuntimeError("a bug")) and not input_error(KeyError("a bug"))


def test_a_config_only_policy_ends_the_demo_with_one_line(root, capsys, monkeypatch):
    from kvtier.policies import REGISTRY

    monkeypatch.delitem(REGISTRY, "fluxion")  # as a version without its runtime
    assert main(["demo", "--policy", str(root / "policies" / "fluxion.yaml"), "--context", "2048", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvtier demo: ") and "fluxion" in err[0]


# --- validate: the host ---------------------------------------------------------------------------


def test_validate_refuses_threads_beyond_this_process_cores(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    f = _policy(tmp_path, f"engine: {{threads: {cores + 1}}}\n")
    assert main(["validate", f]) == 2
    assert f"{f}: engine.threads: expected at most {cores} (the {cores} cores this process may use)" in \
        capsys.readouterr().err
    assert main(["validate", _policy(tmp_path, "engine: {threads: 100000}\n", "t.yaml")]) == 2
    assert "engine.threads: expected less than or equal to 4096, found 100000" in capsys.readouterr().err


def test_validate_refuses_an_isa_this_cpu_does_not_run(tmp_path, capsys):
    native = pytest.importorskip("kvtier._native")
    if native.isa_supported("amx"):
        pytest.skip("this CPU and OS run AMX")
    f = _policy(tmp_path, "engine: {isa: amx}\n")
    assert main(["validate", f]) == 2
    assert f"{f}: engine.isa: expected auto or a variant this CPU and OS run (generic" in capsys.readouterr().err


def test_validate_warns_when_the_stores_exceed_this_hosts_memory(root, capsys):
    from kvtier.config.host import host_memory_available

    have = host_memory_available()
    if not have:
        pytest.skip("no MemAvailable on this host")
    ranks = int(have // (16 << 30)) + 1  # the default 16 GiB store per rank no longer fits
    assert main(["validate", "--tp-size", str(ranks), str(root / "kvtier.yaml")]) == 0
    captured = capsys.readouterr()
    assert "kvtier.yaml: ok (hgca)" in captured.out
    assert "host_store.capacity_gib: expected at most" in captured.err and "(warning: a launch" in captured.err


# --- demo: capacity, on_full, sizes -----------------------------------------------------------------


def test_demo_refuses_what_the_policys_capacity_cannot_hold(tmp_path, capsys):
    f = _policy(tmp_path, "host_store: {capacity_gib: 0.001, key_format: int8}\n")
    assert main(["demo", "--policy", f, "--context", "4096", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "host_store.capacity_gib 0.001 GiB holds 19 pages" in err
    assert "5920 tokens (370 pages) on the host" in err and "on_full: evict" in err


def test_demo_evicts_under_on_full_evict(tmp_path, capsys):
    f = _policy(tmp_path, "host_store: {capacity_gib: 0.01, on_full: evict, key_format: int8}\n")
    assert main(["demo", "--policy", f, "--context", "4096", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "host 3184 tokens" in out  # 199 pages of 16: what 0.01 GiB holds, not the 5920 asked
    assert "on_full: evict dropped 2736 host tokens" in out


def test_demo_checks_sizes_against_memory_before_allocating(capsys):
    assert main(["demo", "--context", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "demo: --context 100000000 x --batch 2 needs about 10792.5 GiB of host memory" in err
    assert main(["demo", "--context", str(1 << 40)]) == 2
    assert "--context: expected at most 2147483647 tokens" in capsys.readouterr().err
    assert main(["demo", "--batch", "100000"]) == 2
    assert "--batch: expected at most 4096 requests" in capsys.readouterr().err


def test_demo_peak_estimate_follows_what_it_allocates():
    from kvtier.cli.demo import peak_bytes
    from kvtier.config import ModelShape

    shape = ModelShape(1, 32, 8, 128)
    per_token = peak_bytes([32768, 32671], shape, device_is_cpu=True, store_bytes=0) / (32768 + 32671)
    assert 52 << 10 < per_token < 60 << 10  # measured: about 52 KiB a token at 8K and 32K
    assert peak_bytes([1000], shape, device_is_cpu=False, store_bytes=7) < \
        peak_bytes([1000], shape, device_is_cpu=True, store_bytes=7)


@pytest.mark.parametrize("text, words", [
    ("host_store: {key_format: int4, key_group_channels: 48}\n",
     "host_store.key_group_channels: expected an even divisor of the model's head_dim 128"),
    ("engine: {threads: 4096}\n", "engine.threads: expected at most"),
])
def test_demo_checks_the_policy_against_the_model_and_host_with_the_file_name(tmp_path, capsys, text, words):
    f = _policy(tmp_path, text)
    assert main(["demo", "--policy", f, "--context", "2048", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{f}: {words}" in err and "Traceback" not in err


def test_demo_device_that_is_not_there(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["demo", "--device", "cuda", "--context", "2048"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err
    assert main(["demo", "--device", "nonsense", "--context", "2048"]) == 2
    assert "demo: --device: " in capsys.readouterr().err


# --- benches and eval: sizes are usage errors before any work ------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["bench", "prefill", "--quick", "--contexts", "0"], "--contexts: expected comma-separated positive integers"),
    (["bench", "decode", "--quick", "--batches", "1,0"], "--batches: expected comma-separated positive integers"),
])
def test_bench_sizes_are_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--contexts", "abc"], "eval: --contexts: expected comma-separated integers, found 'abc'"),
    (["--window", "100"], "window.page_tokens: page_tokens must divide window_tokens"),
    (["--window", "-5"], "window.window_tokens: expected greater than 0, found -5"),
])
def test_eval_settings_are_refused_before_a_model_loads(argv, words, capsys):
    pytest.importorskip("transformers")
    assert main(["eval", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "loading" not in err


def test_a_policy_read_from_a_device_stops_at_the_size_limit(capsys):
    assert main(["show", "/dev/zero"]) == 2
    assert "/dev/zero: expected a policy file of at most 1 MiB, found more" in capsys.readouterr().err
