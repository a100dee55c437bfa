"""The teacher as a judge: a grading request per candidate, and the grade tokens.

The request is the template's `user` text with {prompt}, {answer}, {min_grade} and
{max_grade} filled in, wrapped in the judge tokenizer's chat template as the user turn
(with the generation prompt) when it has one, followed by `response_prefix`: the judge's
reply so far, after which its next token is the grade. The score is the expected grade
under that next-token distribution restricted to the grade tokens,

    score = Σ_g g · P(g) / Σ_g P(g),

read off one forward pass: no sampling noise (as G-Eval's probability-weighted score,
Liu et al. 2023, without sampling). `grade_mass` = Σ_g P(g) says how much of the judge's
mass fell on a grade at all (a low mass: the template does not make it answer with one).

Each grade must be one token following the request: the grade's text is appended to the
request text and tokenized; the request's own tokens must come out unchanged and exactly
one token must follow. Tokenizers that fold a space into the digit (GPT-2's " 7") fail
this when `response_prefix` ends with a space; then the space moves from the prefix to the
grade token (" 7"), the same text either way. A grade of several tokens ("10" in most
tokenizers) is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
from collections.abc import Sequence

import yaml

from kdjax.schema import ConfigError

# The shipped default, identical to configs/score/judge_template.yaml (a test checks it).
DEFAULT_TEMPLATE = """\
user: |
  Please act as an impartial judge and evaluate the answer that an AI assistant gave to
  the question below. Consider whether it is correct, helpful, relevant and complete.

  [Question]
  {prompt}

  [Answer]
  {answer}

  Rate the answer on a scale from {min_grade} (very poor) to {max_grade} (excellent).
  Reply with the grade only.
response_prefix: "Grade: "
"""
FIELDS = ("prompt", "answer", "min_grade", "max_grade")


@dataclasses.dataclass(frozen=True)
class Template:
    user: str
    response_prefix: str
    sha256: str


def load_template(path: str | None) -> Template:
    """The template of YAML file `path` (None: the default), checked."""
    where = "the default judge template" if path is None else f"judge.template {path!r}"
    if path is None:
        text = DEFAULT_TEMPLATE
    else:
        with open(path) as f:
            text = f.read()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not isinstance(data.get("user"), str) or not isinstance(
            data.get("response_prefix", ""), str):
        raise ConfigError(f"{where} must be a mapping with a `user` text and an optional "
                          "`response_prefix` text (see configs/score/judge_template.yaml)")
    unknown = sorted(set(data) - {"user", "response_prefix"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; it takes user and "
                          "response_prefix")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(data["user"]) if f is not None}
    except ValueError as e:
        raise ConfigError(f"{where}: bad placeholder in `user` ({e}); write literal braces "
                          "as {{ and }}") from None
    if names - set(FIELDS) or not {"prompt", "answer"} <= names:
        raise ConfigError(f"{where}: `user` must use {{prompt}} and {{answer}} and may use "
                          f"{{min_grade}}, {{max_grade}}; it uses {sorted(names)} (write "
                          "literal braces as {{ and }})")
    user, prefix = data["user"], data.get("response_prefix", "")
    return Template(user, prefix, hashlib.sha256(json.dumps([user, prefix]).encode()).hexdigest())


def request_text(template: Template, tokenizer, question: str, answer: str,
                 grades: Sequence[int], chat: bool) -> str:
    """The judge's input text up to (not including) the grade."""
    user = template.user.format(prompt=question, answer=answer, min_grade=min(grades),
                                max_grade=max(grades))
    if chat:
        user = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                             tokenize=False, add_generation_prompt=True)
    return user + template.response_prefix


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    # a chat rendering holds its own special tokens; plain text gets the tokenizer's
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def uses_chat(tokenizer, chat: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has:
        raise ConfigError("judge.chat: the judge's tokenizer has no chat template; set "
                          "judge.chat=false (plain-text requests) or null")
    return has if chat is None else chat


@dataclasses.dataclass(frozen=True)
class Grades:
    """The grade tokens and how a request is cut before them."""

    grades: tuple[int, ...]
    token_ids: tuple[int, ...]
    strip_space: bool
    """The request loses its final space (it is part of the grade tokens)."""

    def condition(self, text: str) -> str:
        return text[:-1] if self.strip_space else text


def grade_tokens(tokenizer, text: str, grades: Sequence[int], chat: bool) -> Grades:
    """The one-token ids of `grades` after request `text` (see the module docstring)."""
    variants = [False] + ([True] if text.endswith(" ") else [])
    problems = []
    for strip in variants:
        base = text[:-1] if strip else text
        head = encode(tokenizer, base, chat)
        ids, bad = [], []
        for g in grades:
            full = encode(tokenizer, text + str(g), chat)
            if full[:len(head)] != head or len(full) != len(head) + 1:
                bad.append(f"{g!r} → {tokenizer.convert_ids_to_tokens(full[len(head) - 1:])}")
            else:
                ids.append(full[-1])
        if not bad:
            return Grades(tuple(grades), tuple(int(i) for i in ids), strip)
        problems.append(bad)
    raise ConfigError(
        f"judge.grades: the grades {list(grades)} are not each one token after the "
        f"response prefix {text[-12:]!r} for this tokenizer (the last request token and what "
        f"follows: {'; '.join(min(problems, key=len))}); the expected grade needs one token "
        "per grade: use single-digit grades (judge.grades=[1,2,3,4,5,6,7,8,9]) or change "
        "the template's response_prefix")


def build_requests(tokenizer, template: Template, items: Sequence[tuple[str, str]],
                   grades: Sequence[int], chat: bool | None) -> tuple[Grades, list[list[int]]]:
    """The grade tokens and the token ids of each (question, answer) request, cut before
    the grade (`Grades.condition`)."""
    chat = uses_chat(tokenizer, chat)
    texts = [request_text(template, tokenizer, q, a, grades, chat) for q, a in items]
    probe = texts[0] if texts else request_text(template, tokenizer, "", "", grades, chat)
    found = grade_tokens(tokenizer, probe, grades, chat)
    if not texts:
        return found, []
    cut = [found.condition(t) for t in texts]
    ids = [list(x) for x in tokenizer(cut, add_special_tokens=not chat)["input_ids"]]
    last = encode(tokenizer, cut[0], chat)[-1]
    for i, x in enumerate(ids):
        if x[-1] != last:  # the answer ran into the prefix (a template with no text after it)
            raise ConfigError(f"judge.template: request {i} does not end with the response "
                              f"prefix's tokens; end the `user` text with fixed text after "
                              "{answer}")
    return found, ids


def expected_grade(grade_logprobs, grades: Sequence[int]):
    """(score, mass) per row of `grade_logprobs` `[N, G]` (the judge's log-probs of the
    grade tokens, full-vocabulary softmax), in float64: the expectation of the grade under
    the distribution restricted to the grades, and Σ_g P(g)."""
    import numpy as np

    lp = np.asarray(grade_logprobs, np.float64)
    top = lp.max(axis=1, keepdims=True)
    w = np.exp(lp - top)  # restricted softmax, stable even if every P(g) underflows
    p = w / w.sum(axis=1, keepdims=True)
    return p @ np.asarray(grades, np.float64), np.exp(lp).sum(axis=1)
