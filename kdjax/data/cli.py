"""`kdjax pack`: tokenize and pack a dataset into train/eval token stores.

Example:
  kdjax pack data/*.jsonl --tokenizer path/to/tokenizer --seq-len 2048 --out stores/tokens \
      --eval-fraction 0.01

Multi-process (the same command on every host, e.g. a TPU pod's): add `--distributed`, or
`--num-processes P --process-id I --coordinator-address HOST:PORT`. Process 0 packs the
shared stores; the others wait for it and end with the same summary.
"""

from __future__ import annotations

import argparse

from kdjax.distributed import add_distributed_args, initialize_from_args, is_primary


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pack", help="tokenize + pack a dataset into a token store",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="+", help="data files / globs / directory, or a "
                   "datasets name")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub name")
    p.add_argument("--out", required=True, help="output directory (gets train/ and eval/)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--text-field")
    p.add_argument("--messages-field")
    p.add_argument("--prompt-field")
    p.add_argument("--response-field")
    p.add_argument("--split", default="train", help="dataset split to read")
    p.add_argument("--format", help="datasets builder (json, parquet, text, csv); "
                   "inferred from file extensions by default")
    p.add_argument("--streaming", action="store_true", help="read the source lazily")
    p.add_argument("--eval-fraction", type=float, default=0.0)
    p.add_argument("--eval-docs", type=int)
    p.add_argument("--max-docs", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pack-mode", choices=("split", "pad"), default="split")
    p.add_argument("--shard-rows", type=int)
    p.add_argument("--num-proc", type=int, help="tokenizer processes")
    p.add_argument("--cache-dir", help="datasets cache directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing store built with different settings")
    add_distributed_args(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from kdjax.data.build import build_token_store

    initialize_from_args(args)
    source = args.source[0] if len(args.source) == 1 else args.source
    out = build_token_store(
        source, args.tokenizer, args.out, seq_len=args.seq_len, text_field=args.text_field,
        messages_field=args.messages_field, prompt_field=args.prompt_field,
        response_field=args.response_field, split=args.split, format=args.format,
        streaming=args.streaming, eval_fraction=args.eval_fraction, eval_docs=args.eval_docs,
        max_docs=args.max_docs, seed=args.seed, pack_mode=args.pack_mode,
        shard_rows=args.shard_rows, num_proc=args.num_proc, overwrite=args.overwrite,
        cache_dir=args.cache_dir)
    if is_primary():  # one summary per job, from the process that wrote the stores
        print("\n".join(summary_lines(out, args.seq_len)))
    return 0


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
