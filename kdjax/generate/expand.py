"""Instruction expansion (Self-Instruct, Wang et al. 2023; Alpaca): grow new instructions
from a small seed file with the model itself, then answer them.

Each round builds `batch_size` few-shot prompts, each showing `few_shot` instructions
drawn from the pool (seeds and the instructions accepted so far), and asks the model for
one new instruction. A proposal is kept when it parses to one line of `min_words` to
`max_words` words and its word-bigram Jaccard similarity to every instruction of the pool
stays below `max_overlap` (Self-Instruct drops ROUGE-L ≥ 0.7; bigram Jaccard is the same
idea, cheaper). Rounds stop at `num_instructions` or `max_rounds`. Draws use keys of
(seed, round, slot), so the instruction list is a pure function of the settings; it is
written to `<out>/instructions.jsonl` (atomically) and reused by a rerun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from kdjax.generate.curate import jaccard, ngrams
from kdjax.generate.sample import generate_records
from kdjax.storage.fingerprint import fingerprint_json
from kdjax.storage.manifest import atomic_path

INSTRUCTIONS_FILE = "instructions.jsonl"
_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):-]|[-*•])\s*")
_ROUND_DOMAIN = 1 << 31  # proposal keys use example ids ≥ 2³¹, answers use 0, 1, …


def read_seeds(path: str | os.PathLike) -> list[str]:
    """Seed instructions from a .txt file (one per non-empty line) or .jsonl (field
    `instruction`, else `prompt`)."""
    path = Path(path)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines):
            obj = json.loads(line)
            text = obj.get("instruction") or obj.get("prompt")
            if not text:
                raise ValueError(f"{path}:{i + 1}: a seed needs an `instruction` field")
            out.append(str(text).strip())
        lines = out
    if not lines:
        raise ValueError(f"seed file {str(path)!r} holds no instruction")
    return lines


def parse_instruction(text: str) -> str | None:
    """The first non-empty line without list numbering or quotes, or None."""
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip().strip('"').strip()
        if line:
            return line
    return None


def expansion_prompt(examples: list[str], tokenizer) -> str:
    """The few-shot request for one new instruction (chat-templated when the tokenizer
    has a chat template)."""
    listed = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(examples))
    ask = (f"Here are some task instructions:\n{listed}\n\nWrite one new task instruction "
           "that is different from all of them. Reply with the instruction only.")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": ask}],
                                             tokenize=False, add_generation_prompt=True)
    return f"{ask}\n{len(examples) + 1}."


def answer_prompt(instruction: str, tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)
    return f"user: {instruction}\nassistant:"


def _encode(texts: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.full((len(ids), width), pad, np.int32)
    for r, i in enumerate(ids):
        out[r, :len(i)] = i
    return out, np.asarray([len(i) for i in ids], np.int32)


def grow_instructions(config, gen) -> tuple[list[str], dict]:
    """(new instructions, counts of proposals and of each drop reason)."""
    ex = config.expand
    seeds = read_seeds(ex.seed_file)
    pool, new = list(seeds), []
    pool_grams = [ngrams(s, 2) for s in pool]
    counts = {"proposed": 0, "accepted": 0, "unparsed": 0, "length": 0, "near_duplicate": 0}
    propose = dataclasses.replace(config, n=1, stop=["\n"], temperature=ex.temperature)
    for r in range(ex.max_rounds):
        if len(new) >= ex.num_instructions:
            break
        rng = np.random.default_rng([config.seed, r])
        texts = [expansion_prompt([pool[i] for i in rng.choice(
            len(pool), size=min(ex.few_shot, len(pool)), replace=False)], gen.tokenizer)
            for _ in range(config.batch_size)]
        prompts, lens = _encode(texts, gen.tokenizer)
        ids = _ROUND_DOMAIN + r * config.batch_size + np.arange(config.batch_size)
        records = generate_records(gen, propose, prompts, lens, ids, texts,
                                   max_new_tokens=ex.instruction_tokens)
        for rec in records:
            counts["proposed"] += 1
            text = parse_instruction(rec["completion"])
            if text is None:
                counts["unparsed"] += 1
                continue
            if not ex.min_words <= len(text.split()) <= ex.max_words:
                counts["length"] += 1
                continue
            grams = ngrams(text, 2)
            if any(jaccard(grams, g) >= ex.max_overlap for g in pool_grams):
                counts["near_duplicate"] += 1
                continue
            pool.append(text)
            pool_grams.append(grams)
            new.append(text)
            counts["accepted"] += 1
            if len(new) >= ex.num_instructions:
                break
    counts["rounds"] = r + 1
    return new, counts


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def load_or_grow(config, gen) -> tuple[list[str], dict]:
    """The instruction list of this plan: read from `<out>/instructions.jsonl` when a
    previous run of the same plan wrote it, else grown and written."""
    path = Path(config.out) / INSTRUCTIONS_FILE
    key = fingerprint_json({"expand": dataclasses.asdict(config.expand), "seed": config.seed,
                            "batch_size": config.batch_size, "model": gen.model_fingerprint,
                            "seeds": read_seeds(config.expand.seed_file)})
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line]
        if rows and rows[0].get("plan") == key:
            return [r["instruction"] for r in rows[1:]], rows[0]["counts"]
    new, counts = grow_instructions(config, gen)
    _write_jsonl_atomic(path, [{"plan": key, "counts": counts}]
                        + [{"instruction": t} for t in new])
    return new, counts


class _InstructionSource:
    """Prompts (chat-templated instructions) for the answering pass."""

    extra_columns = ("instruction",)

    def __init__(self, instructions: list[str], tokenizer, counts: dict):
        self.instructions = instructions
        self.texts = [answer_prompt(t, tokenizer) for t in instructions]
        self.prompt, self.prompt_len = _encode(self.texts, tokenizer)
        self.num_rows = len(instructions)
        self.fingerprint = fingerprint_json(instructions)
        self.counts = counts

    def read(self, rows):
        rows = np.asarray(rows)
        return {"prompt": self.prompt[rows], "prompt_len": self.prompt_len[rows],
                "example_id": rows.astype(np.int64),
                "prompt_text": [self.texts[i] for i in rows],
                "instruction": [self.instructions[i] for i in rows]}


def expansion_source(config, gen) -> _InstructionSource:
    """The answering pass's prompts: the grown instructions (and the seeds with
    `answer_seeds`)."""
    new, counts = load_or_grow(config, gen)
    if not new and not config.expand.answer_seeds:
        raise ValueError(f"expansion accepted no instruction in {counts['rounds']} rounds "
                         f"({counts}); raise expand.max_rounds or expand.temperature, or "
                         "relax expand.max_overlap")
    seeds = read_seeds(config.expand.seed_file) if config.expand.answer_seeds else []
    return _InstructionSource(seeds + new, gen.tokenizer, counts)
