"""The kvtier command: validate/show exit codes and messages."""

import subprocess
import sys

import pytest

from kvtier.cli import main
from kvtier.config import loads


def test_validate_all_shipped_files(root, capsys):
    files = [str(p) for p in sorted((root / "policies").glob("*.yaml"))] + [str(root / "kvtier.yaml")]
    assert main(["validate", *files]) == 0
    assert capsys.readouterr().out.count(": ok (") == len(files)


def test_validate_reports_every_bad_file_and_exits_2(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("policy: dense\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: hgca\nwindow:\n  sink_tokens: 4\n  typo_tokens: 8\n")
    assert main(["validate", str(good), str(bad), str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: window.typo_tokens: unknown key" in err
    assert f"{tmp_path / 'nope.yaml'}: expected a readable UTF-8 YAML file" in err


@pytest.mark.parametrize("text, path, words", [
    ("fluxion:\n  head_classes:\n    - {name: retrieval, block_tokens: 16, budget_tokens: 512}\n"
     "    - {name: streaming, block_tokens: 64, budget_tokens: 128}\n", "fluxion.head_classes", "fall in no class"),
    ("fluxion:\n  head_classes:\n    - {name: retrieval, block_tokens: 16, budget_tokens: 512}\n"
     "    - {name: mixed, block_tokens: 32, budget_tokens: 256, far_entropy: [0.4, 1]}\n"
     "    - {name: streaming, block_tokens: 64, budget_tokens: 128}\n", "fluxion.head_classes", "must not overlap"),
    ("window: {page_tokens: 32}\nfluxion:\n  head_classes:\n    - {name: retrieval, block_tokens: 16, budget_tokens: 512}\n"
     "    - {name: mixed, block_tokens: 32, budget_tokens: 256}\n"
     "    - {name: streaming, block_tokens: 64, budget_tokens: 128}\n", "fluxion.head_classes.2.block_tokens",
     "must divide window.page_tokens"),
    ("fluxion: {output_epsilon: 1.5}\n", "fluxion.output_epsilon", "less than 1"),
])
def test_validate_refuses_bad_fluxion_files_with_the_field_path(tmp_path, capsys, text, path, words):
    bad = tmp_path / "fluxion.yaml"
    bad.write_text("policy: fluxion\n" + text)
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: {path}: " in err and words in err, err


def test_show_fills_defaults(tmp_path, capsys):
    f = tmp_path / "p.yaml"
    f.write_text("policy: hgca\nbudget: {tokens: 99}\n")
    assert main(["show", str(f)]) == 0
    out = capsys.readouterr().out
    config = loads(out)
    assert config.budget.tokens == 99 and config.window.page_tokens == 16
    assert "capacity_gib" in out


def test_module_entry_point_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: nope\n")
    proc = subprocess.run([sys.executable, "-m", "kvtier", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "policy: expected one of" in proc.stderr


def test_policy_reference_is_current_in_docs(root):
    from kvtier.config.reference import policy_reference

    reference = (root / "docs" / "policies.md").read_text()
    assert reference.endswith(policy_reference()), \
        "docs/policies.md is stale: replace its generated part with the output of `kvtier policies`"


def test_bench_help_names_every_bench(capsys):
    from kvtier.cli.bench import BENCHES

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"run a benchmark: {', '.join(BENCHES)}" in out
