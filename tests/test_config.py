"""Typed policies: round trips, defaults, cross-field rules and bad input."""

import pytest

from kvtier.config import (
    POLICY_CLASSES, ConfigError, ModelShape, check_capacity, dump, from_mapping, load, loads,
)
from kvtier.config.defaults import default_text


def test_every_shipped_policy_loads(root):
    files = sorted((root / "policies").glob("*.yaml")) + [root / "kvtier.yaml"]
    seen = {load(f).policy for f in files}
    assert {"hgca", "fluxion", "sparda", "hcattention", "dense", "offload_all", "quest"} <= seen


@pytest.mark.parametrize("tag", sorted(POLICY_CLASSES))
def test_round_trip_through_yaml(tag):
    config = from_mapping({"policy": tag})
    again = loads(dump(config))
    assert again == config
    assert type(again) is POLICY_CLASSES[tag]


def test_configs_are_frozen():
    config = loads("policy: hgca")
    with pytest.raises(Exception):
        config.window.window_tokens = 3  # type: ignore[misc]


def test_embedded_default_matches_repository_file(root):
    assert default_text() == (root / "kvtier.yaml").read_text()


def test_budget_kind_inferred_from_keys():
    assert loads("budget: {fraction: 0.2}").budget.kind == "fraction"
    assert loads("budget: {threshold: 0.9, max_tokens: 64}").budget.kind == "mass"


def _problems(text):
    with pytest.raises(ConfigError) as info:
        loads(text, "f.yaml")
    return {p.path: p.message for p in info.value.problems}, str(info.value)


def test_unknown_key_names_its_path_and_the_allowed_keys():
    probs, text = _problems("policy: hgca\nwindow: {sinks: 4}\n")
    assert "window.sinks" in probs
    assert "sink_tokens" in probs["window.sinks"] and "'sinks'" in probs["window.sinks"]
    assert text.startswith("f.yaml: window.sinks: unknown key")


def test_unknown_key_inside_a_tagged_budget():
    probs, _ = _problems("budget: {kind: tokens, tokens: 5, extra: 1}")
    assert "budget.extra" in probs and "kind, tokens" in probs["budget.extra"]


def test_wrong_type_and_bad_value():
    probs, _ = _problems("window: {sink_tokens: many}\nhost_store: {key_format: fp8, capacity_gib: -1}")
    assert "found 'many'" in probs["window.sink_tokens"]
    assert "'int8'" in probs["host_store.key_format"] and "'fp8'" in probs["host_store.key_format"]
    assert "greater than 0" in probs["host_store.capacity_gib"]


def test_unknown_policy_lists_the_known_ones():
    probs, _ = _problems("policy: magic")
    assert "'hgca'" in probs["policy"] and "'magic'" in probs["policy"]


@pytest.mark.parametrize("text, path, words", [
    ("window: {sink_tokens: 100, window_tokens: 64}", "window.window_tokens", "window_tokens must be >= sink_tokens"),
    ("window: {window_tokens: 100, page_tokens: 16}", "window.page_tokens", "page_tokens must divide window_tokens"),
    ("window: {page_tokens: 8}\nhost_store: {summary_tokens: 16}", "host_store.summary_tokens", "summary_tokens must divide"),
    ("budget: {kind: tokens, tokens: 0}", "budget.tokens", "greater than 0"),
    ("budget: {kind: fraction, fraction: 0.1, min_tokens: 10, max_tokens: 5}", "budget", "min_tokens must be <= max_tokens"),
    ("max_context_tokens: 100", "max_context_tokens", "max_context_tokens must be >="),
    ("policy: offload_all\nbudget: {kind: tokens, tokens: 5}", "", "budget.kind must be 'all'"),
    ("policy: sparda\nsparda: {forecast: {source: trained}}", "sparda.forecast", "weights_path is required"),
    ("policy: sparda\nsparda: {block_tokens: 24}", "", "multiple of window.page_tokens"),
    ("policy: hcattention\nhcattention: {key_bits: 3}", "hcattention", "key_bits must be 2, 4 or 8"),
    ("policy: hcattention\nhcattention: {key_bits: 4, codebook: {groups: 2}}", "hcattention", "exactly one"),
    ("policy: fluxion\nfluxion: {head_classes: []}", "fluxion", "at least one class"),
    ("policy: fluxion\nfluxion: {output_epsilon: 1}", "fluxion.output_epsilon", "less than 1"),
    ("policy: fluxion\nfluxion: {output_epsilon: 0}", "fluxion.output_epsilon", "greater than 0"),
    ("policy: fluxion\nfluxion: {output_epsilon: -0.5}", "fluxion.output_epsilon", "greater than 0"),
    ("policy: fluxion\nwindow: {page_tokens: 32}\nfluxion: {head_classes: [{name: retrieval, block_tokens: 16, "
     "budget_tokens: 2048}, {name: mixed, block_tokens: 32, budget_tokens: 1024}, {name: streaming, block_tokens: 64, "
     "budget_tokens: 256}]}", "fluxion.head_classes.2.block_tokens", "must divide window.page_tokens (32)"),
    ("policy: fluxion\nwindow: {page_tokens: 64}\nhost_store: {summary_tokens: 32}",
     "fluxion.head_classes.0.block_tokens", "multiple of host_store.summary_tokens (32)"),
    ("policy: fluxion\nfluxion: {head_classes: [{name: retrieval, block_tokens: 16, budget_tokens: 64}, "
     "{name: streaming, block_tokens: 64, budget_tokens: 64}]}", "fluxion.head_classes",
     "window_mass in [0, 0.9) and far_entropy in [0.5, 1] fall in no class"),
    ("policy: fluxion\nfluxion: {head_classes: [{name: retrieval, block_tokens: 16, budget_tokens: 64}, "
     "{name: mixed, block_tokens: 32, budget_tokens: 64}, "
     "{name: streaming, block_tokens: 64, budget_tokens: 64, window_mass: [0.8, 1]}]}", "fluxion.head_classes",
     "window_mass in [0.8, 0.9) and far_entropy in [0, 0.5) fall in 'retrieval' and 'streaming'"),
    ("policy: fluxion\nfluxion: {head_classes: [{name: wide, block_tokens: 16, budget_tokens: 64}]}",
     "fluxion.head_classes.0", "expected window_mass or far_entropy ranges"),
    ("policy: fluxion\nfluxion: {head_classes: [{name: a, block_tokens: 16, budget_tokens: 64, window_mass: [0.5, 0.2]}]}",
     "fluxion.head_classes.0.window_mass", "0 <= lo < hi <= 1"),
    ("policy: fluxion\nfluxion: {predictor: {streaming_window_mass: 1}}", "fluxion.predictor.streaming_window_mass",
     "less than 1"),
])
def test_cross_field_rules(text, path, words):
    probs, _ = _problems(text)
    assert path in probs and words in probs[path], probs


def test_non_yaml_and_non_mapping_and_duplicate_keys():
    probs, _ = _problems("window: [1, 2\n")
    assert "syntax error at line" in probs[""]
    probs, _ = _problems("- a\n- b\n")
    assert "expected a mapping" in probs[""] and "list" in probs[""]
    probs, _ = _problems("policy: hgca\npolicy: dense\n")
    assert "twice" in probs[""]


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="expected a readable UTF-8 YAML file"):
        load(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="readable UTF-8"):
        load(binary)


def test_capacity_against_context():
    llama8b = ModelShape(n_layers=32, num_q_heads=32, kv_heads=8, head_dim=128)
    config = loads("host_store: {capacity_gib: 16}\nmax_context_tokens: 131072")
    check_capacity(config, llama8b, batch=1)  # int8 keys + bf16 values + summaries: 14.1 GiB for 128K tokens
    with pytest.raises(ConfigError, match="host_store.capacity_gib: expected at least"):
        check_capacity(config, llama8b, batch=2)
    check_capacity(loads("policy: dense\nhost_store: {capacity_gib: 0.001}"), llama8b, batch=64)


def test_residual_counts_its_chunk_sums_in_host_bytes():
    """hgca.residual makes the store keep float32 key and value sums per summary chunk:
    8 * head_dim / summary_tokens more bytes per token and kv-head, in every capacity check."""
    from kvtier.config import host_bytes_per_token

    shape = ModelShape(n_layers=32, num_q_heads=32, kv_heads=8, head_dim=128)
    plain = loads("policy: hgca\nhost_store: {summary_tokens: 16}")
    resid = loads("policy: hgca\nhost_store: {summary_tokens: 16}\nhgca: {residual: true}")
    assert not plain.chunk_sums and resid.chunk_sums
    assert not loads("policy: quest").chunk_sums
    extra = host_bytes_per_token(resid.host_store, shape, chunk_sums=True) - \
        host_bytes_per_token(plain.host_store, shape)
    assert extra == 8 * 128 / 16 * 8 * 32
    # 14.1 GiB of plain int8/bf16 KV for 128K tokens fits 15 GiB; with the sums (+2 GiB) it does not
    check_capacity(loads("policy: hgca\nhost_store: {capacity_gib: 15}\nmax_context_tokens: 131072"), shape, batch=1)
    with pytest.raises(ConfigError, match="host_store.capacity_gib: expected at least"):
        check_capacity(loads("policy: hgca\nhost_store: {capacity_gib: 15}\nmax_context_tokens: 131072\n"
                             "hgca: {residual: true}"), shape, batch=1)


def test_fluxion_classes_partition_the_statistics_and_default_to_64_token_pages():
    config = loads("policy: fluxion\nwindow: {window_tokens: 512}\n")
    assert config.window.page_tokens == 64 and config.chunk_sums  # blocks of 16, 32 and 64 divide it
    knobs = config.fluxion
    names = [c.name for c in knobs.head_classes]
    cases = {(0.95, 0.1): "streaming", (0.9, 0.99): "streaming", (1.0, 1.0): "streaming", (0.5, 0.2): "retrieval",
             (0.0, 0.0): "retrieval", (0.89, 0.5): "mixed", (0.2, 1.0): "mixed"}
    for (wm, fe), want in cases.items():
        assert names[knobs.classify(wm, fe)] == want, (wm, fe)
    # custom ranges: two classes splitting the window mass at 0.5 cover everything
    two = loads("policy: fluxion\nfluxion: {head_classes: [\n"
                "  {name: far, block_tokens: 16, budget_tokens: 512, window_mass: [0, 0.5]},\n"
                "  {name: near, block_tokens: 64, budget_tokens: 128, window_mass: [0.5, 1]}]}\n").fluxion
    assert [two.classify(x, 0.3) for x in (0.0, 0.49, 0.5, 1.0)] == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="fluxion.head_classes: head classes must not overlap"):
        loads("policy: fluxion\nfluxion: {head_classes: [\n"
              "  {name: far, block_tokens: 16, budget_tokens: 512, window_mass: [0, 0.6]},\n"
              "  {name: near, block_tokens: 64, budget_tokens: 128, window_mass: [0.5, 1]}]}\n")
