"""Layer micro-benchmarks behind the CPU-specific forms of `kdjax.models.layers`.

  rows     a reduction over the last axis (a mean of squares, and RMSNorm's forward+
           backward) of an array whose leading axis has size 1, as it is (N-D) and on
           the 2-D `[rows, last]` view that `layers.rows` gives, against the same data
           with batch 4;
  project  a SwiGLU MLP's forward+backward (gate, up, down projections of `[B, L, H]`
           activations) with `jnp.einsum` on the N-D operands against
           `layers.project` (one 2-D `[B·L, K] @ [K, M]` matmul per projection).

Each row is a jitted function; calls of the two forms of a comparison are interleaved;
medians after warm-up. float32.

    python benchmarks/layers.py --single-thread --out benchmarks/results/layers.md
    python benchmarks/layers.py --quick    # seconds
"""

from __future__ import annotations

import sys

import bench_common as bc


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="10 repeats")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per row (median)")
    p.add_argument("--hidden", type=int, default=384, help="H (the model benchmark's)")
    p.add_argument("--intermediate", type=int, default=1024, help="SwiGLU inner size")
    p.add_argument("--single-thread", action="store_true",
                   help="pin the process to one core (one XLA thread)")
    p.add_argument("--out", default=None, help="write the markdown section here")
    return p


def _ms(fns, repeats):
    import jax

    return [1e3 * t for t in bc.timed_interleaved(
        [lambda f=f: jax.block_until_ready(f()) for f in fns], repeats, warmup=2)]


def rows_section(args) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    h = args.hidden
    rng = np.random.default_rng(0)

    def rmsnorm(x, w):  # RMSNorm's arithmetic, reducing whatever shape it is given
        return w * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    fns = {"mean of squares": jax.jit(lambda x, w: jnp.mean(x * x, axis=-1)),
           "RMSNorm fwd+bwd": jax.jit(jax.grad(lambda x, w: jnp.sum(rmsnorm(x, w) ** 2),
                                               argnums=(0, 1)))}
    cases = [  # (data, [shape, ...] of one comparison: N-D, the 2-D rows view, batch 4)
        ("[1, 1024, H] over the last axis", [(1, 1024, h), (1024, h), (4, 256, h)]),
        ("[1, 2, H, 1024] over the last axis", [(1, 2, h, 1024), (2 * h, 1024),
                                                (2, h, 1024)]),
    ]
    lines = ["### Reductions with a leading axis of size 1 (`layers.rows`)", "",
             "| what | data | shape reduced | ms | ÷ 2-D rows view |", "|---|---|---|---:|---:|"]
    for what, fn in fns.items():
        for label, shapes in cases:
            xs = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
            w = jnp.ones((shapes[0][-1],), jnp.float32)
            times = _ms([lambda x=x, fn=fn, w=w: fn(x, w) for x in xs], args.repeats)
            for shape, t in zip(shapes, times):
                lines.append(f"| {what} | {label} | `{list(shape)}` | {t:.3f} | "
                             f"{t / times[1]:.2f} |")
    return lines


def project_section(args) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kdjax.models import layers

    h, m = args.hidden, args.intermediate
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 256, h)), jnp.float32)
    ws = [jnp.asarray(rng.normal(size=s) * 0.02, jnp.float32) for s in ((h, m), (h, m), (m, h))]

    def mlp(proj):
        def loss(ws, x):
            gate, up, down = ws
            y = proj("blm,mh->blh", jax.nn.silu(proj("blh,hm->blm", x, gate))
                     * proj("blh,hm->blm", x, up), down)
            return jnp.sum(y * y)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    forms = [("`jnp.einsum` on `[B, L, H]`", mlp(jnp.einsum)),
             ("`layers.project` (2-D matmuls)", mlp(layers.project))]
    times = _ms([lambda f=f: f(ws, x) for _, f in forms], args.repeats)
    lines = ["### SwiGLU MLP forward+backward, `[4, 256, H]` (`layers.project`)", "",
             "| projections by | ms | ÷ `layers.project` |", "|---|---:|---:|"]
    for (name, _), t in zip(forms, times):
        lines.append(f"| {name} | {t:.2f} | {t / times[1]:.2f} |")
    return lines


def run(args, argv) -> int:
    if args.single_thread:
        bc.single_thread()
    if args.quick:
        args.repeats = 10
    lines = ["## Layers (`benchmarks/layers.py`)", "",
             f"Command: `{bc.command('layers.py', argv)}`", "",
             f"{bc.machine()}; {bc.threads()} core(s) for XLA; H = {args.hidden}, SwiGLU "
             f"inner size {args.intermediate}; float32; median of {args.repeats} interleaved "
             "calls after 2 warm-up calls.", "",
             *rows_section(args), "", *project_section(args), ""]
    bc.write("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
