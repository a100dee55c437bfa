"""`kdjax generate`: a model completes the prompts of an example store, n times each, into
a generated dataset (labeling / SeqKD, Kim & Rush 2016), then curates it.

Work is cut into shards of `shard_examples` examples. Within a shard the (example,
sample) sequences are grouped by prompt-length bucket and generated `batch_size` at a
time, each from its own key fold_in(fold_in(key(seed), example_id), sample_index): the
records depend on the plan and the example only, never on batching, devices or hosts,
so a rerun after a crash redoes the missing shards and ends with the same bytes. Every
process runs the same batches (the model is sharded over the global mesh); process 0
writes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from kdjax.generate.config import GenerateConfig
from kdjax.generate.curate import write_curated
from kdjax.generate.dataset import FINISH_REASONS, GeneratedDataset, GeneratedWriter
from kdjax.generate.sample import Generator, generate_records, load_generator


def plan_of(config: GenerateConfig, gen: Generator, source_fingerprint: str) -> dict:
    """Everything the records depend on (a rerun resumes only with the same plan)."""
    keep = ("mode", "n", "max_new_tokens", "temperature", "top_k", "top_p", "stop",
            "stop_token_ids", "seed", "shard_examples", "dtype")
    plan = {k: getattr(config, k) for k in keep}
    plan.update(model_fingerprint=gen.model_fingerprint,
                tokenizer_fingerprint=gen.tokenizer_fingerprint,
                source_fingerprint=source_fingerprint, param_dtype=config.param_dtype)
    if config.mode == "expand":
        plan["expand"] = dataclasses.asdict(config.expand)
    return plan


def run_generate(config: GenerateConfig, *, gen: Generator | None = None,
                 on_shard=None) -> dict:
    """Runs (or resumes) `kdjax generate`; returns its summary dict. `on_shard(shard,
    shards done this run)` is called after each shard is committed."""
    from tqdm.auto import tqdm

    from kdjax.data import open_example_store
    from kdjax.distributed import is_primary

    config.check_paths()
    gen = gen or load_generator(config)
    if config.mode == "expand":
        from kdjax.generate.expand import expansion_source

        source = expansion_source(config, gen)
    else:
        store = open_example_store(config.prompts)
        if store.tokenizer_fingerprint != gen.tokenizer_fingerprint:
            raise ValueError(
                f"prompts: the example store {config.prompts} was packed with another "
                f"tokenizer ({str(store.tokenizer_fingerprint)[:16]}…) than the model's "
                f"({gen.tokenizer_fingerprint[:16]}…); pack it with the model's tokenizer or "
                "pass tokenizer=DIR")
        source = _StoreSource(store)
    num_examples = source.num_rows
    num_shards = max(1, math.ceil(num_examples / config.shard_examples))
    writer = GeneratedWriter(config.out, plan_of(config, gen, source.fingerprint), num_shards,
                             extra_columns=source.extra_columns, overwrite=config.overwrite,
                             own_files=("instructions.jsonl",))
    todo = writer.missing()
    todo_examples = sum(min(config.shard_examples, num_examples - s * config.shard_examples)
                        for s in todo)
    bar = tqdm(total=todo_examples * config.n, unit="seq", desc="generate",
               disable=not (config.progress and is_primary()), dynamic_ncols=True)
    t0, tokens = time.perf_counter(), 0

    def on_batch(seqs, new_tokens):
        nonlocal tokens
        tokens += new_tokens
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                            refresh=False)
        bar.update(seqs)

    for done, shard in enumerate(todo, 1):
        lo = shard * config.shard_examples
        rows = np.arange(lo, min(lo + config.shard_examples, num_examples))
        batch = source.read(rows)
        records = generate_records(gen, config, batch["prompt"], batch["prompt_len"],
                                   batch["example_id"], batch.get("prompt_text"),
                                   on_batch=on_batch)
        for r in records:
            for k in source.extra_columns:
                r[k] = batch[k][int(np.searchsorted(batch["example_id"], r["example_id"]))]
        if is_primary():
            writer.write_shard(shard, records)
        if on_shard is not None:
            on_shard(shard, done)
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {"examples": num_examples, "sequences": num_examples * config.n,
               "this_run_sequences": todo_examples * config.n, "new_tokens": tokens,
               "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
               "path": config.out}
    if config.mode == "expand":
        summary["expansion"] = source.counts
    dataset_summary = _finish(writer, config, source.extra_columns) if is_primary() else {}
    return {**summary, **dataset_summary}


def _finish(writer: GeneratedWriter, config: GenerateConfig, extra) -> dict:
    """Marks the raw dataset complete and writes the curated one to `<out>/curated`, shard
    by shard (one shard in memory at a time)."""
    dataset = GeneratedDataset(writer.root, require_complete=False)
    reasons, records, tokens = dict.fromkeys(FINISH_REASONS, 0), 0, 0
    for shard in dataset.shards(columns=["finish_reason", "completion_ids"]):
        for r in shard:
            reasons[r["finish_reason"]] += 1
            tokens += len(r["completion_ids"])
        records += len(shard)
    stats = {"records": records, "finish_reasons": reasons,
             "mean_completion_tokens": tokens / records if records else 0.0}
    writer.finish(stats)
    _, kept, dropped = write_curated(dataset, Path(config.out) / "curated", config.filter,
                                     extra)
    return {**stats, "kept": kept, "dropped": dropped,
            "curated": str(Path(config.out) / "curated")}


class _StoreSource:
    """Prompts from an example store."""

    extra_columns: tuple = ()

    def __init__(self, store):
        self.store = store
        self.num_rows = store.num_rows
        self.fingerprint = store.fingerprint

    def read(self, rows):
        return self.store.read(rows)


def summary_lines(summary: dict) -> list[str]:
    fr = summary.get("finish_reasons", {})
    lines = []
    if "expansion" in summary:
        c = summary["expansion"]
        lines.append(f"expansion: {c['accepted']} new instructions of {c['proposed']} "
                     f"proposed in {c['rounds']} rounds (dropped: unparsed {c['unparsed']}, "
                     f"length {c['length']}, near duplicate {c['near_duplicate']})")
    lines += [f"generated dataset {summary['path']}: {summary['examples']} prompts × n = "
             f"{summary['sequences']} completions, complete",
             f"  this run: {summary['this_run_sequences']} completions, "
             f"{summary['new_tokens']:,} tokens in {summary['seconds']:.1f}s "
             f"({summary['tokens_per_s']:,.0f} tokens/s)"]
    if fr:
        lines.append(f"  finish: eos {fr.get('eos', 0)}, stop {fr.get('stop', 0)}, length "
                     f"{fr.get('length', 0)}; mean completion "
                     f"{summary['mean_completion_tokens']:.1f} tokens")
    if "kept" in summary:
        drops = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items() if v)
        lines.append(f"  curated {summary['curated']}: kept {summary['kept']} of "
                     f"{summary['records']} (dropped: {drops or 'none'})")
    return lines
