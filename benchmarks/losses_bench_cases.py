"""The measurements of benchmarks/losses.py: one row per (section, kernel, shape)."""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp
import losses_baselines as base
import numpy as np
from tqdm import tqdm

from kdjax import losses as L

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
F32 = jnp.float32
KERNEL_KW = {"jsd": {"beta": 0.5}, "skew_forward_kl": {"alpha": 0.1},
             "skew_reverse_kl": {"alpha": 0.1}, "adaptive_kl": {"mu": 0.5},
             "alpha_beta_divergence": {"alpha": 0.5, "beta": 0.5}}


def inputs(n, h, v, dtype, *, teacher_h=None, seed=0):
    """hidden [N,H] ~ N(0,1), lm_head [H,V] ~ N(0,1/H) (unit-scale logits), teacher [N,V]."""
    k = jax.random.split(jax.random.key(seed), 5)
    dt = DTYPES[dtype]
    out = dict(h=jax.random.normal(k[0], (n, h), F32).astype(dt),
               w=(jax.random.normal(k[1], (h, v), F32) / math.sqrt(h)).astype(dt))
    if teacher_h:
        out["ht"] = jax.random.normal(k[2], (n, teacher_h), F32).astype(dt)
        out["wt"] = (jax.random.normal(k[3], (teacher_h, v), F32) * 2 / math.sqrt(teacher_h)
                     ).astype(dt)
    else:
        out["t"] = (2.0 * jax.random.normal(k[4], (n, v), F32)).astype(dt)
    return out


def jax_case(loss_fn, args, *, max_bytes, run=True, argnums=(0, 1)):
    """Compile fwd+bwd of a scalar loss: {"temp": bytes, "call": fn | None (not run)}."""
    fn = jax.jit(jax.value_and_grad(loss_fn, argnums))
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    call = None if not run or temp > max_bytes else (
        lambda: float(jax.block_until_ready(compiled(*args))[0]))
    return {"temp": temp, "call": call}


def torch_case(step, arrays, *, est_bytes, max_bytes):
    if not base.torch_available() or est_bytes > max_bytes:
        return {"temp": None, "call": None}
    import torch

    tensors = [torch.from_numpy(np.array(a.astype(F32))).to(
        torch.bfloat16 if a.dtype == jnp.bfloat16 else torch.float32) for a in arrays]
    return {"temp": None, "call": lambda: float(step(*tensors)[0])}


def matmul_cases(n, h, v, dtype):
    """[m,H]@[H,V] matmuls (f32 accumulation) for m in {256, 1024, min(N, 4096)}: the
    peak's yardstick is the fastest of them (smaller row blocks can run faster on a CPU,
    and the fused kernel's chunks are such blocks)."""
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32))
    cases = []
    for m in sorted({256, 1024, min(n, 4096)}):
        d = inputs(m, h, v, dtype)
        cases.append({"flops": 2 * m * h * v, "call": lambda d=d: float(
            jax.block_until_ready(mm(d["h"], d["w"]))[0, 0])})
    return cases


def measure(cases, repeats):
    """Warm up every case, then time them round-robin (load drifts hit all alike).

    Sets "time" (median seconds) and "value" (the loss) on each runnable case, and
    "best" (fastest run) for the peak yardstick.
    """
    live = [c for c in cases if c.get("call")]
    for c in live:
        c["value"], c["times"] = c["call"](), []
    for _ in range(repeats):
        for c in live:
            t0 = time.perf_counter()
            c["call"]()
            c["times"].append(time.perf_counter() - t0)
    for c in live:
        c["time"], c["best"] = statistics.median(c["times"]), min(c["times"])
    return cases


def naive_kl(h, w, t):
    return jnp.mean(L.forward_kl(jnp.dot(h, w, preferred_element_type=F32), t))


def fused_loss(divergence, mode, chunk, **kw):
    def f(h, w, t):
        return L.fused_distill(h, w, t, divergence=divergence, grad_mode=mode,
                                  chunk_size=chunk, **kw)[0].mean()
    return f


def _row(section, name, shape, case, flops=None, note=""):
    return dict(section=section, name=name, **shape, time=case.get("time"),
                temp=case.get("temp"), value=case.get("value"), flops=flops, note=note)


def grid_tasks(args, peaks):
    tasks = []
    for dtype in args.dtype:
        for h in args.h:
            for v in args.v:
                for n in args.n:
                    tasks.append(lambda n=n, h=h, v=v, dtype=dtype: _grid_point(
                        args, peaks, n, h, v, dtype))
    return tasks


def _grid_point(args, peaks, n, h, v, dtype):
    shape = dict(N=n, H=h, V=v, dtype=dtype)
    run = all(sel is None or x in sel for x, sel in (
        (n, args.run_n), (h, getattr(args, "run_h", None)), (v, getattr(args, "run_v", None)),
        (dtype, getattr(args, "run_dtype", None))))
    mx = args.max_gib * 2**30
    # memory-only points are compiled from shapes: no [N, V] teacher is allocated
    d = inputs(n, h, v, dtype) if run else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), jax.eval_shape(
            lambda: inputs(n, h, v, dtype)))
    a = (d["h"], d["w"], d["t"])
    cases = {"naive JAX": jax_case(naive_kl, a, max_bytes=mx, run=run)}
    for mode in args.grad_modes:
        name = "fused" if mode == "forward" else "fused (recompute)"
        cases[name] = jax_case(fused_loss("forward_kl", mode, args.chunk_size), a,
                               max_bytes=mx, run=run)
    if not args.no_torch and run:
        cases["torch eager"] = torch_case(base.torch_kl_step, a, est_bytes=4 * n * v * 4,
                                          max_bytes=mx)
    yardsticks = matmul_cases(n, h, v, dtype) if run else []
    measure([*cases.values(), *yardsticks], args.repeats)
    for peak in yardsticks:
        gf = peak["flops"] / peak["best"] / 1e9
        peaks[(h, v, dtype)] = max(peaks.get((h, v, dtype), 0.0), gf)
    return [_row("grid", name, shape, c, 6 * n * h * v) for name, c in cases.items()]


def _section(section, shape, cases, repeats, flops=None):
    measure(list(cases.values()), repeats)
    return [_row(section, name, shape, c, flops) for name, c in cases.items()]


def jsd_rows(args, peaks):
    n, h, v, dtype = args.compare_n, args.h[0], args.v[0], args.dtype[0]
    d = inputs(n, h, v, dtype)
    a, mx = (d["h"], d["w"], d["t"]), args.max_gib * 2**30

    def naive(h_, w_, t_):
        return jnp.mean(L.jsd(jnp.dot(h_, w_, preferred_element_type=F32), t_, beta=0.5))

    cases = {"naive JAX jsd": jax_case(naive, a, max_bytes=mx),
             "fused jsd": jax_case(fused_loss("jsd", "forward", args.chunk_size, beta=0.5), a,
                                   max_bytes=mx)}
    if not args.no_torch:
        cases["TRL generalized_jsd_loss (torch)"] = torch_case(
            base.trl_jsd_step, a, est_bytes=8 * n * v * 4, max_bytes=mx)
    return _section("jsd", dict(N=n, H=h, V=v, dtype=dtype), cases, args.repeats,
                    6 * n * h * v)


def head_rows(args, peaks):
    n, h, v, dtype = args.compare_n, args.h[0], args.v[0], args.dtype[0]
    d = inputs(n, h, v, dtype, teacher_h=h)
    a, mx = (d["h"], d["w"], d["ht"], d["wt"]), args.max_gib * 2**30
    chunk = args.chunk_size or 128  # EasyDeL's default chunk: equal logit-chunk memory

    def fused(c):
        def f(h_, w_, ht_, wt_):
            return L.fused_distill(h_, w_, L.TeacherHead(ht_, wt_), chunk_size=c)[0].mean()
        return f

    def easydel(h_, w_, ht_, wt_):
        return base.easydel_chunked_kl(h_, w_, ht_, wt_, chunk_size=chunk)

    cases = {f"fused TeacherHead (chunk {chunk})": jax_case(fused(chunk), a, max_bytes=mx),
             f"fused TeacherHead (chunk {chunk // 2})": jax_case(fused(chunk // 2), a,
                                                                 max_bytes=mx),
             f"EasyDeL-style chunked (remat, {chunk})": jax_case(easydel, a, max_bytes=mx)}
    return _section("head", dict(N=n, H=h, V=v, dtype=dtype), cases, args.repeats,
                    8 * n * h * v)


def kernel_rows(args, peaks):
    n, v = args.kernel_n, args.kernel_v
    k = jax.random.split(jax.random.key(1), 3)
    s = jax.random.normal(k[0], (n, v), F32)
    t = 2.0 * jax.random.normal(k[1], (n, v), F32)
    ids = jax.random.randint(k[2], (n, 64), 0, v)
    fns = {name: (lambda s_, t_, name=name: jnp.mean(
        L.divergence(name, s_, t_, **KERNEL_KW.get(name, {})))) for name in L.DIVERGENCES}
    fns["cross_entropy"] = lambda s_, t_: jnp.mean(L.cross_entropy(s_, ids[:, 0]))
    fns["sparse_forward_kl (K=64)"] = lambda s_, t_: jnp.mean(L.sparse_forward_kl(
        s_, ids, jnp.take_along_axis(jax.nn.log_softmax(t_), ids, -1)))
    fns["sampled_forward_kl (U=64)"] = lambda s_, t_: jnp.mean(L.sampled_forward_kl(
        s_, ids, jnp.ones_like(ids), num_samples=64))
    mx = args.max_gib * 2**30
    cases = {name: jax_case(fn, (s, t), max_bytes=mx, argnums=0) for name, fn in fns.items()}
    return _section("kernels", dict(N=n, H=0, V=v, dtype="f32"), cases, args.repeats)


def run_all(args, on_progress=None):
    """Runs the selected sections with a progress bar; returns (rows, matmul peaks).

    `on_progress(rows, peaks)` is called after each task (partial results on disk).
    """
    peaks: dict = {}
    tasks = grid_tasks(args, peaks) if "grid" in args.sections else []
    for name, fn in (("jsd", jsd_rows), ("head", head_rows), ("kernels", kernel_rows)):
        if name in args.sections:
            tasks.append(lambda fn=fn: fn(args, peaks))
    rows = []
    for task in tqdm(tasks, desc="bench losses", unit="case"):
        rows.extend(task())
        if on_progress:
            on_progress(rows, peaks)
    return rows, peaks
