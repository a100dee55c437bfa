"""`kdjax pack`: tokenize and pack a dataset into train/eval token stores."""

from __future__ import annotations

import argparse
import os

from kdjax.distributed import add_distributed_args, initialize_from_args, is_primary

PACK_HELP = """\
Tokenize a dataset with a tokenizer and pack it into fixed-length rows: the token stores
`OUT/train` (and `OUT/eval` with --eval-fraction or --eval-docs) that `kdjax precompute`,
`kdjax train` and `kdjax eval` read. Pack with the teacher's tokenizer: a teacher store is
only computed for a token store packed with its teacher's tokenizer.

  kdjax pack data/*.jsonl --tokenizer TEACHER_DIR --seq-len 2048 --out stores/tokens \\
      --eval-fraction 0.01
  kdjax pack notes.txt --tokenizer TEACHER_DIR --seq-len 512 --out stores/notes

Plain text trains on every token; chat (`messages`) and instruction (prompt/response)
examples train on the assistant's tokens only. A generated dataset (a directory with a
`"kind": "generated"` manifest, from generation) is packed from its token ids, training on
the completions only; pack it with the generator's tokenizer.

--layout examples writes one example per row instead, unpacked (what generation reads):
prompts of --prompt-len tokens (chat: the template with the generation prompt) and, when
the data has them, completions (the response, or the final assistant turn):

  kdjax pack chat.jsonl --tokenizer TEACHER_DIR --out stores/prompts --layout examples \\
      --prompt-len 512 --completion-len 1024 --truncate left

A rerun with the same settings reuses the stores; other settings are refused unless
--overwrite. Multi-process (the same command on every host): add --distributed, or
--num-processes P --process-id I --coordinator-address HOST:PORT; process 0 packs and
the others wait for it."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pack", help="tokenize + pack a dataset into token stores",
                              description=PACK_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="+", help="data files (json, jsonl, parquet, csv, txt), "
                   "globs, a directory, or a Hugging Face `datasets` name")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (a model "
                   "directory with tokenizer files: the teacher's)")
    p.add_argument("--out", required=True, help="output directory (gets train/ and eval/)")
    p.add_argument("--layout", choices=("packed", "examples", "preferences"),
                   default="packed",
                   help="packed: documents packed into rows of --seq-len tokens (default); "
                   "examples: one example per row, prompt (+ completion), unpacked; "
                   "preferences: a preference dataset (`kdjax score`) → one prompt per row "
                   "with its K scored candidates (what the ranking objective trains on)")
    p.add_argument("--seq-len", type=int, help="tokens per packed row (L; --layout packed)")
    p.add_argument("--prompt-len", type=int, help="prompt tokens per row (P; --layout "
                   "examples)")
    p.add_argument("--completion-len", type=int, help="completion tokens per row (C; "
                   "--layout examples; longer completions keep their first C tokens; "
                   "default: the longest completion)")
    p.add_argument("--truncate", choices=("left", "drop"), default="left",
                   help="a prompt over --prompt-len tokens: keep its last P tokens (left, "
                   "default) or drop the example (--layout examples)")
    p.add_argument("--text-field", help="column holding plain text (default: inferred from "
                   "the column names: text, messages, or a prompt/response pair)")
    p.add_argument("--messages-field", help="column holding chat messages "
                   "([{role, content}, ...]; the tokenizer's chat template is applied)")
    p.add_argument("--prompt-field", help="column holding instruction prompts (with "
                   "--response-field)")
    p.add_argument("--response-field", help="column holding the responses to train on")
    p.add_argument("--split", default="train", help="dataset split to read (default: train)")
    p.add_argument("--format", help="datasets builder (json, parquet, text, csv); "
                   "inferred from file extensions by default")
    p.add_argument("--streaming", action="store_true", help="read the source lazily "
                   "(for datasets larger than memory)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="fraction of documents "
                   "held out into OUT/eval (default: 0, no eval store)")
    p.add_argument("--eval-docs", type=int, help="number of documents held out into OUT/eval "
                   "(instead of --eval-fraction)")
    p.add_argument("--max-docs", type=int, help="use only the first N documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the "
                   "row order (default: 0)")
    p.add_argument("--pack-mode", choices=("split", "pad"), default="split",
                   help="split: fill every row, splitting documents at row ends (default); "
                   "pad: start a new row (padding the current one) rather than split a "
                   "document that fits in one")
    p.add_argument("--shard-rows", type=int, help="rows per shard file (default: chosen "
                   "from the row size)")
    p.add_argument("--num-proc", type=int, help="tokenizer processes (default: all cores "
                   "for >= 20k documents, else 1)")
    p.add_argument("--cache-dir", help="datasets cache directory (default: the Hugging Face "
                   "cache)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store built with different settings")
    add_distributed_args(p)
    p.set_defaults(func=run)
    return p


def _check_layout_args(args) -> None:
    def parser_error(msg):
        raise ValueError(msg)

    if args.layout == "packed":
        if args.seq_len is None:
            parser_error("--seq-len is required (with --layout packed, the default)")
        given = [f for f, v in (("--prompt-len", args.prompt_len),
                                ("--completion-len", args.completion_len)) if v is not None]
    else:
        if args.prompt_len is None:
            parser_error(f"--prompt-len is required with --layout {args.layout}")
        given = [f for f, v in (("--seq-len", args.seq_len),) if v is not None]
        if args.pack_mode != "split":
            given.append("--pack-mode")
    if given:
        parser_error(f"{', '.join(given)} does not apply to --layout {args.layout}")


def run(args) -> int:
    from kdjax.data.build import build_token_store

    _check_layout_args(args)
    initialize_from_args(args)
    source = args.source[0] if len(args.source) == 1 else args.source
    if args.layout == "preferences":
        return _pack_preferences(args, source)
    if args.layout == "examples":
        from kdjax.data.examples import build_example_store

        out = build_example_store(
            source, _tokenizer(args.tokenizer), args.out, prompt_len=args.prompt_len,
            completion_len=args.completion_len, truncate=args.truncate,
            text_field=args.text_field, messages_field=args.messages_field,
            prompt_field=args.prompt_field, response_field=args.response_field,
            split=args.split, format=args.format, streaming=args.streaming,
            eval_fraction=args.eval_fraction, eval_docs=args.eval_docs, max_docs=args.max_docs,
            seed=args.seed, shard_rows=args.shard_rows, num_proc=args.num_proc,
            overwrite=args.overwrite, cache_dir=args.cache_dir)
        if is_primary():
            print("\n".join(example_summary_lines(out)))
        return 0
    out = build_token_store(
        source, _tokenizer(args.tokenizer), args.out, seq_len=args.seq_len,
        text_field=args.text_field, messages_field=args.messages_field,
        prompt_field=args.prompt_field, response_field=args.response_field, split=args.split,
        format=args.format, streaming=args.streaming, eval_fraction=args.eval_fraction,
        eval_docs=args.eval_docs,
        max_docs=args.max_docs, seed=args.seed, pack_mode=args.pack_mode,
        shard_rows=args.shard_rows, num_proc=args.num_proc, overwrite=args.overwrite,
        cache_dir=args.cache_dir)
    if is_primary():  # one summary per job, from the process that wrote the stores
        print("\n".join(summary_lines(out, args.seq_len)))
    return 0


def _pack_preferences(args, source) -> int:
    """A `kdjax score` preference dataset → a preference store `OUT/train`."""
    from kdjax.data.preferences import build_preference_store
    from kdjax.score.dataset import PreferenceDataset

    if not isinstance(source, str):
        raise ValueError("--layout preferences packs one preference dataset directory (the "
                         f"--out of `kdjax score`), got {len(args.source)} sources")
    data = PreferenceDataset(source)
    tokenizer = _tokenizer(args.tokenizer)
    data.check_tokenizer(tokenizer, whose=f"--tokenizer {args.tokenizer}")
    inputs = data.store_inputs()
    inputs["tokenizer"] = tokenizer
    width = args.completion_len or max(
        (len(c) for cands in inputs["candidates"] for c in cands), default=1)
    out = build_preference_store(
        os.path.join(args.out, "train"), **inputs, prompt_len=args.prompt_len,
        completion_len=width, truncate=args.truncate, shard_rows=args.shard_rows,
        overwrite=args.overwrite)
    if is_primary():
        counts = ", ".join(f"{k} {v}" for k, v in out.items()
                           if k not in ("path", "rows", "fingerprint", "num_examples") and v)
        print(f"preference store {out['path']}: {out['rows']} prompts of "
              f"{out['num_examples']} (P={args.prompt_len}, C={width})"
              + (f"; {counts}" if counts else ""))
    return 0


def _tokenizer(name: str):
    """The tokenizer of a local directory, else of a hub name (from the local cache when
    offline), with a one-line error naming what was given when neither works."""
    import os

    from kdjax.models import load_tokenizer

    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return load_tokenizer(os.path.expanduser(name))  # says what the directory lacks
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(f"--tokenizer {name!r} is neither a local directory nor a "
                                "tokenizer the Hugging Face hub (or its cache) could provide; "
                                "pass the directory of the teacher's tokenizer") from e


def summary_lines(out: dict, seq_len: int) -> list[str]:
    """The human summary of a `build_token_store` result."""
    lines = []
    for name in ("train", "eval"):
        if name in out:
            s = out[name]
            lines.append(f"{name}: {s['rows']} rows × {seq_len} tokens, {s['tokens']} tokens "
                         f"({100 * s['fill']:.1f}% filled) → {s['path']} "
                         f"(data {s['fingerprint'][:12]})")
    lines.append(f"packed in {out['seconds']:.1f}s")
    return lines


def example_summary_lines(out: dict) -> list[str]:
    """The human summary of a `build_example_store` result."""
    lines = []
    c = out["completion_len"]
    for name in ("train", "eval"):
        if name in out:
            s = out[name]
            width = f"prompt {out['prompt_len']}" + (f" + completion {c}" if c else "")
            lines.append(f"{name}: {s['rows']} examples of {s['num_examples']} ({width} "
                         f"tokens per row), {s['prompt_tokens']} prompt + "
                         f"{s['completion_tokens']} completion tokens → {s['path']} "
                         f"(data {s['fingerprint'][:12]})")
            lines.append(f"  prompts: {s['truncated_prompts']} truncated (left), "
                         f"{s['dropped_long_prompts']} dropped (too long), "
                         f"{s['dropped_empty_prompts']} dropped (empty); completions: "
                         f"{s['truncated_completions']} truncated")
    lines.append(f"written in {out['seconds']:.1f}s")
    return lines
