"""Example stores: one example per row, unpacked (`kdjax pack --layout examples`).

What generates reads: row i holds one example, `prompt [P]` left-aligned and
right-padded (with the tokenizer's pad id, else 0) with its length `prompt_len`, and,
when the source has completions, `completion [C]` (right-padded the same way) with
`completion_len`; `example_id` is the example's index in the source order (before any
example is dropped or held out), so generated outputs can be joined back to the source.

Prompts and completions, by source columns (`Fields`; inferred like the token store's,
plus a lone `prompt` column):
- chat `messages`: when the conversation ends with an assistant turn, that turn is the
  completion and the turns before it are the prompt; otherwise the whole conversation
  is the prompt and the example has no completion (completion_len 0). With a chat
  template the prompt is `apply_chat_template(prompt_turns, add_generation_prompt=True)`
  and the completion is what the template adds for the assistant turn after that (its
  content and end-of-turn tokens: the tokens the packed layout trains on); without one,
  `role: content` lines ending in `assistant:` and the completion ` content` + newline +
  EOS (as `tokenize.encode_chat` lays them out).
- a prompt/response pair: the conversation [user: prompt, assistant: response]; a prompt
  column alone: [user: prompt], no completion.
- plain `text`: the text is the prompt (with the tokenizer's own special tokens, no
  EOS), no completion.

Prompts longer than P keep their last P tokens (`truncate="left"`) or drop the example
(`truncate="drop"`); completions longer than C keep their first C tokens. An example
whose prompt is empty is dropped. All of these are counted in the manifest.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from kdjax.data.tokenize import Fields, column_names, tokenizer_fingerprint
from kdjax.distributed import primary_writes
from kdjax.storage import (
    RowStore,
    RowStoreWriter,
    StoreMismatchError,
    fingerprint_json,
)

KIND = "kdjax.example_store"
ROW_LAYOUT = "examples"
TRUNCATE = ("left", "drop")
COUNTS = ("num_examples", "dropped_empty_prompts", "dropped_long_prompts",
          "truncated_prompts", "truncated_completions", "prompt_tokens", "completion_tokens")


def example_arrays(prompt_len: int, completion_len: int | None) -> dict:
    """{name: (row shape, dtype)} of an example store (no completion arrays when
    `completion_len` is None)."""
    arrays = {"prompt": ((prompt_len,), np.dtype(np.int32)),
              "prompt_len": ((), np.dtype(np.int32)),
              "example_id": ((), np.dtype(np.int64))}
    if completion_len is not None:
        arrays.update(completion=((completion_len,), np.dtype(np.int32)),
                      completion_len=((), np.dtype(np.int32)))
    return arrays


def example_fields(columns, given: Fields | None = None) -> Fields:
    """The columns holding the examples: `given` when set (a prompt field may come without
    a response field), else inferred from the column names."""
    if given is not None and given != Fields():
        if given.response and not given.prompt:
            raise ValueError("response_field needs prompt_field")
        if sum(map(bool, (given.text, given.messages, given.prompt))) != 1:
            raise ValueError("give exactly one of text_field, messages_field or "
                             f"prompt_field (+ response_field); got {given}")
        return given
    try:
        return Fields.infer(columns)
    except ValueError:
        if "prompt" in set(columns):
            return Fields(prompt="prompt")
        raise


def split_conversation(messages) -> tuple[list, dict | None]:
    """(prompt turns, completion turn or None): the final turn is the completion when it
    is an assistant turn."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
    if messages and messages[-1]["role"] == "assistant":
        return list(messages[:-1]), messages[-1]
    return list(messages), None


def _ids(tokenizer, text: str, special: bool = False) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=special)["input_ids"], np.int32)


def encode_example(tokenizer, messages) -> tuple[np.ndarray, np.ndarray | None]:
    """(prompt ids [p] int32, completion ids [c] int32 or None) of a conversation."""
    prompt, last = split_conversation(messages)
    if not getattr(tokenizer, "chat_template", None):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt)
        prompt_ids = _ids(tokenizer, text + "assistant:") if prompt else _ids(tokenizer, "")
        if last is None:
            return prompt_ids, None
        done = _ids(tokenizer, " " + last["content"] + "\n")
        if tokenizer.eos_token_id is not None:
            done = np.append(done, np.int32(tokenizer.eos_token_id))
        return prompt_ids, done
    if not prompt:  # nothing to prompt with: an empty prompt (the example is dropped)
        text = ""
    else:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if last is None:
        return _ids(tokenizer, text), None
    full = tokenizer.apply_chat_template([*prompt, last], tokenize=False)
    if text and full.startswith(text):
        return _ids(tokenizer, text), _ids(tokenizer, full[len(text):])
    # a template that is not prefix-stable: the content, then EOS
    done = _ids(tokenizer, last["content"])
    if tokenizer.eos_token_id is not None:
        done = np.append(done, np.int32(tokenizer.eos_token_id))
    return _ids(tokenizer, text), done


def encode_examples_batch(batch: dict, tokenizer, fields: Fields) -> dict:
    """`datasets.map(batched=True)` function: columns → `prompt_ids`, `completion_ids`,
    `has_completion`."""
    if fields.text:
        prompts = [np.asarray(i, np.int32) for i in
                   tokenizer(list(batch[fields.text]), add_special_tokens=True)["input_ids"]]
        return {"prompt_ids": prompts,
                "completion_ids": [np.zeros(0, np.int32) for _ in prompts],
                "has_completion": [False] * len(prompts)}
    if fields.messages:
        convs = batch[fields.messages]
    elif fields.response:
        convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                 for p, r in zip(batch[fields.prompt], batch[fields.response])]
    else:
        convs = [[{"role": "user", "content": p}] for p in batch[fields.prompt]]
    pairs = [encode_example(tokenizer, c) for c in convs]
    return {"prompt_ids": [p for p, _ in pairs],
            "completion_ids": [np.zeros(0, np.int32) if c is None else c for _, c in pairs],
            "has_completion": [c is not None for _, c in pairs]}


def _lengths(ds, column: str) -> np.ndarray:
    if ds._indices is not None:
        ds = ds.flatten_indices()
    chunks = ds.data.column(column).chunks
    return np.concatenate([np.zeros(0, np.int64)] + [
        pc.list_value_length(c).to_numpy(zero_copy_only=False).astype(np.int64)
        for c in chunks])


def fill_examples(prompts, completions, example_ids, *, prompt_len: int,
                  completion_len: int | None, pad_id: int) -> dict[str, np.ndarray]:
    """The stored arrays of some examples: prompts keep their last `prompt_len` tokens,
    completions their first `completion_len`; both right-padded with `pad_id`."""
    n = len(prompts)
    out = {"prompt": np.full((n, prompt_len), pad_id, np.int32),
           "prompt_len": np.zeros(n, np.int32),
           "example_id": np.asarray(example_ids, np.int64)}
    for i, p in enumerate(prompts):
        p = np.asarray(p, np.int32)[-prompt_len:]
        out["prompt"][i, :len(p)], out["prompt_len"][i] = p, len(p)
    if completion_len is not None:
        out["completion"] = np.full((n, completion_len), pad_id, np.int32)
        out["completion_len"] = np.zeros(n, np.int32)
        for i, c in enumerate(completions):
            c = np.asarray(c, np.int32)[:completion_len]
            out["completion"][i, :len(c)], out["completion_len"][i] = c, len(c)
    return out


def _write_split(ex, indices: np.ndarray, path: Path, *, plen: np.ndarray, clen: np.ndarray,
                 prompt_len: int, completion_len: int | None, truncate: str, pad_id: int,
                 vocab_size: int, metadata: dict, shard_rows: int | None, overwrite: bool,
                 progress: bool) -> dict:
    from kdjax.data.token_store import rows_digest

    p, c = plen[indices], clen[indices]
    empty, long = p == 0, p > prompt_len
    keep = ~empty & ~(long & (truncate == "drop"))
    rows = indices[keep]
    if len(rows) == 0:
        raise ValueError(f"split {path.name!r} keeps no example ({len(indices)} in the "
                         f"split: {int(empty.sum())} with an empty prompt, "
                         f"{int((long & ~empty).sum())} with a prompt over {prompt_len} "
                         f"tokens, truncate={truncate!r})")
    counts = {"num_examples": int(len(indices)), "dropped_empty_prompts": int(empty.sum()),
              "dropped_long_prompts": int((long & ~empty).sum()) if truncate == "drop" else 0,
              "truncated_prompts": int(long.sum()) if truncate == "left" else 0,
              "truncated_completions": 0 if completion_len is None else
              int((c[keep] > completion_len).sum()),
              "prompt_tokens": int(np.minimum(p[keep], prompt_len).sum()),
              "completion_tokens": 0 if completion_len is None else
              int(np.minimum(c[keep], completion_len).sum())}
    layout = example_arrays(prompt_len, completion_len)
    row_bytes = 4 * (prompt_len + (completion_len or 0)) + 16
    shard_rows = shard_rows or min(len(rows), max(1, 2**24 // row_bytes))
    meta = {**metadata, "kind": KIND, "row_layout": ROW_LAYOUT, "split": path.name,
            "prompt_len": prompt_len, "completion_len": completion_len, "truncate": truncate,
            "pad_id": pad_id, "vocab_size": vocab_size, "num_examples": int(len(indices))}
    with RowStoreWriter(path, arrays=layout, num_rows=len(rows), shard_rows=shard_rows,
                        metadata=meta, overwrite=overwrite, layout="record") as w:
        for shard in tqdm(w.missing_shards(), desc=f"writing {path.name} examples",
                          unit=" shards", disable=not progress):
            lo, hi = w.shard_range(shard)
            sub = ex.select(rows[lo:hi])[:]
            data = fill_examples(sub["prompt_ids"], sub["completion_ids"], rows[lo:hi],
                                 prompt_len=prompt_len, completion_len=completion_len,
                                 pad_id=pad_id)
            w.write_shard(shard, data, {"digest": f"{rows_digest(data, lo):064x}"})
        digest = sum(int(w.ledger.info(s)["digest"], 16) for s in range(w.num_shards))
        manifest = w.finalize({
            "data_fingerprint": fingerprint_json({
                "row_layout": ROW_LAYOUT, "prompt_len": prompt_len,
                "completion_len": completion_len, "vocab_size": vocab_size,
                "num_rows": len(rows), "rows_digest": f"{digest % (1 << 256):064x}"}),
            "counts": counts})
    return {"path": str(path), "rows": len(rows), **counts,
            "fingerprint": manifest["data_fingerprint"]}


@primary_writes("pack")
def build_example_store(source, tokenizer, out_dir: str | os.PathLike, *, prompt_len: int,
                        completion_len: int | None = None, truncate: str = "left",
                        text_field: str | None = None, messages_field: str | None = None,
                        prompt_field: str | None = None, response_field: str | None = None,
                        split: str = "train", format: str | None = None,
                        streaming: bool = False, eval_fraction: float = 0.0,
                        eval_docs: int | None = None, seed: int = 0,
                        max_docs: int | None = None, shard_rows: int | None = None,
                        num_proc: int | None = None, overwrite: bool = False,
                        cache_dir: str | None = None, progress: bool = True) -> dict:
    """Tokenizes a dataset into example stores `<out_dir>/train` (+ `<out_dir>/eval`).

    Args:
      source, split, format, streaming, max_docs, num_proc, cache_dir, overwrite: as
        `build_token_store`.
      prompt_len: P, the prompt row width.
      completion_len: C, the completion row width; None = the longest completion (no
        completion is truncated). Only for sources with completions.
      truncate: "left" (keep a long prompt's last P tokens) or "drop" (drop the example).
      text_field / messages_field / prompt_field (+ response_field): the columns.
      eval_fraction / eval_docs: held-out examples for the eval store (0 → none).
      shard_rows: rows per shard (default: ~16 MiB shards).

    Returns:
      {"train": {path, rows, fingerprint, num_examples, dropped_empty_prompts,
       dropped_long_prompts, truncated_prompts, truncated_completions, prompt_tokens,
       completion_tokens}, "eval": {...} (if any), "prompt_len", "completion_len",
       "seconds"}.
    """
    import datasets
    from transformers import AutoTokenizer

    from kdjax.data.build import (
        _docs_digest,
        _limit,
        _materialize,
        _num_proc,
        split_indices,
    )
    from kdjax.data.generated import read_generated_manifest
    from kdjax.data.sources import load_source

    t0 = time.perf_counter()
    if prompt_len < 1 or (completion_len is not None and completion_len < 1):
        raise ValueError(f"prompt_len and completion_len must be >= 1, got {prompt_len} "
                         f"and {completion_len}")
    if truncate not in TRUNCATE:
        raise ValueError(f"truncate must be one of {TRUNCATE}, got {truncate!r}")
    if read_generated_manifest(source) is not None:
        raise ValueError(f"{source!r} is a generated dataset; pack it with --layout packed "
                         "(it trains on its completions)")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    ds = _limit(load_source(source, split=split, format=format, streaming=streaming,
                            **({"cache_dir": str(cache_dir)} if cache_dir else {})), max_docs)
    fields = example_fields(column_names(ds), Fields(text_field, messages_field, prompt_field,
                                                     response_field))
    features = datasets.Features({"prompt_ids": datasets.List(datasets.Value("int32")),
                                  "completion_ids": datasets.List(datasets.Value("int32")),
                                  "has_completion": datasets.Value("bool")})
    kw = dict(batched=True, batch_size=512, remove_columns=column_names(ds), features=features,
              fn_kwargs={"tokenizer": tokenizer, "fields": fields})
    if isinstance(ds, datasets.Dataset):
        kw.update(num_proc=(n if (n := _num_proc(ds, num_proc)) and n > 1 else None),
                  desc="tokenizing")
    ex = ds.map(encode_examples_batch, **kw)
    if isinstance(ex, datasets.IterableDataset):
        ex = _materialize(ex, progress, cache_dir and str(cache_dir))
    n = len(ex)
    plen, clen = _lengths(ex, "prompt_ids"), _lengths(ex, "completion_ids")
    has = np.asarray(ex.select_columns(["has_completion"])[:]["has_completion"], bool)
    if completion_len is not None and not has.any():
        raise ValueError("completion_len is set but no example has a completion (a response "
                         "field, or a conversation ending with an assistant turn)")
    if completion_len is None and has.any():
        completion_len = max(1, int(clen.max()))
    splits, n_eval = split_indices(n, eval_fraction, eval_docs, seed, "examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    metadata = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "source_fingerprint": _docs_digest(ex, ("prompt_ids", "completion_ids",
                                                        "has_completion")),
                "source": {"source": [str(s) for s in np.atleast_1d(np.asarray(source, object))],
                           "split": split, "fields": fields.__dict__, "max_docs": max_docs,
                           "eval_docs": n_eval, "seed": seed}}
    out = {name: _write_split(ex, idx, Path(out_dir) / name, plen=plen, clen=clen,
                              prompt_len=prompt_len, completion_len=completion_len,
                              truncate=truncate, pad_id=int(pad_id), vocab_size=len(tokenizer),
                              metadata=metadata, shard_rows=shard_rows, overwrite=overwrite,
                              progress=progress)
           for name, idx in splits.items()}
    out.update(prompt_len=prompt_len, completion_len=completion_len,
               seconds=time.perf_counter() - t0)
    return out


class ExampleStore:
    """A complete example store opened for reading.

    Attributes:
      manifest (dict), path, num_rows, prompt_len (P), completion_len (C, None without
      completions), vocab_size, pad_id, fingerprint (data fingerprint),
      tokenizer_fingerprint.
    """

    def __init__(self, path: str | os.PathLike):
        from kdjax.data.token_store import KIND as TOKEN_KIND

        self._rows = RowStore(path)
        self.path = Path(path)
        self.manifest = self._rows.manifest
        kind = self.manifest.get("kind")
        if kind == TOKEN_KIND:
            raise StoreMismatchError(
                f"{str(path)!r} is a token store (layout packed: rows of packed documents, "
                "`kdjax pack --layout packed`), not an example store (layout examples: one "
                "example per row); pack the data with `kdjax pack --layout examples`")
        if kind != KIND:
            raise StoreMismatchError(f"{str(path)!r} is not an example store (kind {kind!r}); "
                                     "pass a store written by `kdjax pack --layout examples`")
        m = self.manifest
        self.num_rows = int(m["num_rows"])
        self.prompt_len = int(m["prompt_len"])
        self.completion_len = None if m["completion_len"] is None else int(m["completion_len"])
        self.vocab_size, self.pad_id = int(m["vocab_size"]), int(m["pad_id"])
        self.fingerprint = str(m["data_fingerprint"])
        self.tokenizer_fingerprint = str(m["tokenizer_fingerprint"])

    @property
    def has_completions(self) -> bool:
        return self.completion_len is not None

    def read(self, rows) -> dict[str, np.ndarray]:
        """Rows as `{prompt [n, P], prompt_len [n], example_id [n]}` (+ `completion
        [n, C]`, `completion_len [n]`); ids and lengths int32, example_id int64."""
        return self._rows.read(rows)

    def check(self) -> list[str]:
        """Reads every chunk; one message per damaged chunk (empty when intact)."""
        return self._rows.check()

    def check_tokenizer(self, tokenizer, *, whose: str = "the run's") -> None:
        """Raises StoreMismatchError unless `tokenizer` (a HF tokenizer or a fingerprint
        string) is the one the examples were tokenized with."""
        fp = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
        if fp != self.tokenizer_fingerprint:
            raise StoreMismatchError(
                f"example store {str(self.path)!r} was tokenized with another tokenizer than "
                f"{whose}: tokenizer fingerprint {self.tokenizer_fingerprint[:16]}… (the "
                f"store's) vs {fp[:16]}… ({whose}). Re-pack the examples with this tokenizer")

    def __repr__(self) -> str:
        return (f"ExampleStore({str(self.path)!r}, rows={self.num_rows}, "
                f"prompt_len={self.prompt_len}, completion_len={self.completion_len}, "
                f"data={self.fingerprint[:12]})")


def open_example_store(path: str | os.PathLike, split: str | None = None) -> ExampleStore:
    """Opens an example store: `path` itself, or (with `split`, e.g. "train") the output
    directory of `kdjax pack --layout examples`."""
    from kdjax.data.token_store import split_dir

    return ExampleStore(split_dir(path, split, "open_example_store"))
