"""`kvtier eval --prompts FILE`: the user's JSONL prompts, their scoring rules and their place in the grid."""

import json

import pytest

from kvtier.cli import main
from kvtier.eval import grid, user_prompts
from kvtier.eval.user_prompts import PromptFileError, Scoring, score


def _write(tmp_path, lines, name="p.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return f


class CharTokenizer:
    """One token per character, no chat template (the plain-text prompt of tasks._template)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_read_checks_every_field_and_skips_blank_lines(tmp_path):
    f = _write(tmp_path, [{"prompt": "a b c", "answer": "42"}, "",
                          {"prompt": "doc", "question": "who?", "answer": ["Ada", "Bob"], "score": "first_line",
                           "task": "people", "max_new_tokens": 8, "answer_prefix": " It was"}])
    a, b = user_prompts.read(f)
    assert a.answers == ("42",) and a.score is Scoring.CONTAINS and a.task == "prompts" and a.max_new_tokens == 32
    assert b.answers == ("Ada", "Bob") and b.score is Scoring.FIRST_LINE and b.task == "people"


@pytest.mark.parametrize("line,where", [
    ("not json", ":1: expected a JSON object, found invalid JSON"),
    ("[1, 2]", ":1: expected a JSON object, found list"),
    ({"prompt": "x"}, ":1: answer:"),
    ({"prompt": "x", "answer": []}, "at least one expected answer"),
    ({"prompt": "x", "answer": "  "}, "non-empty expected answers"),
    ({"prompt": "x", "answer": "y", "score": "fuzzy"}, ":1: score:"),
    ({"prompt": "x", "answer": "y", "max_new_tokens": 0}, ":1: max_new_tokens:"),
    ({"prompt": "x", "answer": "y", "max_new_tokens": "8"}, ":1: max_new_tokens:"),
    ({"prompt": "x", "answer": "y", "task": "a b"}, ":1: task:"),
    ({"prompt": "x", "answer": "y", "temperature": 0}, ":1: temperature: Extra inputs"),
    ({"prompt": "", "answer": "y"}, ":1: prompt:"),
])
def test_a_bad_line_is_a_typed_error_naming_file_line_and_field(tmp_path, line, where):
    f = _write(tmp_path, [line])
    with pytest.raises(PromptFileError, match=None) as exc:
        user_prompts.read(f)
    assert str(f) in str(exc.value) and where in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_an_empty_or_missing_file_is_refused(tmp_path):
    with pytest.raises(PromptFileError, match="found none"):
        user_prompts.read(tmp_path / "missing.jsonl")
    with pytest.raises(PromptFileError, match="at least one prompt"):
        user_prompts.read(_write(tmp_path, ["", "  "]))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "\xe9", "answer": "x"}\n')
    with pytest.raises(PromptFileError, match="UTF-8"):
        user_prompts.read(bad)


def test_the_three_scoring_rules():
    assert score("  Paris \n", ["paris"], Scoring.EXACT) == 1.0
    assert score("Paris, France", ["paris"], Scoring.EXACT) == 0.0
    assert score("It is Paris, then Lyon.", ["paris", "Lyon", "Nice"], Scoring.CONTAINS) == pytest.approx(2 / 3)
    assert score("4200", ["42"], Scoring.CONTAINS) == 1.0  # a substring
    assert score("4200", ["42"], Scoring.FIRST_LINE) == 0.0  # not a whole token
    assert score("The answer is 42.", ["42"], Scoring.FIRST_LINE) == 1.0
    assert score("\n\nno\n42", ["42"], Scoring.FIRST_LINE) == 0.0  # only the first non-empty line counts
    assert score("New York city", ["new york"], Scoring.FIRST_LINE) == 1.0
    assert score("x-42", ["42"], Scoring.FIRST_LINE) == 1.0  # punctuation bounds a token
    with pytest.raises(ValueError):
        score("x", [], Scoring.EXACT)


def test_build_puts_the_question_and_turn_switch_in_the_tail(tmp_path):
    tok = CharTokenizer()
    up = user_prompts.read(_write(tmp_path, [{"prompt": "doc", "question": "q?", "answer": "a",
                                              "answer_prefix": " A:"}]))[0]
    p = user_prompts.build(up, tok)
    assert "".join(map(chr, p.context_ids)) == "doc"
    assert "".join(map(chr, p.tail_ids)) == "\n\nq?\n A:"  # the question, the template's turn switch, the prefix
    assert p.length == len(p.context_ids) + len(p.tail_ids) and p.answers == ("a",)
    bare = user_prompts.build(user_prompts.read(_write(tmp_path, [{"prompt": "doc", "answer": "a"}], "b.jsonl"))[0],
                              tok)
    assert "".join(map(chr, bare.tail_ids)) == "\n"


def test_check_settings_takes_tasks_and_samples_from_the_file(tmp_path):
    f = _write(tmp_path, [{"prompt": "a", "answer": "x", "task": "t2"}, {"prompt": "b", "answer": "y", "task": "t1"},
                          {"prompt": "c", "answer": "z", "task": "t2"}])
    s = dict(model="smollm2-135m", contexts=[4096], policies=["dense", "hgca"], budgets=[0.1], tasks=["niah_single"],
             samples=5, window=256, prompts=str(f), device="cpu")
    grid.check_settings(s)
    assert s["tasks"] == ["t1", "t2"] and s["contexts"] == [grid.PROMPTS_CONTEXT] and s["samples"] == 2
    assert s["prompt_count"] == 3
    items = list(grid.grid_items(s, CharTokenizer(), seed=0))
    assert [(i.task, i.sample) for i in items] == [("t2", 0), ("t1", 0), ("t2", 1)]
    assert all(i.context == grid.PROMPTS_CONTEXT and i.scoring is Scoring.CONTAINS for i in items)


def test_policy_times_are_a_public_summary_of_the_records():
    recs = [dict(context=4096, policy="hgca", attn_ms_per_step=2.0, engine_ms_per_step=1.0, window_ms_per_step=0.5),
            dict(context=4096, policy="hgca", attn_ms_per_step=4.0, engine_ms_per_step=3.0, window_ms_per_step=0.5),
            dict(context=4096, policy="dense", score=1.0)]  # an old record without timings
    t = grid.policy_times(recs)
    assert set(t) == {(4096, "hgca")}
    assert t[(4096, "hgca")] == grid.PolicyTime(3.0, 2.0, 0.5, 2.0)


def test_the_cli_refuses_a_bad_prompts_file_before_loading_a_model(tmp_path, capsys):
    f = _write(tmp_path, [{"prompt": "x", "answer": "y", "score": "fuzzy"}])
    assert main(["eval", "--prompts", str(f), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eval: ") and f"{f}:1: score:" in err


def test_built_in_prompts_come_sample_by_sample(monkeypatch):
    """Every task's first prompt, then every task's second: a run stopped early holds each task alike."""
    monkeypatch.setattr(grid, "build", lambda task, tok, ctx, *, seed, sample: (task, ctx, sample))
    s = dict(contexts=[4096, 8192], tasks=["a", "b", "c"], samples=2)
    items = list(grid.grid_items(s, None, seed=0))
    assert [(i.context, i.task, i.sample) for i in items] == [
        (ctx, t, k) for ctx in (4096, 8192) for k in (0, 1) for t in ("a", "b", "c")]
    assert all(i.prompt == (i.task, i.context, i.sample) for i in items)
