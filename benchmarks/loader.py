"""Loader throughput vs the page-cache read ceiling, and a training-like loop.

Builds a synthetic token store (L tokens/row) and a sampled-teacher-like store
(ids [L, U] + counts [L, U]) with the real writers, then in one run measures:
  1. ceiling: sequential read of every chunk file of both stores from the page cache
     (files read once beforehand so they are cached) into a reused buffer, in bytes/s
     (and, for reference, into freshly allocated arrays);
  2. loader: `Loader.local_batch(step)` (the host side: the shuffled rows of both stores
     through the fast preadv + crc32c path of kdjax.storage.shardread, + targets/positions)
     and `batch_at(step)` (plus the global jax.Arrays), in rows/s and stored bytes/s; and,
     for comparison, `local_batch` with every array read by tensorstore (stores opened
     with KDJAX_FAST_READ=0, the reader before shardread);
  3. a training-like loop: a jitted step of fixed cost fed by `iter_from` (prefetch
     thread) vs the same step on one batch already in device memory (interleaved blocks).

  python benchmarks/loader.py            # full (~1 min)
  python benchmarks/loader.py --quick    # seconds
  # A/B against another version of the row reader, alternating step by step in one run:
  git show 5d1e9ed:kdjax/storage/shardread.py > /tmp/shardread_ref.py  # before issue 5
  python benchmarks/loader.py --ab-reader /tmp/shardread_ref.py --out /tmp/loader_ab.md
"""

from __future__ import annotations

import importlib.util
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

from kdjax.data import Loader, open_token_store
from kdjax.data.token_store import KIND, data_fingerprint, token_arrays
from kdjax.sharding import make_mesh
from kdjax.storage import RowStoreWriter, id_dtype, open_row_store


def build_stores(root: Path, rows: int, seq_len: int, slots: int, vocab: int, shard_rows: int):
    """A token store and a sampled-teacher-like store of `rows` random rows."""
    rng = np.random.default_rng(0)
    meta = {"kind": KIND, "seq_len": seq_len, "vocab_size": vocab, "tokenizer_fingerprint": "x"}
    meta["data_fingerprint"] = data_fingerprint(seq_len=seq_len, vocab_size=vocab,
                                                num_rows=rows, digest=0)
    teacher = {"ids": ((seq_len, slots), id_dtype(vocab)), "counts": ((seq_len, slots), np.uint8)}
    for name, arrays, md in (("tokens", token_arrays(seq_len, vocab), meta),
                             ("teacher", teacher, {"mode": "sampled"})):
        layout = "record" if name == "tokens" else "arrays"  # as build_token_store / T write
        with RowStoreWriter(root / name, arrays=arrays, num_rows=rows, shard_rows=shard_rows,
                            metadata=md, layout=layout) as w:
            for s in w.missing_shards():
                lo, hi = w.shard_range(s)
                n = hi - lo
                data = {"ids": rng.integers(0, vocab, (n, seq_len, slots)),
                        "counts": rng.integers(0, 32, (n, seq_len, slots))} if name == "teacher" \
                    else {"tokens": rng.integers(0, vocab, (n, seq_len)),
                          "segment_ids": np.repeat(np.arange(4) + 1, seq_len // 4)[None]
                          .repeat(n, 0), "loss_mask": rng.random((n, seq_len)) < 0.9}
                w.write_shard(s, data)
            w.finalize()
    return open_token_store(root / "tokens"), open_row_store(root / "teacher")


def open_tensorstore_only(root: Path):
    """The same stores, opened so that every read goes through tensorstore."""
    old = os.environ.get("KDJAX_FAST_READ")
    os.environ["KDJAX_FAST_READ"] = "0"
    try:
        return open_token_store(root / "tokens"), open_row_store(root / "teacher")
    finally:
        if old is None:
            del os.environ["KDJAX_FAST_READ"]
        else:
            os.environ["KDJAX_FAST_READ"] = old


def open_with_reader(root: Path, module_file: str):
    """The same stores, with every fast row reader replaced by the `ShardRowReader` of
    the module file `module_file` (another version of kdjax/storage/shardread.py)."""
    spec = importlib.util.spec_from_file_location("kdjax_ab_shardread", module_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tokens, teacher = open_token_store(root / "tokens"), open_row_store(root / "teacher")
    for rows in (tokens._rows, teacher):  # (private: a benchmark-only swap)
        rows._readers = {n: mod.ShardRowReader.of(a) for n, a in rows.arrays.items()}
    return tokens, teacher


def chunk_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "/c/" in str(p))


def _clocks() -> tuple[float, float]:
    """(wall, CPU) time now. CPU time is this process's user + system time (all threads):
    other jobs on a shared machine stretch wall times, hardly CPU times."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clocks()
    return now[0] - start[0], max(now[1] - start[1], 1e-9)


def read_ceiling(files: list[Path], repeats: int) -> tuple[float, float]:
    """Page-cache sequential read of all files, (wall, CPU-time) bytes/s, medians of
    repeats."""
    buf = bytearray(1 << 22)
    rates = []
    for _ in range(repeats + 1):  # the first pass warms the page cache
        t, total = _clocks(), 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
        rates.append([total / d for d in _since(t)])
    return tuple(statistics.median(r[i] for r in rates[1:]) for i in (0, 1))


def read_fresh(files: list[Path], repeats: int) -> tuple[float, float]:
    """Sequential read of all files into newly allocated NumPy arrays (what a reader that
    returns fresh arrays pays: allocation and page faults too), (wall, CPU) bytes/s."""
    rates = []
    for _ in range(repeats):
        t, total = _clocks(), 0
        for f in files:
            total += np.fromfile(f, np.uint8).nbytes
        rates.append([total / d for d in _since(t)])
    return tuple(statistics.median(r[i] for r in rates) for i in (0, 1))


def time_steps(fn, steps: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per call of fn(step) over `steps` steps after 2 warm-up
    calls."""
    for s in range(2):
        jax.block_until_ready(fn(s))
    times = []
    for s in range(2, 2 + steps):
        t = _clocks()
        jax.block_until_ready(fn(s))
        times.append(_since(t))
    return tuple(statistics.median(x[i] for x in times) for i in (0, 1))


def time_alternating(fns, steps: int) -> list[tuple[float, float]]:
    """Like `time_steps` for several functions called in turn at every step, so that a
    busy spell of the machine slows them alike: [(wall, CPU) median seconds] per fn."""
    for s in range(2):
        for fn in fns:
            fn(s)
    times = [[] for _ in fns]
    for s in range(2, 2 + steps):
        for fn, acc in zip(fns, times):
            t = _clocks()
            jax.block_until_ready(fn(s))
            acc.append(_since(t))
    return [tuple(statistics.median(x[i] for x in acc) for i in (0, 1)) for acc in times]


def make_train_step(width: int):
    """A jitted step of fixed cost that consumes every batch array (stand-in for training):
    an embedding lookup of the tokens, 4 [width, width] matmul layers, and a reduction
    of every other array."""
    k1, k2 = jax.random.split(jax.random.key(0))
    params = (jax.random.normal(k1, (4096, width), jnp.float32),
              jax.random.normal(k2, (4, width, width), jnp.float32) / width ** 0.5)

    @jax.jit
    def step(params, batch):
        emb, layers = params
        x = emb[batch["tokens"] % emb.shape[0]]
        for i in range(layers.shape[0]):
            x = jnp.tanh(x @ layers[i])
        extra = sum(v.astype(jnp.float32).mean() for v in batch.values())
        return emb + 1e-6 * (x.mean() + extra), layers

    return params, step


class BareRead:
    """A lower bound for any Python row reader: `local_batch(step)`'s rows of every array
    read by a bare loop — per row and array one `preadv` (row + stored crc32c) and one
    crc32c — with file descriptors and offsets looked up beforehand, and none of the
    reader's checks, bookkeeping or the token post-processing."""

    def __init__(self, loader, stores):
        import struct

        from google_crc32c import value

        self.loader, self.crc, self.arrays = loader, value, []
        for reader in (*stores[0]._rows._readers.values(), *stores[1]._readers.values()):
            n, sr = reader.shape[0], reader.shard_rows
            fds, offsets = {}, np.empty(n, np.int64)
            for shard in range(-(-n // sr)):
                fd, _, index, _ = reader._shard(shard)
                fds[shard] = fd
                for r in range(shard * sr, min(n, (shard + 1) * sr)):
                    offsets[r] = struct.unpack_from("<Q", index, 16 * (r - shard * sr))[0]
            reader._fds.clear()  # (these fds now belong to this object: never trimmed)
            self.arrays.append((reader.row_bytes, sr, fds, offsets))

    def __call__(self, step: int) -> list[np.ndarray]:
        rows = self.loader.rows_at(step)[self.loader.local_positions].tolist()
        outs, crc = [], self.crc
        for row_bytes, sr, fds, offsets in self.arrays:
            out = np.empty((len(rows), row_bytes), np.uint8)
            slots = bytearray(4 * len(rows))
            view, got = memoryview(slots), []
            for i, r in enumerate(rows):
                os.preadv(fds[r // sr], [out[i], view[4 * i:4 * i + 4]], int(offsets[r]))
                got.append(crc(out[i]))
            if got != list(np.frombuffer(slots, "<u4")):
                raise RuntimeError("bare read: crc32c mismatch")
            outs.append(out)
        return outs


def measure(args, files, stores, ts_stores, ab_stores=None) -> dict[str, float]:
    """All timings, in `args.rounds` interleaved rounds (other processes on a shared
    machine then slow every measurement alike); medians over rounds, and for each loader
    read the median over rounds of (its bytes/s ÷ that round's ceiling) as `ratio_<name>`
    (a ceiling that swings 2-15 GB/s with the machine's load is compared within a round)."""
    mesh = make_mesh()
    loader = Loader(stores[0], global_batch_size=args.batch, seed=0, mesh=mesh,
                    teacher_store=stores[1], prefetch=2)
    loader_ts = Loader(ts_stores[0], global_batch_size=args.batch, seed=0, mesh=mesh,
                       teacher_store=ts_stores[1], prefetch=2)
    hosts = {"host": loader, "host_ts": loader_ts}
    if ab_stores is not None:
        hosts["host_ab"] = Loader(ab_stores[0], global_batch_size=args.batch, seed=0,
                                  mesh=mesh, teacher_store=ab_stores[1], prefetch=2)
    bare = BareRead(loader, stores)
    params, step = make_train_step(args.width)
    fixed = loader.batch_at(0)
    it = loader.iter_from(0)
    out: dict[str, list[float]] = {}
    n = max(2, args.steps // args.rounds)
    for r in range(args.rounds):
        base = 10_000 * r  # fresh steps (rows) in every round
        for name, value in (
                ("ceiling", read_ceiling(files, repeats=3)),
                ("fresh", read_fresh(files, repeats=1)),
                # after (fast reader) and before (tensorstore), alternating step by step
                *zip([*hosts, "bare"], time_alternating(
                    [*(lambda s, b=base, h=h: h.local_batch(b + s) for h in hosts.values()),
                     lambda s, b=base: bare(b + s)], n)),
                ("batch_at", time_steps(lambda s, b=base: loader.batch_at(b + s), n)),
                ("mem", time_steps(lambda s: step(params, fixed), n)),
                ("real", time_steps(lambda s: step(params, next(it)), n)),
                ("prefetched", time_steps(lambda s: next(it), n))):
            out.setdefault(name, []).append(value[0])
            out.setdefault(f"{name}_cpu", []).append(value[1])
    loader.close()
    med = {k: statistics.median(v) for k, v in out.items()}
    for k in (*hosts, "bare", "batch_at", "prefetched"):  # seconds per step → ratio
        for c in ("", "_cpu"):
            med[f"ratio_{k}{c}"] = statistics.median(
                args.batch * args.row_bytes / (sec * ceil)
                for sec, ceil in zip(out[k + c], out["ceiling" + c]))
    return med


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="small stores, few steps (seconds)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--slots", type=int, default=16, help="U: sampled-teacher slots")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="steps per measurement (all rounds)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--width", type=int, default=128, help="train-like step hidden size")
    p.add_argument("--dir", help="where to build the stores (default: a temp dir)")
    p.add_argument("--ab-reader", help="also time `local_batch` with the row reader of this "
                   "shardread.py file (extra row, alternating with the others)")
    p.add_argument("--out", default=str(bc.RESULTS / "loader.md"))
    return p


def run(args, argv) -> int:
    if args.quick:
        args.rows, args.seq_len, args.batch, args.steps, args.rounds = 256, 256, 16, 8, 2
        args.shard_rows = 64
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name)
    t0 = time.perf_counter()
    store, teacher = build_stores(root, args.rows, args.seq_len, args.slots, args.vocab,
                                  args.shard_rows)
    files = chunk_files(root)
    disk = sum(f.stat().st_size for f in files)
    row_bytes = args.row_bytes = disk / args.rows
    print(f"built {args.rows} rows ({disk / 2**20:.1f} MiB, {row_bytes / 1024:.1f} KiB/row) "
          f"in {time.perf_counter() - t0:.1f}s")
    ab = open_with_reader(root, args.ab_reader) if args.ab_reader else None
    m = measure(args, files, (store, teacher), open_tensorstore_only(root), ab)
    bc.write(report(args, m, row_bytes, argv), args.out)
    tmp.cleanup()
    return 0


def report(args, m: dict[str, float], row_bytes: float, argv) -> str:
    """The markdown section for benchmarks/results/loader.md."""
    def rate(key, c):
        rows_s = args.batch / m[key + c]
        return (f"{rows_s:.0f} rows/s, {rows_s * row_bytes / 2**20:.0f} MiB/s",
                f"{m['ratio_' + key + c]:.2f}")

    def row(label, key):
        return (label, *rate(key, ""), *rate(key, "_cpu"))

    def mib(key):
        return f"{m[key] / 2**20:.0f} MiB/s", f"{m[key] / m[key.replace('fresh', 'ceiling')]:.2f}"

    def ms(key, c):
        return f"{m[key + c] * 1e3:.1f} ms", f"{m[key + c] / m['mem' + c]:.3f}"

    table = [
        ("page-cache sequential read (ceiling)", *mib("ceiling"), *mib("ceiling_cpu")),
        ("(reference) sequential read into fresh NumPy arrays", *mib("fresh"),
         *mib("fresh_cpu")),
        row("before: loader host read, every array through tensorstore", "host_ts"),
        row("loader host read (`local_batch`)", "host"),
        *([row(f"A/B: loader host read with the reader of `{args.ab_reader}`", "host_ab")]
          if "host_ab" in m else []),
        row("(bound) the same rows by a bare `preadv` + crc32c loop, nothing else", "bare"),
        row("loader + global arrays (`batch_at`)", "batch_at"),
        row("loader alone via `iter_from` (prefetch thread)", "prefetched"),
        ("train-like step, in-memory batch", *ms("mem", ""), *ms("mem", "_cpu")),
        ("train-like step, real loader (`iter_from`)", *ms("real", ""), *ms("real", "_cpu")),
    ]
    ids = np.dtype(id_dtype(args.vocab)).name
    return "\n".join([
        "## Loader", "", f"Command: `{bc.command('loader.py', argv)}`", "",
        f"Setup: {args.rows} rows × L={args.seq_len}; token store (tokens {ids}, segment_ids, "
        f"loss_mask; record layout) + sampled-teacher layout (ids {ids} [L, {args.slots}], "
        f"counts uint8 [L, {args.slots}]; one zarr array each); {row_bytes / 1024:.1f} KiB/row "
        f"on disk; global batch {args.batch}, shuffled rows; {len(jax.devices())} "
        f"{jax.devices()[0].platform} device(s); {bc.machine()}; medians of "
        f"{args.rounds} interleaved rounds of {max(2, args.steps // args.rounds)} steps.", "",
        "| measurement | wall | ratio | CPU time | ratio |", "|---|---|---|---|---|",
        *[f"| {' | '.join(r)} |" for r in table], "",
        "Ratios: loader bytes/s ÷ ceiling of the same round, median over rounds (target "
        "≥ 0.5); real-loader step ÷ in-memory step (target ≤ 1.05). Values: medians over "
        "rounds. CPU time: this process's user + system time (all its threads), which other "
        "jobs on a shared machine hardly change; wall time is what a dedicated host sees "
        "only when the machine is idle.", ""])


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
