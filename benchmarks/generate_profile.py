"""Where a `kdjax generate` decode step spends its time on CPU, and what its matmuls could
reach: the evidence behind issue 15's generation targets (`generate.md`).

  * the decode loop of `kdjax.models.generate` (greedy, `--prompt-len` prompt tokens,
    `--new-tokens` new ones) is traced with `jax.profiler` (perfetto trace) and each XLA
    kernel that ran once per decode step is put in a group by the op it computes, read
    from the compiled HLO (`--xla_dump_to`): the layer weight matmuls (q, k, v, o, gate,
    up, down), the LM head, attention over the KV cache, and the rest (norms, RoPE,
    softmax, cache writes, token choice), given as its share of the traced decode step
    (the profiler slows the step, small kernels more, so shares are approximate); the
    untraced step time is measured next to it, (T(N) − T(1)) / (N − 1) as in
    `generate.py`;
  * the ceiling of those matmuls: a jitted chain of the model's per-layer MLP shapes
    (`[B, H]·[H, I]`, `[B, I]·[I, H]`, a different weight matrix for each of the
    `num_layers` layers, so the weights stream from memory as in decode), and the same
    chain with one weight pair reused (cache-resident), against the 4096² matmul peak
    measured in the same run.

  python benchmarks/generate_profile.py --model /tmp/smollm2/hf   # ~3 minutes
  python benchmarks/generate_profile.py --quick                   # tiny random model
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import bench_common as bc

GROUPS = ("layer weight matmuls", "LM head", "attention over the cache", "everything else")


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--model", help="converted Hugging Face directory (default: random "
                   "weights in SmolLM2-135M's shape)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--quick", action="store_true", help="tiny random model, batch 8")
    p.add_argument("--out", default=str(bc.RESULTS / "generate_profile.md"))
    return p


def group_of(op_name: str) -> str:
    if "bh,hv->bv" in op_name:
        return "LM head"
    if "bkqd,bksd->bkqs" in op_name or "bkqs,bksd->bkqd" in op_name:
        return "attention over the cache"
    if op_name.endswith("/dot_general"):
        return "layer weight matmuls"
    return "everything else"


def kernel_ops(dump: str) -> dict[str, str]:
    """Kernel name → its HLO op_name, from the newest compiled `_generate` module."""
    files = sorted(glob.glob(f"{dump}/*jit__generate.cpu_after_optimizations.txt"),
                   key=os.path.getmtime)
    text = Path(files[-1]).read_text()
    return {m.group(1): m.group(2) for m in re.finditer(
        r"%([\w.\-]+) = \S+ fusion\([^\n]*?op_name=\"([^\"]*)\"", text)}


def traced_groups(trace_dir: str, steps: int, ops: dict[str, str]) -> dict[str, float]:
    """Seconds per decode step by group: the kernels that ran exactly `steps` times."""
    path = glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")[0]
    with gzip.open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    groups = dict.fromkeys(GROUPS, 0.0)
    for name, us in total.items():
        if count[name] == steps and not name.startswith(("$", "end:")) and name in ops:
            groups[group_of(ops[name])] += us / 1e6 / steps
    return groups


def matmul_chain(cfg, batch: int, peak: float) -> tuple[float, float]:
    """Fraction of `peak` reached by the MLP matmuls of `num_layers` layers at `batch`
    rows: (distinct weights per layer, one weight pair reused)."""
    import jax
    import jax.numpy as jnp

    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, h))
    ups = [jax.random.normal(jax.random.fold_in(key, 2 * j), (h, i)) * 0.02 for j in range(n)]
    downs = [jax.random.normal(jax.random.fold_in(key, 2 * j + 1), (i, h)) * 0.02
             for j in range(n)]

    @jax.jit
    def chain(x, ups, downs):
        for up, down in zip(ups, downs):
            x = jnp.tanh(x @ up) @ down
        return x

    flops = n * 2 * 2 * batch * h * i
    distinct = bc.timed(lambda: jax.block_until_ready(chain(x, ups, downs)), 5)
    reused = bc.timed(lambda: jax.block_until_ready(
        chain(x, [ups[0]] * n, [downs[0]] * n)), 5)
    return flops / distinct / peak, flops / reused / peak


def run(args, argv) -> int:
    if args.quick:
        args.batches = [8]
    if bc.backend_started():
        raise SystemExit("generate_profile.py dumps the compiled HLO, an XLA flag that must "
                         "be set before JAX starts: run it as its own process")
    dump = tempfile.mkdtemp(prefix="kdjax-generate-profile-")
    # the compiled HLO names each kernel the profile reports
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*_generate.*")
    import jax
    import numpy as np
    from generate import QUICK, SMOLLM2, decode_costs, matmul_peak

    from kdjax.models import DecoderConfig, from_pretrained, generate, init_decoder

    if args.model:
        model, what = from_pretrained(args.model), f"`{args.model}`"
    else:
        cfg = DecoderConfig(**(QUICK if args.quick else SMOLLM2))
        model, what = init_decoder(cfg, seed=0), "random weights, " + (
            "a tiny config" if args.quick else "SmolLM2-135M's shape")
    cfg, p, new = model.config, args.prompt_len, args.new_tokens
    steps = new - 1
    peak = matmul_peak()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batches:
        prompts = rng.integers(3, cfg.vocab_size, (b, p)).astype(np.int32)

        def kd(n, prompts=prompts):
            return generate(model, prompts, max_new_tokens=n, eos_token_id=[])

        kd(1), kd(new)  # compile both
        t1 = bc.timed(lambda: kd(1), 3)
        tn = bc.timed(lambda: kd(new), 3)
        step = (tn - t1) / steps
        with tempfile.TemporaryDirectory() as trace:
            with jax.profiler.trace(trace, create_perfetto_trace=True):
                kd(new)
            groups = traced_groups(trace, steps, kernel_ops(dump))
        traced = sum(groups.values())
        flops, _ = decode_costs(cfg, b, p + new)
        distinct, reused = matmul_chain(cfg, b, peak)
        rows.append(
            f"| {b} | {step * 1e3:.1f} | {b / step:,.1f} | {flops / step / peak:.0%} | "
            f"{traced * 1e3:.1f} | "
            + " | ".join(f"{groups[g] / traced:.0%}" for g in GROUPS)
            + f" | {distinct:.0%} | {reused:.0%} |")
        print(rows[-1], flush=True)
    header = [
        "| batch | decode step ms | decode tok/s | decode FLOP/s / peak | traced step ms | "
        + " | ".join(f"{g} (share)" for g in GROUPS)
        + " | MLP chain, distinct weights / peak | MLP chain, one weight pair / peak |",
        "|---:|" + "---:|" * (6 + len(GROUPS))]
    text = "\n".join([
        "## Generation: where a decode step goes" + (" (quick)" if args.quick else ""), "",
        f"Command: `{bc.command('generate_profile.py', argv)}`", "",
        f"{bc.machine()}", "",
        f"Model: {what}. {p}-token random prompts, {new} new tokens, greedy; decode step = "
        f"(T({new}) − T(1)) / {steps}, median of 3. Matmul peak {peak / 1e9:.1f} GFLOP/s "
        "(f32 4096² dot, this run). Shares: each kernel group's part of the decode step "
        "traced by `jax.profiler` (kernels that ran once per step; the trace runs slower "
        "than the untraced step, small kernels more, so shares are approximate). "
        "MLP chain: the model's per-layer `[B, H]·[H, I]` and `[B, I]·[I, H]` matmuls "
        f"through its {cfg.num_layers} layers in one jitted function, each layer's own "
        "weights (streamed from memory, as in decode) or one pair reused (cache-resident).",
        "", *header, *rows, ""])
    shutil.rmtree(dump, ignore_errors=True)
    bc.write(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
