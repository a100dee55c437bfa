"""`build_token_store`: a datasets source + a tokenizer → packed train/eval token stores.

Output: `<out_dir>/train` and, with a held-out split, `<out_dir>/eval` (each a token
store). Held-out documents are chosen by a seeded permutation of whole documents before
packing, so no document is in both. Writing is resumable: an interrupted run leaves
stores marked incomplete (readers refuse them); re-running the same command finishes
only the missing shards. A different command on the same directory is refused unless
`overwrite=True`. The stores are shared by all hosts, so in a multi-process job one
process packs and the others wait for it (`kdjax.distributed.on_primary`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from kdjax.data.generated import (
    check_generated_tokenizer,
    generated_docs,
    load_generated,
    read_generated_manifest,
)
from kdjax.data.pack import fill_rows, plan_packing
from kdjax.data.sources import load_source
from kdjax.data.token_store import KIND, data_fingerprint, rows_digest, token_arrays
from kdjax.data.tokenize import Fields, column_names, tokenize_dataset, tokenizer_fingerprint
from kdjax.distributed import primary_writes
from kdjax.storage import RowStoreWriter, fingerprint_bytes

log = logging.getLogger(__name__)


def split_indices(n: int, eval_fraction: float, eval_docs: int | None, seed: int,
                  what: str) -> tuple[dict[str, np.ndarray], int]:
    """`({"train": sorted indices[, "eval": …]}, n_eval)`: a seeded random held-out split
    of `n` items (`eval_docs` of them, else round(eval_fraction·n))."""
    n_eval = int(eval_docs if eval_docs is not None else round(eval_fraction * n))
    if not 0 <= n_eval < n:
        raise ValueError(f"eval split of {n_eval} {what} leaves none for training out of "
                         f"{n}; lower eval_fraction ({eval_fraction}) / eval_docs ({eval_docs})")
    perm = np.random.default_rng(seed).permutation(n)
    splits = {"train": np.sort(perm[n_eval:])}
    if n_eval:
        splits["eval"] = np.sort(perm[:n_eval])
    return splits, n_eval


def _jax_started() -> bool:
    """Whether this process runs a JAX backend or jax.distributed's client (their threads
    make os.fork unsafe)."""
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import distributed, xla_bridge

    return (bool(xla_bridge.backends_are_initialized())
            or distributed.global_state.client is not None)


def _limit(ds, max_docs: int | None):
    """The first `max_docs` examples of a Dataset or IterableDataset (all with None)."""
    import datasets

    if max_docs is None:
        return ds
    if isinstance(ds, datasets.IterableDataset):
        return ds.take(max_docs)
    return ds.select(range(min(max_docs, len(ds))))


def _num_proc(ds, num_proc: int | None) -> int | None:
    """Tokenizer processes: all cores (at most 16) for a Dataset of >= 20k examples when
    not given; in-process when JAX runs here (forking it can deadlock)."""
    import datasets

    if num_proc is None and not isinstance(ds, datasets.IterableDataset) and len(ds) >= 20_000:
        num_proc = min(os.cpu_count() or 1, 16)  # worth the process start-up cost
    if num_proc and num_proc > 1 and _jax_started():
        log.info("JAX (a backend or jax.distributed) runs in this process and forking it "
                 "can deadlock; tokenizing in-process (run `kdjax pack` as a single process "
                 "for parallel tokenization)")
        num_proc = None
    return num_proc


def _materialize(docs, progress: bool, cache_dir: str | None):
    """An IterableDataset of documents → an Arrow Dataset written to the `datasets` cache
    (constant memory), so it can be packed with random access and a known row count."""
    import uuid

    import datasets

    def gen():
        yield from tqdm(docs, desc="tokenizing (stream)", unit=" docs", disable=not progress)

    # a fresh fingerprint: a stream may change between runs, so never reuse a cached copy
    return datasets.Dataset.from_generator(gen, features=docs.features, cache_dir=cache_dir,
                                           fingerprint=uuid.uuid4().hex)


def _docs_digest(docs, columns=("ids", "train")) -> str:
    """sha256 over every document's token ids and train flags (Arrow buffers, no Python
    loop), so a resumed build refuses data that changed since the interrupted run."""
    h = hashlib.sha256()
    if docs._indices is not None:  # an index mapping: materialize the selected rows
        docs = docs.flatten_indices()
    for name in columns:
        for chunk in docs.data.column(name).chunks:
            if not pa.types.is_list(chunk.type):  # a scalar column
                h.update(chunk.to_numpy(zero_copy_only=False).tobytes())
                continue
            h.update(pc.list_value_length(chunk).to_numpy(zero_copy_only=False).tobytes())
            h.update(chunk.flatten().to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def _write_split(docs, indices: np.ndarray, path: Path, *, seq_len: int, vocab_size: int,
                 pad_id: int, metadata: dict, pack_mode: str, shard_rows: int | None,
                 chunk_rows: int, overwrite: bool, progress: bool) -> dict:
    lengths = np.asarray(docs.select_columns(["length"])[:]["length"], np.int64)[indices]
    plan = plan_packing(lengths, seq_len, pack_mode)
    if plan.num_rows == 0:
        raise ValueError(f"split {path.name!r} has no document of >= 2 tokens "
                         f"({len(indices)} documents); add data or lower the eval fraction")
    shard_rows = shard_rows or min(plan.num_rows, max(1, 2**24 // (seq_len * 8)))
    shard_rows = -(-shard_rows // chunk_rows) * chunk_rows
    meta = {**metadata, "kind": KIND, "split": path.name, "seq_len": seq_len,
            "vocab_size": vocab_size, "pack_mode": pack_mode, "num_docs": int(len(indices)),
            "docs_fingerprint": fingerprint_bytes(lengths)}
    layout = token_arrays(seq_len, vocab_size)
    with RowStoreWriter(path, arrays=layout, num_rows=plan.num_rows,
                        shard_rows=shard_rows, chunk_rows=chunk_rows, metadata=meta,
                        overwrite=overwrite, layout="record") as w:
        for shard in tqdm(w.missing_shards(), desc=f"packing {path.name}", unit=" shards",
                          disable=not progress):
            lo, hi = w.shard_range(shard)
            a, b = np.searchsorted(plan.row, [lo, hi])
            need = np.unique(plan.doc[a:b])
            sub = docs.select(indices[need])[:]
            table = {int(d): (np.asarray(i, np.int64), np.asarray(t, bool))
                     for d, i, t in zip(need, sub["ids"], sub["train"])}
            data = fill_rows(plan, lo, hi, table, seq_len, pad_id)
            stored = {k: v.astype(layout[k][1]) for k, v in data.items()}
            w.write_shard(shard, stored, {"digest": f"{rows_digest(stored, lo):064x}",
                                          "tokens": int((data["segment_ids"] > 0).sum()),
                                          "loss_tokens": int(data["loss_mask"].sum())})
        infos = [w.ledger.info(s) for s in range(w.num_shards)]
        tokens = sum(i["tokens"] for i in infos)
        digest = sum(int(i["digest"], 16) for i in infos) % (1 << 256)
        manifest = w.finalize({
            "data_fingerprint": data_fingerprint(seq_len=seq_len, vocab_size=vocab_size,
                                                 num_rows=plan.num_rows, digest=digest),
            "num_tokens": tokens, "loss_tokens": sum(i["loss_tokens"] for i in infos),
            "fill": tokens / (plan.num_rows * seq_len)})
    return {"path": str(path), "rows": plan.num_rows, "tokens": manifest["num_tokens"],
            "fill": manifest["fill"], "fingerprint": manifest["data_fingerprint"]}


@primary_writes("pack")
def build_token_store(source, tokenizer, out_dir: str | os.PathLike, *, seq_len: int,
                      text_field: str | None = None, messages_field: str | None = None,
                      prompt_field: str | None = None, response_field: str | None = None,
                      split: str = "train", format: str | None = None, streaming: bool = False,
                      eval_fraction: float = 0.0, eval_docs: int | None = None, seed: int = 0,
                      max_docs: int | None = None, pack_mode: str = "split",
                      shard_rows: int | None = None, chunk_rows: int = 1,
                      num_proc: int | None = None, overwrite: bool = False,
                      cache_dir: str | None = None, progress: bool = True) -> dict:
    """Tokenizes and packs a dataset into `<out_dir>/train` (+ `<out_dir>/eval`).

    Args:
      source: files/glob/directory or a `datasets` name (see `load_source`), or a
        generated dataset directory (`kdjax.data.generated`: its prompt and completion
        ids are packed as they are, training on the completion tokens only).
      tokenizer: a Hugging Face tokenizer or a path that AutoTokenizer loads.
      seq_len: tokens per row (L).
      text_field / messages_field / prompt_field + response_field: which columns hold
        the examples (inferred from the column names if none is given).
      eval_fraction / eval_docs: held-out documents for the eval store (0 → none).
      max_docs: use only the first `max_docs` documents.
      pack_mode: "split" (no padding; long documents split) or "pad".
      shard_rows, chunk_rows: store layout (shard = commit unit; chunk = read unit).
      num_proc: tokenizer processes; None = all cores for >= 20k documents, else 1.
      cache_dir: `datasets` cache directory (default: the Hugging Face cache).

    Returns:
      {"train": {path, rows, tokens, fill, fingerprint}, "eval": {...} (if any),
       "seconds": float}. In a multi-process job only process 0 tokenizes and writes; the
      others wait for it and return its summary (as JSON values).
    """
    import datasets
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    given = Fields(text_field, messages_field, prompt_field, response_field)
    generated = read_generated_manifest(source)
    if generated is not None:  # a generated dataset (SeqKD): its token ids, no tokenizing
        if given != Fields():
            raise ValueError(f"{source!r} is a generated dataset: its prompt_ids and "
                             "completion_ids are packed as they are; drop the field options")
        check_generated_tokenizer(generated, source, tokenizer)
        ds = _limit(load_generated(source, streaming=streaming, cache_dir=cache_dir),
                    max_docs)
        fields_meta = {"generated": generated["manifest_sha256"]}
        docs = generated_docs(ds, vocab_size=len(tokenizer))
    else:
        ds = _limit(load_source(source, split=split, format=format, streaming=streaming,
                                **({"cache_dir": str(cache_dir)} if cache_dir else {})),
                    max_docs)
        fields = given if given != Fields() else Fields.infer(column_names(ds))
        fields_meta = fields.__dict__
        docs = tokenize_dataset(ds, tokenizer, fields, num_proc=_num_proc(ds, num_proc))
    if isinstance(docs, datasets.IterableDataset):
        docs = _materialize(docs, progress, cache_dir and str(cache_dir))
    n = len(docs)
    splits, n_eval = split_indices(n, eval_fraction, eval_docs, seed, "documents")
    vocab_size = len(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    metadata = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "docs_sha256": _docs_digest(docs),
                "source": {"source": [str(s) for s in np.atleast_1d(np.asarray(source, object))],
                           "split": split, "fields": fields_meta, "max_docs": max_docs,
                           "eval_docs": n_eval, "seed": seed}}
    out = {}
    for name, idx in splits.items():
        out[name] = _write_split(docs, idx, Path(out_dir) / name, seq_len=seq_len,
                                 vocab_size=vocab_size, pad_id=pad_id, metadata=metadata,
                                 pack_mode=pack_mode, shard_rows=shard_rows,
                                 chunk_rows=chunk_rows, overwrite=overwrite, progress=progress)
    out["seconds"] = time.perf_counter() - t0
    return out
