"""Tokenization of text, instruction and chat examples into documents.

A document is `ids [n] int` plus `train [n] bool`: whether token i is a training target
(predicting it contributes to the loss). Plain text trains on every token. Chat and
instruction examples train only on assistant turns: with the tokenizer's chat template
when it has one (the region an assistant turn adds, after the generation prompt,
including its end-of-turn tokens), else a plain `role: content` layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kdjax.storage import fingerprint_json

_PAIRS = (("prompt", "response"), ("instruction", "output"), ("question", "answer"),
          ("prompt", "completion"))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex identifying a Hugging Face tokenizer: its full backend definition
    (vocab, merges, normalizer, added tokens), special token ids and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return fingerprint_json({
        "backend_sha256": hashlib.sha256(body.encode()).hexdigest(),
        "size": len(tokenizer),
        "special": {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")},
        "chat_template": getattr(tokenizer, "chat_template", None),
    })


@dataclass(frozen=True)
class Fields:
    """Which columns hold the example. Exactly one of: `text`; `messages` (a list of
    {"role", "content"}); `prompt` + `response` (an instruction pair)."""

    text: str | None = None
    messages: str | None = None
    prompt: str | None = None
    response: str | None = None

    def kind(self) -> str:
        kinds = [k for k, on in (("text", self.text), ("messages", self.messages),
                                 ("pair", self.prompt or self.response)) if on]
        if len(kinds) != 1 or (kinds == ["pair"] and not (self.prompt and self.response)):
            raise ValueError(f"give exactly one of text_field, messages_field, or "
                             f"prompt_field + response_field; got {self}")
        return kinds[0]

    @staticmethod
    def infer(columns) -> Fields:
        """Fields from the column names: messages, text, or a known prompt/response pair."""
        cols = set(columns)
        if "messages" in cols:
            return Fields(messages="messages")
        if "text" in cols:
            return Fields(text="text")
        for p, r in _PAIRS:
            if p in cols and r in cols:
                return Fields(prompt=p, response=r)
        raise ValueError(f"cannot tell which column holds the text among {sorted(cols)}; pass "
                         "text_field=, messages_field=, or prompt_field= and response_field=")


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _chat_text(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text and the [start, end) character regions to train on."""
    if not getattr(tokenizer, "chat_template", None):
        text, regions = "", []
        for m in messages:
            head = f"{m['role']}: "
            start = len(text) + len(head)
            text += head + m["content"] + "\n"
            if m["role"] == "assistant":
                regions.append((start, len(text)))
        return text, regions
    full, regions, cursor = _render(tokenizer, messages), [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[:i + 1])
        if full.startswith(upto) and upto.startswith(prompt) and len(prompt) >= cursor:
            regions.append((len(prompt), len(upto)))
        else:  # template is not prefix-stable (e.g. it rewrites earlier turns)
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ValueError(f"assistant turn {i} is not found in the chat template's "
                                 "rendering; use a template that keeps message contents")
            regions.append((start, start + len(m["content"])))
        cursor = regions[-1][1]
    return full, regions


def encode_chat(tokenizer, messages) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n] int32, train [n] bool) for a conversation; train marks assistant tokens."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
    text, regions = _chat_text(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    spans = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    train = np.zeros(len(ids), bool)
    for a, b in regions:  # a token that overlaps an assistant region is trained
        train |= (spans[:, 0] < b) & (spans[:, 1] > a)
    if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        ids, train = np.append(ids, np.int32(tokenizer.eos_token_id)), np.append(train, True)
    return ids, train


def encode_texts(tokenizer, texts) -> list[np.ndarray]:
    """Token ids of plain-text documents (the tokenizer's own special tokens, plus EOS at
    the end when the tokenizer has one, so packed documents are delimited)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        ids = np.asarray(ids, np.int32)
        if eos is not None and (len(ids) == 0 or ids[-1] != eos):
            ids = np.append(ids, np.int32(eos))
        out.append(ids)
    return out


def encode_batch(batch: dict, tokenizer, fields: Fields) -> dict:
    """`datasets.map(batched=True)` function: columns → `ids`, `train`, `length`."""
    kind = fields.kind()
    if kind == "text":
        ids = encode_texts(tokenizer, batch[fields.text])
        train = [np.ones(len(x), bool) for x in ids]
    else:
        if kind == "messages":
            convs = batch[fields.messages]
        else:
            convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(batch[fields.prompt], batch[fields.response])]
        pairs = [encode_chat(tokenizer, c) for c in convs]
        ids, train = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"ids": ids, "train": train, "length": [len(x) for x in ids]}


def column_names(ds) -> list[str]:
    """Column names of a Dataset or IterableDataset (a stream whose features are unknown,
    e.g. streamed text files, is peeked at: its first example's keys)."""
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)
    return list(first) if first is not None else []


def tokenize_dataset(ds, tokenizer, fields: Fields | None = None, *, num_proc: int | None = None,
                     batch_size: int = 512):
    """Tokenizes a `datasets` Dataset/IterableDataset into documents (columns `ids`,
    `train`, `length`). `num_proc` > 1 tokenizes in parallel processes (Dataset only)."""
    import datasets

    columns = column_names(ds)
    fields = fields or Fields.infer(columns)
    fields.kind()
    features = datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                                  "train": datasets.List(datasets.Value("bool")),
                                  "length": datasets.Value("int64")})
    kw = dict(batched=True, batch_size=batch_size, fn_kwargs={"tokenizer": tokenizer,
              "fields": fields}, remove_columns=columns, features=features)
    if isinstance(ds, datasets.Dataset):
        kw.update(num_proc=num_proc if num_proc and num_proc > 1 else None,
                  desc="tokenizing")
    return ds.map(encode_batch, **kw)
