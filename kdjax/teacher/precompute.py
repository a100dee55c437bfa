"""`precompute`: run a teacher over a token store once and write its teacher store.

The teacher (a `kdjax.models.Decoder`, sharded over the mesh) runs jitted once on global
batches; each process feeds rows of its own shards and gets its rows back, so every
process writes disjoint whole shards. Shards are written on a background thread while
the next batches compute, and recorded in the store's ledger only once durable, so a
rerun after a crash or kill -9 redoes only the missing shards. Sampling is a pure
function of (seed, row) and each device always sees the same aligned block of rows of a
shard, so a redone shard — or a run with another process count — is bit-identical.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from kdjax import distributed, schema
from kdjax.sharding import data_parallel_size, logical_to_spec, make_mesh
from kdjax.storage import ShardLedger, fingerprint_dir
from kdjax.storage.rowstore import RowStoreWriter
from kdjax.teacher import signal as _signal
from kdjax.teacher import store as _store
from kdjax.teacher.config import PrecomputeConfig
from kdjax.teacher.progress import Progress, overflow_warning, summary_lines
from kdjax.teacher.step import build_step, normalize_layers, shard_stats, total_stats
from kdjax.teacher.writer import BackgroundWriter, ShardAssembler


def _teacher_fingerprint(config: PrecomputeConfig, model) -> str:
    if config.teacher_fingerprint:
        return config.teacher_fingerprint
    if config.teacher:
        return fingerprint_dir(config.teacher, patterns=("config.json", "*.safetensors"))
    raise ValueError("a teacher passed as a model object needs config.teacher_fingerprint "
                     "(a string identifying its weights) so the store can be matched to it")


_TEACHER_HINT = ("; pass a local Hugging Face model directory (config.json and *.safetensors, "
                 "as transformers' save_pretrained writes)")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer_dir(config: PrecomputeConfig) -> str | None:
    """The tokenizer the token store must match: `config.tokenizer`, else the teacher
    directory when it holds tokenizer files, else None (nothing to check against)."""
    if config.tokenizer:
        return config.tokenizer
    if config.teacher and any((Path(config.teacher) / f).is_file() for f in _TOKENIZER_FILES):
        return config.teacher
    return None


def check_tokenizer(config: PrecomputeConfig, token_store) -> None:
    """Refuses a token store packed with another tokenizer than the teacher's (its signal
    would score other tokens than the rows hold), naming both tokenizers' fingerprints and
    vocabulary sizes. With no tokenizer to compare (no `tokenizer` setting and a teacher
    directory without tokenizer files) it says so and goes on."""
    from kdjax.models import load_tokenizer

    path = _tokenizer_dir(config)
    if path is None:
        if config.progress and distributed.is_primary():
            print(f"kdjax precompute: note: {config.teacher or 'the teacher'} holds no "
                  "tokenizer, so the token store's tokenizer is not checked against it (set "
                  "tokenizer=DIR to check)", flush=True)
        return
    schema.check_dir(path, "tokenizer" if config.tokenizer else "teacher",
                      what="tokenizer directory")
    token_store.check_tokenizer(
        load_tokenizer(path), whose=f"the teacher's in {path!r}" if path == config.teacher
        else f"tokenizer={path!r}",
        advice=f"re-pack the data with the teacher's tokenizer (`kdjax pack SOURCE "
        f"--tokenizer {path} …`); if the teacher really uses the store's tokenizer, set "
        "tokenizer=DIR to the directory the store was packed with")


def _metadata(config: PrecomputeConfig, tokens, mcfg, layers, teacher_fp: str) -> dict:
    """The manifest fields that define the store's content (part of the writer's plan)."""
    mode = config.mode
    meta = {"store_format": _store.FORMAT, "store_format_version": _store.FORMAT_VERSION,
            "signal_version": _signal.SIGNAL_VERSION,
            "mode": mode, "vocab_size": int(mcfg.vocab_size),
            "tokenizer_vocab_size": int(tokens.vocab_size), "seq_len": int(tokens.seq_len),
            "temperature": float(config.temperature),
            "teacher_fingerprint": teacher_fp,
            "tokenizer_fingerprint": tokens.tokenizer_fingerprint,
            "data_fingerprint": tokens.fingerprint,
            "teacher_dtype": str(mcfg.dtype), "hidden_layers": list(layers),
            "hidden_size": int(mcfg.hidden_size) if layers else None,
            "k": config.k if mode == "topk" else None,
            "num_samples": config.num_samples if mode == "sampled" else None,
            "num_slots": config.num_slots if mode == "sampled" else None,
            "seed": config.seed if mode == "sampled" else None}
    return meta


def _open_writer(config, layout, num_rows, metadata) -> RowStoreWriter:
    """Process 0 creates (or resumes, or refuses) the store first; the others then open it."""
    kw = dict(arrays=layout, num_rows=num_rows, shard_rows=config.shard_rows,
              chunk_rows=config.chunk_rows, metadata=metadata)
    made = []

    def create():
        made.append(RowStoreWriter(config.out, overwrite=config.overwrite,
                                   lock_name="writer-0", **kw))

    distributed.on_primary("precompute-create", create)
    if made:
        return made[0]
    return RowStoreWriter(config.out, lock_name=f"writer-{jax.process_index()}", **kw)


def _todo(writer: RowStoreWriter) -> list[int]:
    """Missing shards as process 0 saw them before anyone writes (broadcast to all)."""
    missing = np.zeros(writer.num_shards, np.int32)
    missing[writer.missing_shards()] = 1
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    distributed.barrier("precompute-planned")
    return [int(s) for s in np.flatnonzero(missing)]


def precompute(config: PrecomputeConfig, *, model=None, token_store=None, mesh=None) -> dict:
    """Writes (or resumes) the teacher store `config.out`; returns the run summary.

    Args:
      config: what to run (see `PrecomputeConfig`).
      model: a `kdjax.models.Decoder`, run as built (its `config.dtype` is the compute
        dtype the manifest records); default: `from_pretrained(config.teacher)` in
        `config.dtype` (bfloat16 unless set) with `config.teacher_param_dtype` weights.
      token_store: an opened token store (default: `open_token_store(config.tokens)`).
      mesh: device mesh (default: `make_mesh(*config.mesh)` over all devices).
    Returns:
      dict: `manifest` (final), `rows`/`tokens` computed by this process, `shards` redone,
      `seconds`, `tokens_per_s` (including compilation), `steady_tokens_per_s` (after the
      first step), `write_seconds` (background writer busy time), `path`, and
      `overflow_warning`: None, or (sampled, U < N) why the store's signal is biased:
      some draws were dropped for lack of slots. That text is also printed to stderr as
      `kdjax precompute: warning: …` by the primary process, even with progress off;
      the manifest's `stats` hold the counts (`overflow_rate`, `dropped_sample_rate`).
    """
    if model is None:
        schema.check_dir(config.teacher, "teacher", what="teacher directory",
                          holds="config.json", hint=_TEACHER_HINT)
    if token_store is None:
        from kdjax.data import open_token_store

        schema.check_dir(config.tokens, "tokens", what="token store",
                          hint="; pack one with `kdjax pack SOURCE --tokenizer TEACHER_DIR "
                          "--out DIR --seq-len L` and pass DIR/train")
        token_store = open_token_store(config.tokens)
    check_tokenizer(config, token_store)
    mesh = make_mesh(*config.mesh) if mesh is None else mesh
    if model is None:
        from kdjax.models import from_pretrained

        model = from_pretrained(config.teacher, mesh=mesh, dtype=config.dtype,
                                param_dtype=config.teacher_param_dtype)
    mcfg = model.config
    if token_store.vocab_size > mcfg.vocab_size:
        raise ValueError(f"the token store's vocabulary ({token_store.vocab_size}) is larger "
                         f"than the teacher's ({mcfg.vocab_size}); use a teacher that shares "
                         "the tokenizer the token store was packed with")
    layers = normalize_layers(config.hidden_layers, mcfg.num_layers)
    layout = _store.array_layout(
        mode=config.mode, seq_len=token_store.seq_len, vocab_size=mcfg.vocab_size,
        k=config.k, num_samples=config.num_samples, num_slots=config.num_slots,
        logprob_dtype=config.logprob_dtype, dense_dtype=config.dense_dtype,
        hidden_layers=layers, hidden_size=mcfg.hidden_size, hidden_dtype=config.hidden_dtype)
    metadata = _metadata(config, token_store, mcfg, layers, _teacher_fingerprint(config, model))
    writer = _open_writer(config, layout, token_store.num_rows, metadata)
    try:
        todo = _todo(writer)
        if len(todo) < writer.num_shards and distributed.is_primary():
            done, total = writer.num_shards - len(todo), writer.num_shards
            print(f"kdjax precompute: resuming {config.out}: {done} of {total} shards already "
                  f"written, {len(todo)} to compute" if todo else f"kdjax precompute: "
                  f"{config.out} already holds all {total} shards; nothing to compute",
                  flush=True)
        t0 = time.perf_counter()
        timing = _run(config, model, mesh, token_store, writer, todo, layers)
        seconds = time.perf_counter() - t0
        distributed.barrier("precompute-written")
        distributed.on_primary("precompute-finalize", _finalize, writer, config, mcfg)
    finally:
        writer.close()
    manifest = _store.open_teacher_store(config.out).manifest
    length = int(token_store.seq_len)
    summary = {"manifest": manifest, "rows": timing["rows"], "tokens": timing["rows"] * length,
               "seconds": seconds, "write_seconds": timing["write_seconds"],
               "shards": len(todo), "path": str(Path(config.out))}
    summary["tokens_per_s"] = summary["tokens"] / max(seconds, 1e-9)
    # throughput after compilation (the first step), comparable to a warm forward
    summary["steady_tokens_per_s"] = ((timing["rows"] - timing["warm_rows"]) * length
                                      / max(timing["steady_seconds"], 1e-9))
    if config.progress and distributed.is_primary():
        print("\n".join(summary_lines(summary)))
    summary["overflow_warning"] = warning = overflow_warning(manifest)
    if warning and distributed.is_primary():
        # not a progress message: said even with progress=False (the signal is biased)
        print(f"kdjax precompute: warning: {warning}", file=sys.stderr, flush=True)
    return summary


def _finalize(writer: RowStoreWriter, config: PrecomputeConfig, mcfg) -> None:
    """Sums the shards' statistics into the manifest and marks the store complete (the
    manifest is shared: only the primary process writes it)."""
    ledger = ShardLedger(writer.path, writer.num_shards)
    infos = [ledger.info(s) for s in range(writer.num_shards)]
    stats = total_stats(infos, config.mode, config.num_samples, mcfg.vocab_size)
    writer.finalize({"stats": stats})


def _local_batch(config: PrecomputeConfig, mesh) -> int:
    nproc = jax.process_count()
    for what, size in (("processes", nproc), ("data-parallel devices", data_parallel_size(mesh))):
        if config.batch_size % size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the number "
                             f"of {what} ({size}); pick a multiple of it")
    return config.batch_size // nproc


def _plan(todo: list[int], shard_rows: int, local_batch: int) -> list[tuple[int | None, int]]:
    """(shard, step within shard) of every step of this process. Processes take shards
    round-robin; one with fewer shards runs padding steps (shard None) so all processes
    run the same number of global steps."""
    nproc, pid = jax.process_count(), jax.process_index()
    mine = todo[pid::nproc]
    rounds = -(-len(todo) // nproc)
    steps = -(-shard_rows // local_batch)
    return [(mine[r] if r < len(mine) else None, j) for r in range(rounds) for j in range(steps)]


def _prefetched(plan, fetch, depth: int = 2):
    """Yields fetch(p) for p in plan, reading `depth` steps ahead on a thread."""
    with ThreadPoolExecutor(1, thread_name_prefix="kdjax-token-read") as pool:
        futures = deque(pool.submit(fetch, p) for p in plan[:depth])
        for i in range(len(plan)):
            item = futures.popleft().result()
            if i + depth < len(plan):
                futures.append(pool.submit(fetch, plan[i + depth]))
            yield item


def _run(config, model, mesh, token_store, writer, todo, layers) -> dict:
    """The compute/write pipeline of this process; returns its timings."""
    local_batch = _local_batch(config, mesh)
    spec = logical_to_spec(("batch",), mesh=mesh)
    step, state = build_step(model, config, NamedSharding(mesh, spec), layers)
    plan = _plan(todo, config.shard_rows, local_batch)

    def fetch(item):
        shard, j = item
        if shard is None:  # padding step (this process has no shard left): row 0, dropped
            rows, n = np.zeros(1, np.int64), 0
        else:
            lo, hi = writer.shard_range(shard)
            rows = np.arange(lo + j * local_batch, min(lo + (j + 1) * local_batch, hi))
            n = len(rows)
            rows = rows if n else np.array([lo])
        return shard, rows, n, token_store.read(rows)

    mine = {s for s, _ in plan if s is not None}
    progress = Progress(sum(np.diff(writer.shard_range(s))[0] for s in mine),
                        token_store.seq_len, enabled=config.progress)
    t = {"rows": 0, "warm_rows": 0}
    with BackgroundWriter(writer.write_shard) as bg, progress, jax.set_mesh(mesh):
        collect = _Collector(writer, mesh, spec, config, bg)
        pending = None
        for i, (shard, rows, n, data) in enumerate(_prefetched(plan, fetch)):
            # each device always gets the same aligned block of a shard's rows; padding
            # repeats the first row (rows are independent, so it changes nothing)
            idx = np.concatenate([np.arange(len(rows)), np.zeros(local_batch - len(rows), int)])
            local = [np.asarray(data[k], np.int32)[idx] for k in ("tokens", "segment_ids",
                                                                   "positions")]
            inputs = multihost_utils.host_local_array_to_global_array(
                (*local, rows[idx].astype(np.int32)), mesh, spec)
            out = step(state, *inputs)  # async: the previous step's outputs land meanwhile
            if i == 0:  # after compilation: the steady-state clock starts here
                jax.block_until_ready(out)
                t["warm"], t["warm_rows"] = time.perf_counter(), n
            if pending is not None:
                collect(*pending)
            pending = (shard, n, data, out)
            t["rows"] += n
            progress.update(n)
        if pending is not None:
            collect(*pending)
    t["steady_seconds"] = time.perf_counter() - t.get("warm", time.perf_counter())
    t["write_seconds"] = bg.seconds_writing
    return t


class _Collector:
    """Moves a step's outputs to the host, adds them to their shard, submits full shards."""

    def __init__(self, writer, mesh, spec, config, bg):
        self.writer, self.mesh, self.spec, self.config, self.bg = writer, mesh, spec, config, bg
        self.names = [n for n in writer.row_shapes if n not in ("tokens", "loss_mask")]
        self.assembler = None

    def __call__(self, shard, n, data, out) -> None:
        if shard is None:
            return
        local = multihost_utils.global_array_to_host_local_array(out, self.mesh, self.spec)
        if self.assembler is None or self.assembler.shard != shard:
            lo, hi = self.writer.shard_range(shard)
            self.assembler = ShardAssembler(shard, hi - lo)
        host = {k: np.asarray(v) for k, v in local.items()}
        host["tokens"] = np.asarray(data["tokens"])
        host["loss_mask"] = np.asarray(data["loss_mask"], bool)
        self.assembler.add(host, n)
        if self.assembler.full:
            parts = self.assembler.parts()
            info = shard_stats(parts, self.config.mode)
            self.bg.submit(shard, {k: parts[k] for k in (*self.names, "tokens", "loss_mask")},
                           info)
            self.assembler = None
