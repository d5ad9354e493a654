"""Bad input to the config layer: YAML past its limits, wrong types, absurd sizes, checks against the host
and the model. Each is refused with the field path and what was expected, quickly, quoting little."""

import time

import pytest

from kvtier.config import (
    ConfigError, HostFacts, ModelShape, check_host, check_shape, from_mapping, load, loads, shape_problems,
)
from kvtier.config.yaml_input import MAX_BYTES, MAX_DEPTH, MAX_NODES

LLAMA = ModelShape(n_layers=32, num_q_heads=32, kv_heads=8, head_dim=128)


def _refused(text):
    """(problems by path, whole message) of a text that must not validate."""
    with pytest.raises(ConfigError) as info:
        loads(text, "f.yaml")
    return {p.path: p.message for p in info.value.problems}, str(info.value)


def _bomb(field_line, levels=6):
    """A few lines that expand to 10**levels values where `field_line` uses the last alias."""
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    return "\n".join(lines + [field_line.format(f"*l{levels - 1}")]) + "\n"


# --- YAML limits ------------------------------------------------------------------------------


def test_nesting_500_deep_is_refused_without_exhausting_the_stack():
    probs, text = _refused("policy: hgca\nwindow: " + "[" * 500 + "]" * 500 + "\n")
    assert f"expected nesting at most {MAX_DEPTH} levels deep" in probs[""] and "line 2" in probs[""]
    loads("policy: hgca\nhgca: {overlap: true}\n")  # the loader is fine afterwards


def test_nesting_limit_is_exact():
    # the top mapping is one level, `window`'s value and each list inside it one more
    probs, _ = _refused("window: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")
    assert "window" in probs and "dictionary" in probs["window"]  # parsed: pydantic judges it
    probs, _ = _refused("window: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    assert "nesting at most" in probs[""]


@pytest.mark.parametrize("policy, field_line", [
    ("fluxion", "fluxion: {{head_classes: {}}}"),
    ("hgca", "budget: {{kind: tokens, tokens: {}}}"),
    ("hgca", "window: {}"),
])
def test_alias_bombs_in_known_fields_are_refused_before_they_are_built(policy, field_line):
    t0 = time.perf_counter()
    probs, _ = _refused(f"policy: {policy}\n" + _bomb(field_line))
    assert time.perf_counter() - t0 < 5
    assert f"expected at most {MAX_NODES} values once aliases are expanded" in probs[""]


def test_aliases_within_the_limit_still_work():
    config = loads("policy: fluxion\nfluxion:\n  head_classes:\n"
                   "    - &c {name: a, block_tokens: 16, budget_tokens: 64, window_mass: [0, 0.5]}\n"
                   "    - {<<: *c, name: b, window_mass: [0.5, 1]}\n")
    assert [c.name for c in config.fluxion.head_classes] == ["a", "b"]
    assert config.fluxion.head_classes[1].budget_tokens == 64


def test_an_alias_inside_the_node_it_names_is_refused():
    probs, _ = _refused("policy: hgca\nwindow: &a [*a]\n")
    assert "alias inside the node it names" in probs[""]


def test_a_50_mb_policy_string_is_refused_by_size_without_quoting_it(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("policy: " + "a" * 50_000_000 + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load(f)
    assert time.perf_counter() - t0 < 5
    assert "expected a policy file of at most 1 MiB, found 47.7 MiB" in str(info.value)
    assert len(str(info.value)) < 300


def test_size_limit_is_exact(tmp_path):
    body = "policy: hgca\n"
    pad = MAX_BYTES - len(body) - 1
    ok = tmp_path / "ok.yaml"
    ok.write_text(body + "#" * pad + "\n")  # exactly MAX_BYTES
    assert load(ok).policy == "hgca"
    over = tmp_path / "over.yaml"
    over.write_text(body + "#" * (pad + 1) + "\n")
    with pytest.raises(ConfigError, match="at most 1 MiB"):
        load(over)


def test_a_huge_value_from_python_is_quoted_short():
    with pytest.raises(ConfigError) as info:
        from_mapping({"policy": "a" * 50_000_000})
    assert "found 'aaaa" in str(info.value) and "(50000000 characters)" in str(info.value)
    assert len(str(info.value)) < 400
    with pytest.raises(ConfigError) as info:
        loads("window: {sink_tokens: '" + "7" * 5000 + "'}\n")
    assert len(info.value.problems[0].message) < 200


def test_unreadable_scalars_are_config_errors():
    probs, _ = _refused("max_context_tokens: " + "9" * 5000 + "\n")  # past Python's int-parsing limit
    assert "expected valid YAML, found a value that cannot be read" in probs[""]
    probs, _ = _refused("t: 2024-13-45\n")
    assert "month must be in 1..12" in probs[""]


# --- strict types ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, path, found", [
    ("window: {sink_tokens: true}", "window.sink_tokens", "found True"),
    ("window: {sink_tokens: \"64\"}", "window.sink_tokens", "found '64'"),
    ("budget: {tokens: 1e3}", "budget.tokens", "found 1000.0"),
    ("host_store: {capacity_gib: \"16\"}", "host_store.capacity_gib", "found '16'"),
    ("host_store: {capacity_gib: true}", "host_store.capacity_gib", "found True"),
    ("hgca: {overlap: 1}", "hgca.overlap", "found 1"),
    ("engine: {threads: 2.0}", "engine.threads", "found 2.0"),
])
def test_a_boolean_is_not_a_number_and_a_string_is_not_either(text, path, found):
    probs, _ = _refused(text)
    assert path in probs and found in probs[path], probs


def test_enums_still_take_their_names_and_floats_take_integers():
    config = loads("host_store: {key_format: int4, capacity_gib: 2, on_full: evict}\nengine: {isa: generic}\n"
                   "hgca: {group_reduce: mean, prefilter: 4}")
    assert config.host_store.capacity_gib == 2.0 and config.host_store.on_full.value == "evict"
    assert config.hgca.prefilter == 4.0 and config.engine.isa.value == "generic"
    assert loads("host_store: {capacity_gib: 5e-1}").host_store.capacity_gib == 0.5  # YAML 1.2 float


# --- absurd sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("text, path, words", [
    ("max_context_tokens: " + "9" * 35, "max_context_tokens", "less than or equal to 2147483647"),
    ("window: {window_tokens: 1048576000}", "window.window_tokens", "expected at most max_context_tokens (131072)"),
    ("host_store: {capacity_gib: 1e30}", "host_store.capacity_gib", "less than or equal to 65536"),
    ("host_store: {capacity_gib: .inf}", "host_store.capacity_gib", "finite number"),
    ("host_store: {capacity_gib: .nan}", "host_store.capacity_gib", "finite number"),
    ("budget: {tokens: 2147483648}", "budget.tokens", "less than or equal to 2147483647"),
    ("budget: {kind: mass, max_tokens: 99999999999}", "budget.max_tokens", "less than or equal to 2147483647"),
    ("hgca: {prefilter: 1e6}", "hgca.prefilter", "less than or equal to 1024"),
    ("engine: {threads: 100000}", "engine.threads", "less than or equal to 4096"),
    ("host_store: {key_format: int4, key_group_channels: 3}", "host_store.key_group_channels", "even number"),
])
def test_absurd_sizes_are_refused_with_the_field(text, path, words):
    probs, _ = _refused(text)
    assert path in probs and words in probs[path], probs


def test_a_smaller_context_is_blamed_on_max_context_tokens():
    probs, _ = _refused("max_context_tokens: 512\nwindow: {window_tokens: 1024}")
    assert "max_context_tokens must be >=" in probs["max_context_tokens"]


# --- the host: cores, SIMD variants, memory ----------------------------------------------------


def test_threads_beyond_the_usable_cores_are_refused():
    host = HostFacts(cpus=2, available_bytes=64 << 30)
    check_host(loads("engine: {threads: 2}"), source="f.yaml", host=host)
    with pytest.raises(ConfigError) as info:
        check_host(loads("engine: {threads: 3}"), source="f.yaml", host=host)
    assert "f.yaml: engine.threads: expected at most 2 (the 2 cores this process may use)" in str(info.value)
    with pytest.raises(ConfigError, match="expected at most 1 .*shared by 2 ranks"):
        check_host(loads("engine: {threads: 2}"), source="f.yaml", host=host, ranks_on_host=2)


def test_threads_against_this_process_affinity():
    import os

    cores = len(os.sched_getaffinity(0))
    check_host(loads(f"engine: {{threads: {cores}}}\nhost_store: {{capacity_gib: 0.01}}"), source="f")
    with pytest.raises(ConfigError, match=f"the {cores} cores this process may use"):
        check_host(loads(f"engine: {{threads: {cores + 1}}}\nhost_store: {{capacity_gib: 0.01}}"), source="f")


def test_isa_against_what_the_engine_says_runs():
    runs = {"generic", "avx2"}.__contains__
    check_host(loads("engine: {isa: avx2}"), source="f", host=HostFacts(2, 0), isa_supported=runs)
    with pytest.raises(ConfigError) as info:
        check_host(loads("engine: {isa: amx}"), source="f", host=HostFacts(2, 0), isa_supported=runs)
    assert "engine.isa: expected auto or a variant this CPU and OS run (generic, avx2), found 'amx'" in \
        str(info.value)


def test_isa_amx_against_this_cpu():
    native = pytest.importorskip("kvtier._native")
    if native.isa_supported("amx"):
        pytest.skip("this CPU and OS run AMX")
    with pytest.raises(ConfigError, match="engine.isa: expected auto or a variant this CPU and OS run .*'amx'"):
        check_host(loads("engine: {isa: amx}"), source="f", isa_supported=native.isa_supported)


def test_the_default_16_gib_store_on_a_23_gb_machine_warns_or_refuses():
    default = loads("policy: hgca")
    busy = HostFacts(cpus=2, available_bytes=12 << 30)  # 23 GB in all, 12 GiB of it available
    warnings = check_host(default, source="kvtier.yaml", host=busy, memory_refuses=False)
    assert [w.path for w in warnings] == ["host_store.capacity_gib"]
    assert "found 12.00 GiB available on this host" in warnings[0].message
    with pytest.raises(ConfigError, match="host_store.capacity_gib: expected at most 12.00 GiB per rank"):
        check_host(default, source="kvtier.yaml", host=busy)
    assert check_host(default, source="kvtier.yaml", host=HostFacts(2, 20 << 30)) == []
    assert check_host(loads("policy: dense"), source="d", host=busy) == []  # no host store


# --- the model: group sizes against head_dim ----------------------------------------------------


def test_int4_groups_that_do_not_divide_head_dim_are_refused_for_the_model():
    config = loads("host_store: {key_format: int4, key_group_channels: 48}")  # no model yet: valid
    check_shape(config, ModelShape(32, 32, 8, 96))
    with pytest.raises(ConfigError) as info:
        check_shape(config, LLAMA, source="p.yaml")
    assert ("p.yaml: host_store.key_group_channels: expected an even divisor of the model's head_dim 128 "
            "(2, 4, 8, 16, 32, 64, 128), found 48") in str(info.value)
    assert shape_problems(loads("host_store: {key_group_channels: 48}"), LLAMA) == []  # int8 keys: unused


def test_codebook_groups_and_head_dim_against_the_store():
    probs = shape_problems(loads("policy: hcattention\nhcattention: {codebook: {groups: 24}}"), LLAMA)
    assert [p.path for p in probs] == ["hcattention.codebook.groups"]
    probs = shape_problems(loads("policy: hgca"), ModelShape(2, 4, 2, 72))
    assert "multiple of 16" in probs[0].message
    assert shape_problems(loads("policy: dense"), ModelShape(2, 4, 2, 72)) == []
