"""Tables, target checks and the plot for benchmarks/losses.py."""

from __future__ import annotations

import datetime
import os
import platform

import jax

MIB = 2**20
SECTION_TITLES = {
    "grid": "Naive vs fused distillation (forward KL), fwd+bwd",
    "jsd": "Generalized JSD (β = 0.5), fwd+bwd",
    "head": "Online teacher (TeacherHead) vs EasyDeL-style chunked loss, fwd+bwd",
    "kernels": "Per-token dense kernels (kdjax.losses), fwd+bwd w.r.t. student logits",
}


def _fmt_time(t):
    return "—" if t is None else f"{t * 1e3:,.0f}" if t >= 0.1 else f"{t * 1e3:.1f}"


def _fmt_mib(b):
    return "—" if b is None else f"{b / MIB:,.0f}"


def _gflops(row):
    if row["time"] is None or not row["flops"]:
        return None
    return row["flops"] / row["time"] / 1e9


def table(rows, peaks, section):
    head = "| kernel | N | H | V | dtype | time (ms) | temp (MiB) | GFLOP/s | % peak | loss |"
    lines = [head, "|" + "---|" * 10]
    for r in (r for r in rows if r["section"] == section):
        g = _gflops(r)
        peak = peaks.get((r["H"], r["V"], r["dtype"]))
        pct = "—" if g is None or not peak else f"{100 * g / peak:.0f}%"
        value = "—" if r["value"] is None else f"{r['value']:.5f}"
        lines.append(f"| {r['name']} | {r['N']} | {r['H'] or '—'} | {r['V']} | {r['dtype']} | "
                     f"{_fmt_time(r['time'])} | {_fmt_mib(r['temp'])} | "
                     f"{'—' if g is None else f'{g:.1f}'} | {pct} | {value} |")
    return "\n".join(lines)


def _find(rows, section, name, **shape):
    for r in rows:
        if r["section"] == section and r["name"] == name and all(
                r[k] == v for k, v in shape.items()):
            return r
    return None


def _ratio(a, b, key="time"):
    if a is None or b is None or a[key] is None or b[key] is None or not b[key]:
        return None
    return a[key] / b[key]


def target_lines(rows, peaks):
    """The issue's targets, checked on the rows that were measured."""
    out = []
    for f in (r for r in rows if r["section"] == "grid" and r["name"] == "fused"):
        shape = {k: f[k] for k in ("N", "H", "V", "dtype")}
        naive = _find(rows, "grid", "naive JAX", **shape)
        torch_ = _find(rows, "grid", "torch eager", **shape)
        tag = f"N={f['N']} H={f['H']} V={f['V']} {f['dtype']}"
        mem = _ratio(f, naive, "temp")
        parts = [f"fused/naive temp memory = {mem:.1%} (target ≤ 10%)" if mem else None]
        tr = _ratio(f, naive)
        parts.append(f"fused/naive time = {tr:.2f}× (target ≤ 0.9×)" if tr else None)
        tt = _ratio(torch_, f)
        parts.append(f"torch/fused time = {tt:.2f}× (target ≥ 1.5×)" if tt else None)
        g, peak = _gflops(f), peaks.get((f["H"], f["V"], f["dtype"]))
        parts.append(f"fused at {100 * g / peak:.0f}% of the measured matmul peak "
                     f"{peak:.0f} GFLOP/s (target ≥ 70%)" if g and peak else None)
        parts = [p for p in parts if p]
        if parts:
            out.append(f"- {tag}: " + "; ".join(parts))
    groups: dict = {}
    for r in rows:
        if r["section"] == "grid" and r["name"] == "fused":
            groups.setdefault((r["H"], r["V"], r["dtype"]), []).append((r["N"], r["temp"]))
    for (h, v, dtype), fused_mem in groups.items():
        if len(fused_mem) < 2:
            continue
        (n0, m0), (n1, m1) = min(fused_mem), max(fused_mem)
        out.append(f"- fused temp memory H={h} V={v} {dtype}, N={n0} → N={n1}: "
                   f"{m0 / MIB:,.0f} → {m1 / MIB:,.0f} MiB (+{(m1 - m0) / MIB:,.0f} MiB; a term "
                   f"in N·V would add {(n1 - n0) * v * 4 / MIB:,.0f} MiB per f32 [N,V] array)")
    jt = _ratio(_find(rows, "jsd", "TRL generalized_jsd_loss (torch)"),
                _find(rows, "jsd", "fused jsd"))
    jn = _ratio(_find(rows, "jsd", "TRL generalized_jsd_loss (torch)"),
                _find(rows, "jsd", "naive JAX jsd"))
    if jt:
        out.append(f"- JSD: TRL/fused time = {jt:.2f}× (target ≥ 3×); TRL/naive JAX = "
                   f"{jn:.2f}×" if jn else f"- JSD: TRL/fused time = {jt:.2f}× (target ≥ 3×)")
    ed = next((r for r in rows if r["name"].startswith("EasyDeL-style")), None)
    for fh in (r for r in rows if r["name"].startswith("fused TeacherHead")):
        ht, hm = _ratio(ed, fh), _ratio(fh, ed, "temp")
        if ht:
            out.append(f"- {fh['name']}: EasyDeL-style/fused time = {ht:.2f}× (target ≥ 1.5×); "
                       f"fused/EasyDeL temp memory = {hm:.2f}× (target ≤ 1); loss "
                       f"{fh['value']:.6f} vs {ed['value']:.6f}")
    return out


def _first(rows, key):
    return next(r[key] for r in rows if r["section"] == "grid")


def markdown(rows, peaks, args, argv):
    """The `## Loss kernels` section for benchmarks/README.md (results/losses*.md)."""
    cmd = "python benchmarks/losses.py " + " ".join(argv)
    ran = sorted({(r["N"], r["H"], r["V"], r["dtype"]) for r in rows
                  if r["section"] == "grid" and r["time"] is not None})
    ran = ", ".join(f"N={n} H={h} V={v} {d}" for n, h, v, d in ran) or "none"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "## Loss kernels" + (" (quick)" if args.quick else ""), "",
        f"Command: `{cmd.strip()}` (same as `kdjax bench {' '.join(['losses', *argv])}`)", "",
        f"Machine: {environment()}; load average when the report was written {load} "
        "(1/5/15 min; about 2 is this benchmark alone, more means other jobs shared the CPU "
        "and absolute times are noisy). Every ratio below compares rows measured in the same "
        f"run. Median of {args.repeats} runs after a warm-up. Timed grid points: {ran}; "
        "other points report compiled memory only. Memory = XLA compiled temp size "
        "(`memory_analysis()`); torch rows have no compiled memory. GFLOP/s counts the "
        "6·N·H·V matmul FLOPs (+2·N·H_t·V for the online teacher).",
        "", "![time and memory vs N](" + args.out.with_suffix(".png").name + ")",
    ]
    for section, title in SECTION_TITLES.items():
        if any(r["section"] == section for r in rows):
            lines += ["", f"### {title}", "", table(rows, peaks, section)]
    if peaks:
        lines += ["", "Matmul peak (fastest [m,H]@[H,V] dot, m ∈ {256, 1024, min(N, 4096)}, "
                  "best of runs, same process): " + ", ".join(
            f"H={h} V={v} {d}: {p:.0f} GFLOP/s" for (h, v, d), p in sorted(peaks.items()))]
    lines += ["", "### Summary vs the issue's targets", "", *(target_lines(rows, peaks) or ["-"])]
    return "\n".join(lines) + "\n"


def console(rows, peaks):
    lines = []
    for section, title in SECTION_TITLES.items():
        if any(r["section"] == section for r in rows):
            lines += ["", f"## {title}", table(rows, peaks, section)]
    lines += ["", "## Summary vs the issue's targets", *(target_lines(rows, peaks) or ["-"])]
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["section"] == "grid"]
    if not grid:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["name"], r["H"], r["V"], r["dtype"]) for r in grid})
    for name, h, v, dtype in keys:
        pts = sorted((r["N"], r["time"], r["temp"]) for r in grid
                     if (r["name"], r["H"], r["V"], r["dtype"]) == (name, h, v, dtype))
        label = f"{name} H={h} V={v} {dtype}"
        timed = [(n, t) for n, t, _ in pts if t is not None]
        if timed:
            ax_t.plot(*zip(*timed), marker="o", label=label)
        mem = [(n, m / MIB) for n, _, m in pts if m is not None]
        if mem:
            ax_m.plot(*zip(*mem), marker="o", label=label)
    ax_t.set(xlabel="tokens N", ylabel="fwd+bwd time (s, median)", xscale="log", yscale="log",
             title="time vs N")
    ax_m.set(xlabel="tokens N", ylabel="compiled temp memory (MiB)", xscale="log",
             yscale="log", title="memory vs N (XLA memory_analysis)")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> str:
    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "not installed"
    return (f"{platform.platform()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
            f"({jax.default_backend()}), torch {tv}, "
            f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
