"""Human-readable text of a `kdjax compile` report (the JSON form is the dict itself)."""

from __future__ import annotations

from typing import Any

from kdjax.compile.report import gib

TOP_COLLECTIVES = 8


def _g(n: float | None) -> str:
    return "-" if n is None else gib(n)


def _where(op_name: str, width: int = 60) -> str:
    """The tail of a JAX op name, cut at a path boundary."""
    if len(op_name) <= width:
        return op_name
    tail = op_name[-width:]
    return "…" + tail[tail.find("/"):] if "/" in tail else "…" + tail


def _e(n: float | None) -> str:
    return "-" if n is None else f"{n:.3g}"


def _shape(dtype: str, shape) -> str:
    return f"{dtype}[{','.join(str(s) for s in shape)}]"


def memory_line(r: dict[str, Any]) -> str:
    m = r["memory"]
    parts = [f"{k} {_g(m[k])}" for k in ("params", "opt_state", "teacher_params", "batch",
                                         "temporaries", "outputs_not_aliased",
                                         "generated_code") if m.get(k)]
    limit = r.get("hbm_bytes")
    of = (f" of {_g(limit)} HBM ({100 * m['total'] / limit:.0f}%)" if limit
          else " (no HBM limit known for these devices)")
    return f"  memory/device: {', '.join(parts)} → total {_g(m['total'])}{of}"


def flops_lines(r: dict[str, Any]) -> list[str]:
    f = r["flops"]
    ratio = f.get("hlo_over_model")
    lines = [f"  FLOPs/device: model {_e(f['model_per_device'])} (global "
             f"{_e(f['model_global'])} ÷ {r['devices']}; student {_e(f['model_student_global'])}"
             f", teacher {_e(f['model_teacher_global'])})",
             f"                compiled dots {_e(f['hlo_per_device'])} (loops × trips; "
             f"{_e(ratio)}× model/device), XLA cost_analysis {_e(f['xla_cost_per_device'])} "
             "(loop bodies once)"]
    if f.get("opaque_kernels"):
        kernels = ", ".join(f"{k} ×{n}" for k, n in f["opaque_kernels"].items())
        lines.append(f"                kernels not counted in compiled dots: {kernels} "
                     "(the roofline adds the model's attention FLOPs for them)")
    if r.get("unknown_loops"):
        lines.append(f"  note: {r['unknown_loops']} loop(s) with unknown trip count counted once")
    return lines


def collective_lines(r: dict[str, Any]) -> list[str]:
    c = r["collectives"]
    if not c["by_kind"]:
        return ["  collectives: none"]
    kinds = ", ".join(f"{k} {int(v['ops'])}× {_g(v['bytes'])}"
                      for k, v in sorted(c["by_kind"].items()))
    lines = [f"  collectives/device/step: {kinds}"]
    for row in c["ops"][:TOP_COLLECTIVES]:
        lines.append(f"    {row['kind']:<18} {_shape(row['dtype'], row['operand_shape'])} → "
                     f"{_shape(row['dtype'], row['shape'])} × {row['count']} "
                     f"({_g(row['bytes'] * row['count'])}, group {row['group_size']}) "
                     f"{_where(row['op_name'])}")
    if len(c["ops"]) > TOP_COLLECTIVES:
        lines.append(f"    … {len(c['ops']) - TOP_COLLECTIVES} more (--json lists all)")
    return lines


def traffic_line(r: dict[str, Any]) -> str:
    top = "; ".join(f"{_g(t['bytes'])} {_where(t['op_name'], 50)}"
                    for t in r.get("hbm_traffic_top", [])[:3])
    return f"  HBM bytes moved/device: {_g(r['hbm_traffic_bytes'])} (largest: {top})"


def roofline_line(r: dict[str, Any]) -> str:
    rf = r.get("roofline")
    if rf is None:
        return "  roofline: peak FLOP/s of these devices unknown (CPU): no MFU estimate"
    mfu = "-" if rf["mfu"] is None else f"{100 * rf['mfu']:.1f}%"
    return (f"  roofline ESTIMATE: compute {rf['compute_s']:.3g} s, HBM {rf['memory_s']:.3g} s,"
            f" collectives {rf['collective_s']:.3g} s → step ≈ {rf['step_s']:.3g} s "
            f"({rf['bound']}-bound), MFU ≈ {mfu}, "
            f"{rf['tokens_per_s_per_device']:,.0f} tokens/s/device")


def render(result: dict[str, Any]) -> str:
    """The text report of `cli.run` results."""
    t = result["target"]
    lines = [f"kdjax compile: {result['config']} for {t['description']}"
             + (f" [{t['topology']}]" if t.get("topology") else "")]
    lines += [f"  {n}" for n in result.get("notes", ())]
    for name, r in result["steps"].items():
        if "skipped" in r:
            lines.append(f"{name} step: skipped ({r['skipped']})")
            continue
        lines.append(f"{name} step: compiled in {r['compile_s']:.1f} s, mesh "
                     + " × ".join(f"{k}={v}" for k, v in r["mesh"].items()))
        lines += [f"  {n}" for n in r.get("notes", ()) if n not in result.get("notes", ())]
        lines.append(memory_line(r))
        lines += flops_lines(r)
        lines += collective_lines(r)
        lines.append(traffic_line(r))
        lines.append(roofline_line(r))
    lines.append(result["summary"])
    return "\n".join(lines)
