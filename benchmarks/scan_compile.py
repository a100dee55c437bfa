"""Compile time of a deep decoder's forward+backward: layers scanned (`scan_layers=True`,
the default) vs a Python loop over the same stacked parameters, on CPU.

    python benchmarks/scan_compile.py --out benchmarks/results/scan_compile.md  # 32 layers
    python benchmarks/scan_compile.py --quick            # 4 layers, seconds

Each repeat builds a fresh `jax.jit` of `value_and_grad(next-token CE)` (no tracing or
compilation cache is shared between repeats), then times `lower` (trace + StableHLO)
and `compile` (XLA) separately, wall clock; the table gives medians. Program size is
the lowered StableHLO text and the optimized HLO text. The step time (median of
`--steps` calls after one warm-up, from the last repeat's executable) shows what the
scan costs or saves at run time on the same machine.
"""

from __future__ import annotations

import statistics
import sys
import time

import bench_common as bc
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.models import DecoderConfig, init_decoder


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="4 layers, 1 repeat")
    bc.add_shape_flags(p, layers=32, hidden=128, vocab=1024, batch=2, seq=128, repeats=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--remat", default="full", help="none | full | dots | dots_no_batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    return p


def config(args, scan: bool) -> DecoderConfig:
    return DecoderConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=4 * args.hidden, num_layers=args.layers,
                         num_heads=args.heads, num_kv_heads=args.kv_heads, remat=args.remat,
                         scan_layers=scan, attention_impl="xla")


def make_step(graphdef):
    """A new `value_and_grad` function object, so nothing is cached across repeats."""

    def loss(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens).logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))


def measure(args, scan: bool) -> dict:
    model = init_decoder(config(args, scan), seed=0)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    lower_s, compile_s = [], []
    for _ in range(args.repeats):
        step = make_step(graphdef)
        t0 = time.perf_counter()
        lowered = step.lower(state, tokens)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        lower_s.append(t1 - t0)
        compile_s.append(t2 - t1)
    jax.block_until_ready(compiled(state, tokens))  # warm-up
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, tokens))
        times.append(time.perf_counter() - t0)
    return dict(lower=statistics.median(lower_s), compile=statistics.median(compile_s),
                stablehlo_kb=len(lowered.as_text()) / 1024,
                hlo_kb=len(compiled.as_text()) / 1024,
                step_ms=1e3 * statistics.median(times))


def report(args, rows: dict, argv) -> str:
    scan, loop = rows["scan"], rows["loop"]
    total = {k: v["lower"] + v["compile"] for k, v in rows.items()}
    lines = [
        "## Scan compile time (`benchmarks/scan_compile.py`)",
        "",
        f"Command: `{bc.command('scan_compile.py', argv)}`",
        "",
        f"{args.layers}-layer decoder (hidden {args.hidden}, GQA {args.heads}/{args.kv_heads} "
        f"heads, MLP {4 * args.hidden}, vocab {args.vocab}), float32, remat={args.remat!r}, "
        f"forward+backward of next-token CE on batch {args.batch} x {args.seq}. "
        f"{bc.machine()}. Wall clock, "
        f"median of {args.repeats} fresh `jax.jit`s; step time median of {args.steps} calls.",
        "",
        "| layers run by | lower s | compile s | total s | StableHLO KiB | optimized HLO KiB "
        "| step ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("`lax.scan` (scan_layers=True)", scan),
                    ("Python loop (scan_layers=False)", loop)):
        key = "scan" if r is scan else "loop"
        lines.append(f"| {name} | {r['lower']:.2f} | {r['compile']:.2f} | {total[key]:.2f} | "
                     f"{r['stablehlo_kb']:.0f} | {r['hlo_kb']:.0f} | {r['step_ms']:.1f} |")
    lines += ["", f"Scan vs loop, lower + compile: **{total['loop'] / total['scan']:.1f}x "
              f"faster** (compile alone {loop['compile'] / scan['compile']:.1f}x); step time "
              f"loop / scan = {loop['step_ms'] / scan['step_ms']:.2f}.", ""]
    return "\n".join(lines)


def run(args, argv) -> int:
    if args.quick:
        args.layers, args.repeats, args.steps = 4, 1, 2
    rows = {"scan": measure(args, True), "loop": measure(args, False)}
    bc.write(report(args, rows, argv), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
