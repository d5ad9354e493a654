"""The user's own prompts for `kvtier eval --prompts FILE`: a JSONL file, one prompt a line.

Each line is a JSON object:

    {"prompt": "...", "answer": "42", "score": "first_line"}
    {"prompt": "<a long document>", "question": "Who signed it?", "answer": ["Ada", "Bob"],
     "score": "contains", "task": "contracts", "max_new_tokens": 24, "answer_prefix": " Signed by"}

- ``prompt`` (required): the user's message, or its long part when ``question`` is given;
- ``question``: appended to the message after a blank line. As in the built-in tasks, the
  question, the chat template's turn switch and ``answer_prefix`` are decoded token by token
  through each policy's tier, so the answer reads the prompt through the tier; without a
  question only the turn switch and the prefix are;
- ``answer`` (required): the expected answer, or a list of them;
- ``score``: how an answer is scored (default ``contains``), in points of 100:
  ``exact``: the answer (stripped) equals one of the expected ones, case-insensitive (1 or 0);
  ``contains``: the share of the expected strings found in the answer, case-insensitive
  (RULER's string match, as the built-in tasks score);
  ``first_line``: the share of the expected strings found as whole tokens (not inside a
  longer word or number) in the answer's first non-empty line, case-insensitive;
- ``task``: a label to group prompts by in the report (default ``prompts``);
- ``max_new_tokens`` (1 to 4096, default 32) and ``answer_prefix`` (default none).

Every field is checked when the file is read; a bad line is a `PromptFileError` naming the
file, the line and the field.
"""

from __future__ import annotations

import json
import pathlib
import re
from enum import Enum
from typing import List, Sequence, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .tasks import Prompt, _ids, _template

MAX_FILE_BYTES = 64 << 20
MAX_PROMPTS = 100_000


class Scoring(str, Enum):
    EXACT = "exact"
    CONTAINS = "contains"
    FIRST_LINE = "first_line"


class PromptFileError(ValueError):
    """A prompts file that cannot be read, or a line that is not a valid prompt."""


class UserPrompt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    prompt: str = Field(min_length=1)
    answer: Union[str, Tuple[str, ...]]
    question: str = ""
    score: Scoring = Field(Scoring.CONTAINS, strict=False)
    task: str = Field("prompts", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    max_new_tokens: int = Field(32, ge=1, le=4096)
    answer_prefix: str = ""

    @field_validator("answer", mode="before")
    @classmethod
    def _answers(cls, v):
        if isinstance(v, list):
            v = tuple(v)
        if isinstance(v, tuple) and not v:
            raise ValueError("expected at least one expected answer, found an empty list")
        return v

    @property
    def answers(self) -> Tuple[str, ...]:
        return (self.answer,) if isinstance(self.answer, str) else self.answer

    @field_validator("answer")
    @classmethod
    def _non_empty(cls, v):
        for a in ((v,) if isinstance(v, str) else v):
            if not a.strip():
                raise ValueError("expected non-empty expected answers, found an empty string")
        return v


def read(path: Union[str, pathlib.Path]) -> List[UserPrompt]:
    """Every prompt of a JSONL file, checked (blank lines are skipped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: expected a JSONL file of prompts, found none")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise PromptFileError(f"{path}: expected at most {MAX_FILE_BYTES >> 20} MiB, found {size} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: expected UTF-8 text: {exc}") from None
    out: List[UserPrompt] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{no}: expected a JSON object, found invalid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise PromptFileError(f"{path}:{no}: expected a JSON object, found {type(data).__name__}")
        try:
            out.append(UserPrompt.model_validate(data))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "line"
            raise PromptFileError(f"{path}:{no}: {where}: {err['msg']}") from None
        if len(out) > MAX_PROMPTS:
            raise PromptFileError(f"{path}: expected at most {MAX_PROMPTS} prompts")
    if not out:
        raise PromptFileError(f"{path}: expected at least one prompt, found none")
    return out


def build(p: UserPrompt, tokenizer) -> Prompt:
    """The prompt as the built-in tasks are built: context (prefilled) and tail (decoded through the tier)."""
    pre, post = _template(tokenizer)
    context = _ids(tokenizer, pre + p.prompt)
    tail = _ids(tokenizer, ("\n\n" + p.question if p.question else "") + post + p.answer_prefix)
    if not tail:
        tail, context = context[-1:], context[:-1]
    if not context:
        raise PromptFileError(f"prompt {p.prompt[:40]!r}: expected more than one token")
    return Prompt(p.task, len(context) + len(tail), context, tail, p.answers, p.max_new_tokens)


def _first_line(answer: str) -> str:
    for line in answer.splitlines():
        if line.strip():
            return line
    return ""


def score(answer: str, expected: Sequence[str], rule: Scoring) -> float:
    """The answer's score in [0, 1] under `rule` (see the module's docstring)."""
    if not expected:
        raise ValueError("score: expected at least one reference answer, found none")
    rule = Scoring(rule)
    if rule is Scoring.EXACT:
        got = answer.strip().lower()
        return float(any(got == e.strip().lower() for e in expected))
    text = answer.lower() if rule is Scoring.CONTAINS else _first_line(answer).lower()
    if rule is Scoring.CONTAINS:
        return sum(e.lower() in text for e in expected) / len(expected)
    return sum(re.search(r"(?<!\w)" + re.escape(e.strip().lower()) + r"(?!\w)", text) is not None
               for e in expected) / len(expected)


__all__ = ["PromptFileError", "Scoring", "UserPrompt", "build", "read", "score"]
