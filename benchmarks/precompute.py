"""Teacher precompute: pipeline throughput vs the bare teacher forward, and bytes per token.

In one run, per teacher shape (`--teacher`: "toy" — hidden 512, 4 layers, the LM head
~57% of the forward FLOPs at V=32k — and "deep" — hidden 1024, 16 layers, LM head ~15%,
nearer real teachers, e.g. ~7% for Llama-3-8B):
  1. forward-only: the jitted teacher forward (logits left on device) on device-resident
     batches, median step time → tokens/s (the ceiling for precompute);
  2. forward + signal: the jitted precompute step (forward, then sampling / top-k / cast)
     on the same device-resident batch;
  3. precompute: `kdjax.teacher.precompute` over a synthetic token store per mode (token
     reads, forward, signal, device→host, background shard writes, ledger), steady-state
     tokens/s after compilation; ratios against 1 (target ≥ 0.9) and 2 (the pipeline's
     own overhead). 1–3 run back to back per mode and repeat; medians are reported, and
     for 1 and 2 also the ratio of their CPU times (less sensitive to other jobs);
  4. bytes per token of each mode at V = 32,000 / 128,256 / 151,936 (Llama 2 / Llama 3 /
     Qwen2.5): the stored signal from the store layout, and the measured size on disk of
     a real store written at V = 151,936.

  python benchmarks/precompute.py            # full (~10 minutes on 2 CPU cores)
  python benchmarks/precompute.py --teacher toy   # the small teacher only
  python benchmarks/precompute.py --quick    # seconds
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.data import open_token_store
from kdjax.data.token_store import KIND, data_fingerprint, token_arrays
from kdjax.models import Decoder, DecoderConfig
from kdjax.sharding import logical_to_spec, make_mesh
from kdjax.storage import RowStoreWriter
from kdjax.teacher import PrecomputeConfig, precompute
from kdjax.teacher.step import build_step
from kdjax.teacher.store import array_layout, disk_bytes, signal_bytes_per_token

TEACHERS = {  # shape and batch of each benchmarked teacher; 12 steps per run, so that the
    # un-overlapped first step (compilation) and last shard write weigh little
    "toy": dict(hidden=512, layers=4, rows=96, batch_size=8),
    "deep": dict(hidden=1024, layers=16, rows=48, batch_size=4),
}
VOCABS = {"Llama 2 (32k)": 32_000, "Llama 3 (128k)": 128_256, "Qwen2.5 (152k)": 151_936}
MODES = {  # label: PrecomputeConfig fields
    "sampled N=64 U=32": dict(mode="sampled", num_samples=64, num_slots=32),
    "sampled N=32 U=16": dict(mode="sampled", num_samples=32, num_slots=16),
    "topk K=32": dict(mode="topk", k=32),
    "topk K=32 bf16": dict(mode="topk", k=32, logprob_dtype="bfloat16"),
    "dense bf16": dict(mode="dense", dense_dtype="bfloat16"),
    "dense f32": dict(mode="dense"),
}


def token_store(path: Path, rows: int, seq_len: int, vocab: int):
    """A synthetic token store: random tokens, 4 segments per row."""
    rng = np.random.default_rng(0)
    meta = {"kind": KIND, "seq_len": seq_len, "vocab_size": vocab,
            "tokenizer_fingerprint": f"synthetic-{vocab}"}
    with RowStoreWriter(path, arrays=token_arrays(seq_len, vocab), num_rows=rows,
                        shard_rows=rows, metadata=meta) as w:
        seg = np.repeat(np.arange(1, 5), -(-seq_len // 4))[:seq_len]
        w.write_shard(0, {"tokens": rng.integers(0, vocab, (rows, seq_len)),
                          "segment_ids": np.broadcast_to(seg, (rows, seq_len)),
                          "loss_mask": np.broadcast_to(np.roll(seg, -1) == seg,
                                                       (rows, seq_len))})
        w.finalize({"data_fingerprint": data_fingerprint(seq_len=seq_len, vocab_size=vocab,
                                                         num_rows=rows, digest=0)})
    return open_token_store(path)


def teacher(vocab: int, hidden: int, layers: int) -> Decoder:
    cfg = DecoderConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                        num_layers=layers, num_heads=max(hidden // 64, 1),
                        num_kv_heads=max(hidden // 128, 1))
    return Decoder(cfg, rngs=nnx.Rngs(0))


def lm_head_share(model: Decoder, seq_len: int) -> float:
    """The LM head's share of the forward's matmul FLOPs per token (attention scores over
    the full row, as computed)."""
    c = model.config
    kv = c.num_kv_heads * c.head_dim
    layer = (2 * c.hidden_size * (2 * c.num_heads * c.head_dim + 2 * kv)
             + 6 * c.hidden_size * c.intermediate_size + 4 * seq_len * c.num_heads * c.head_dim)
    head = 2 * c.hidden_size * c.vocab_size
    return head / (head + c.num_layers * layer)


def _rate(fn, args, tokens: int, repeats: int) -> tuple[float, float]:
    """Warm tokens/s of a jitted fn (median of repeats, block_until_ready), by wall-clock
    and by process CPU time."""
    jax.block_until_ready(fn(*args))
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return tokens / statistics.median(times), tokens / statistics.median(cpu)


def device_batch(store, mesh, batch: int):
    spec = logical_to_spec(("batch",), mesh=mesh)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    rows = store.read(np.arange(batch))
    args = [jax.device_put(np.asarray(rows[k], np.int32), sharding)
            for k in ("tokens", "segment_ids", "positions")]
    return sharding, args


def forward_fn(model, sharding):
    graphdef, state = nnx.split(model)

    def forward(state, tokens, segment_ids, positions):
        return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids,
                                          positions=positions).logits

    return jax.jit(forward, out_shardings=sharding), state


def throughput(args, root: Path, name: str) -> list[str]:
    """Per mode, back to back (so machine load drifts little between them): the bare
    forward, forward + signal (the jitted precompute step on device-resident inputs) and
    the whole precompute pipeline."""
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v
             for k, v in TEACHERS[name].items()}
    hidden, layers, n_rows, batch_size = (shape[k] for k in ("hidden", "layers", "rows",
                                                               "batch_size"))
    mesh = make_mesh()
    model = teacher(args.vocab, hidden, layers)
    store = token_store(root / f"tokens-{name}", n_rows, args.seq_len, args.vocab)
    sharding, batch = device_batch(store, mesh, batch_size)
    tokens = batch_size * args.seq_len
    with jax.set_mesh(mesh):
        fwd, state = forward_fn(model, sharding)
        mem = fwd.lower(state, *batch).compile().memory_analysis()
    lines = [f"#### Teacher `{name}`", "",
             f"teacher: V={args.vocab}, hidden={hidden}, layers={layers}, "
             f"intermediate={model.config.intermediate_size} (LM head "
             f"{lm_head_share(model, args.seq_len):.0%} of the forward FLOPs); {n_rows} rows "
             f"× L={args.seq_len}, batch {batch_size}, "
             f"{len(mesh.devices.flat)} {jax.devices()[0].platform} device(s); "
             f"load average at start {os.getloadavg()[0]:.2f}",
             f"forward-only compiled temp memory {mem.temp_size_in_bytes:,} bytes", "",
             "| mode | forward-only tok/s | forward+signal tok/s | precompute tok/s | "
             "precompute / forward | precompute / (forward+signal) | "
             "(forward+signal) / forward, CPU time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = jnp.arange(batch_size, dtype=jnp.int32)
    for label in args.modes:
        cfg = PrecomputeConfig(tokens="", batch_size=batch_size,
                               shard_rows=min(args.shard_rows, n_rows),
                               teacher_fingerprint="bench", progress=False, **MODES[label])
        f_rates, s_rates, p_rates, cpu_ratios = [], [], [], []
        for r in range(args.repeats):
            with jax.set_mesh(mesh):
                f_wall, f_cpu = _rate(fwd, (state, *batch), tokens, 3)
                step, st = build_step(model, cfg, sharding, ())
                s_wall, s_cpu = _rate(step, (st, *batch, rows), tokens, 3)
            f_rates.append(f_wall)
            s_rates.append(s_wall)
            cpu_ratios.append(s_cpu / f_cpu)
            out = str(root / f"{name}-{label}-{r}")
            p_rates.append(precompute(dataclasses.replace(cfg, out=out), model=model,
                                      token_store=store, mesh=mesh)["steady_tokens_per_s"])
        f, sg, pre, cr = (statistics.median(x) for x in (f_rates, s_rates, p_rates,
                                                          cpu_ratios))
        lines.append(f"| {label} | {f:,.0f} | {sg:,.0f} | {pre:,.0f} | {pre / f:.2f} | "
                     f"{pre / sg:.2f} | {cr:.2f} |")
        print(lines[-1], flush=True)
    lines += ["", f"load average at end {os.getloadavg()[0]:.2f}", ""]
    return lines


def bytes_table(args, root: Path) -> list[str]:
    """Stored signal bytes/token per mode and vocabulary, and measured disk bytes/token."""
    lines = ["| mode | " + " | ".join(VOCABS) + f" | on disk, V=151,936 (L={args.disk_len}) |",
             "|---|" + "---:|" * (len(VOCABS) + 1)]
    v_disk = VOCABS["Qwen2.5 (152k)"]
    store = token_store(root / "tokens-disk", 8, args.disk_len, v_disk)
    model = teacher(v_disk, 16, 1)
    for label, fields in MODES.items():
        cfg = PrecomputeConfig(**fields)
        cells = []
        for v in VOCABS.values():
            layout = array_layout(mode=cfg.mode, seq_len=1, vocab_size=v, k=cfg.k,
                                  num_samples=cfg.num_samples, num_slots=cfg.num_slots,
                                  logprob_dtype=cfg.logprob_dtype, dense_dtype=cfg.dense_dtype)
            arrays = {n: {"shape": [1, *s[1:]], "dtype": d} for n, (s, d) in layout.items()}
            cells.append(f"{signal_bytes_per_token({'arrays': arrays}):,.0f}")
        out = root / f"disk-{label}"
        precompute(PrecomputeConfig(tokens="", out=str(out), batch_size=8, shard_rows=8,
                                    teacher_fingerprint="bench", progress=False, **fields),
                   model=model, token_store=store, mesh=make_mesh(devices=jax.devices()[:1]))
        cells.append(f"{disk_bytes(out) / (8 * args.disk_len):,.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return lines


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--teacher", nargs="+", default=list(TEACHERS), choices=list(TEACHERS),
                   help="teacher shapes to benchmark (see TEACHERS)")
    p.add_argument("--hidden", type=int, help="override the teachers' hidden size")
    p.add_argument("--layers", type=int, help="override the teachers' layer count")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, help="override the teachers' row count")
    p.add_argument("--batch-size", type=int, help="override the teachers' batch size")
    p.add_argument("--shard-rows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--disk-len", type=int, default=64, help="row length of the disk stores")
    p.add_argument("--modes", nargs="+", default=["sampled N=64 U=32", "topk K=32",
                                                  "dense bf16"], choices=list(MODES))
    p.add_argument("--out", default=str(bc.RESULTS / "precompute.md"))
    return p


def run(args, argv) -> int:
    if args.quick:
        args.vocab, args.hidden, args.layers, args.seq_len = 4096, 128, 2, 64
        args.rows, args.repeats, args.disk_len, args.shard_rows = 16, 1, 8, 8
        args.teacher = args.teacher[:1]
    with tempfile.TemporaryDirectory() as tmp:
        lines = [line for name in args.teacher for line in throughput(args, Path(tmp), name)]
        table = bytes_table(args, Path(tmp))
    text = "\n".join(["## Teacher precompute" + (" (quick)" if args.quick else ""), "",
                      f"Command: `{bc.command('precompute.py', argv)}`", "",
                      f"{bc.machine()}.", "", "### Throughput (steady state, after "
                      "compilation; median of repeats)", "", *lines, "",
                      "### Bytes per token (teacher signal; ids in the smallest unsigned "
                      "dtype that holds V)", "", *table, ""])
    bc.write(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
