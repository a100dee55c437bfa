"""Costs of a compiled per-device program read from its HLO: dot/convolution FLOPs and HBM
bytes moved, each instruction counted as often as it runs (loop trip counts multiplied in;
XLA's `cost_analysis()` counts loop bodies once)."""

from __future__ import annotations

import math
import re

from kdjax.compile.hlo_module import _CALLEES, Instruction, Module, nbytes


def _window(attrs: str, n: int) -> list[dict[str, tuple[int, ...]]]:
    """Per spatial dimension {size, pad (lo, hi), stride, lhs_dilate, rhs_dilate}."""
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(re.findall(r"(\w+)=([\d_x]+)", m.group(1))) if m else {}

    def per_dim(name, default):
        raw = fields.get(name)
        return [tuple(int(v) for v in part.split("_")) for part in raw.split("x")] if raw \
            else [default] * n

    pads, strides = per_dim("pad", (0, 0)), per_dim("stride", (1,))
    lhs_d, rhs_d = per_dim("lhs_dilate", (1,)), per_dim("rhs_dilate", (1,))
    return [dict(pad=pads[i], stride=strides[i][0], lhs_dilate=lhs_d[i][0],
                 rhs_dilate=rhs_d[i][0]) for i in range(n)]


def _taps(size_in: int, size_win: int, size_out: int, w: dict) -> int:
    """(output position, window tap) pairs of one spatial dimension that land on input
    data rather than padding: windowed einsums pad heavily, so full windows overcount."""
    total, s, rd, ld = 0, w["stride"], w["rhs_dilate"], w["lhs_dilate"]
    last = (size_in - 1) * ld
    for k in range(size_win):
        lo, hi = w["pad"][0] - k * rd, w["pad"][0] - k * rd + last  # need lo <= p·s <= hi
        first, final = max(0, -(-lo // s)), min(size_out - 1, hi // s)
        total += max(0, final - first + 1)
    return max(1, total // ld) if total else 0


def _conv_flops(module: Module, inst: Instruction) -> float:
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
    operands = module.operand_types(inst)
    if not labels or len(operands) < 2 or not inst.types:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs, rhs, out = operands[0][1], operands[1][1], inst.types[0][1]
    if (len(lhs), len(rhs), len(out)) != (len(lhs_l), len(rhs_l), len(out_l)):
        return 0.0
    spatial = sorted(c for c in out_l if c.isdigit())
    windows = _window(inst.attrs, len(spatial))
    flops = 2.0 * math.prod(out[i] for i, c in enumerate(out_l) if not c.isdigit())
    flops *= math.prod(rhs[i] for i, c in enumerate(rhs_l) if c == "i")
    for d, w in zip(spatial, windows):
        flops *= _taps(lhs[lhs_l.index(d)], rhs[rhs_l.index(d)], out[out_l.index(d)], w)
    return flops


def _dot_flops(module: Module, inst: Instruction) -> float:
    if inst.op == "convolution":
        return _conv_flops(module, inst)
    operands = module.operand_types(inst)
    if not inst.types or len(operands) < 2:
        return 0.0
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    dims = [int(d) for d in m.group(1).split(",") if d] if m else []
    return 2.0 * math.prod(inst.types[0][1]) * math.prod(operands[0][1][d] for d in dims)


def dot_flops(hlo_text: str | Module) -> float:
    """Per-device FLOPs of every dot and convolution (2 per multiply-add), each counted as
    often as it runs (loop trip counts multiplied in). Elementwise work is left out; it
    is small next to the matmuls of a transformer step. Includes rematerialized work."""
    module = hlo_text if isinstance(hlo_text, Module) else Module(hlo_text)
    return sum(_dot_flops(module, i) * module.count(i)
               for insts in module.computations.values() for i in insts
               if i.op in ("dot", "convolution"))


# ops that move no HBM bytes of their own (views, control flow, bookkeeping)
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id",
               "opt-barrier", "add-dependency", "domain"}


# custom calls that are compute kernels XLA cannot see into (Pallas/Mosaic on TPU, Triton
# and cuDNN on GPU): their FLOPs are not in `dot_flops`
_KERNELS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "__cudnn$")


def opaque_kernels(hlo_text: str | Module) -> dict[str, int]:
    """{kernel name: executions per step} of custom-call compute kernels (e.g. splash
    attention), whose FLOPs `dot_flops` cannot count."""
    module = hlo_text if isinstance(hlo_text, Module) else Module(hlo_text)
    out: dict[str, int] = {}
    for insts in module.computations.values():
        for inst in insts:
            target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
            if inst.op == "custom-call" and target and target.group(1).startswith(_KERNELS):
                name = re.sub(r"(\.\d+)+$", "", inst.name)
                out[name] = out.get(name, 0) + module.count(inst)
    return out


def _fused(module: Module) -> set[str]:
    """Computations that run inside another instruction (fusion bodies, reducers)."""
    out = set()
    for insts in module.computations.values():
        for inst in insts:
            for kind, names in _CALLEES.findall(inst.attrs):
                if kind == "to_apply" and inst.op == "call":
                    continue
                # calls, async calls and async collectives run real (unfused) programs
                control = inst.op in ("call", "call-start") or inst.op.startswith("async")
                if kind in ("calls", "to_apply") and not control:
                    out.update(re.findall(r"[\w.\-]+", names))
    return out


_SLICES = ("dynamic-slice", "slice", "gather")


_VIEWS = ("bitcast", "reshape", "copy", "transpose", "convert")


def _uses(body: list[Instruction], name: str) -> list[tuple[str, Instruction]]:
    """(the value used, its user) for every use of `name`, looking through views (bitcast,
    reshape, …) so a slice of a reshaped parameter still counts as a slice of it."""
    out = []
    for inst in body:
        if name not in inst.operands:
            continue
        if inst.op in _VIEWS:
            out += _uses(body, inst.name) or [(name, inst)]
        else:
            out.append((name, inst))
    return out


def _read_bytes(body: list[Instruction], param: Instruction, full: int) -> int:
    """Bytes a fused computation reads of one parameter: only the slices it takes when
    every use is a slice (a layer's weights out of the stacked array), none when it is
    only the in-place target of dynamic-update-slices, else the whole parameter."""
    uses = _uses(body, param.name)
    if uses and all(u.op in _SLICES and u.operands[0] == v for v, u in uses):
        return sum(nbytes(d, sh) for _, u in uses for d, sh in u.types)
    if uses and all(u.op == "dynamic-update-slice" and u.operands[0] == v for v, u in uses):
        return 0
    return full


def _written_bytes(module: Module, body: list[Instruction], root: Instruction) -> int:
    """Bytes a computation's root writes: the update of an in-place dynamic-update-slice
    (also behind views such as a bitcast)."""
    parts = [module.defs.get(n) for n in root.operands] if root.op == "tuple" else [root]
    total = 0
    for part in parts:
        while part is not None and part.op in _VIEWS and part.operands:
            inner = module.defs.get(part.operands[0])
            if inner is None or inner.op not in (*_VIEWS, "dynamic-update-slice"):
                break
            part = inner
        if part is None:
            continue
        if part.op == "dynamic-update-slice" and len(part.operands) > 1:
            total += sum(nbytes(d, s) for d, s in module.defs[part.operands[1]].types)
        else:
            total += sum(nbytes(d, s) for d, s in part.types)
    return total


def _instruction_traffic(module: Module, inst: Instruction) -> int:
    operands = [module.defs[n] for n in inst.operands if n in module.defs]
    if inst.op in _SLICES:
        return 2 * sum(nbytes(d, s) for d, s in inst.types)
    if inst.op == "dynamic-update-slice" and len(operands) > 1:
        return 2 * sum(nbytes(d, s) for d, s in operands[1].types)
    called = re.search(r"calls=%?([\w.\-]+)", inst.attrs)
    body = module.computations.get(called.group(1), []) if called and \
        inst.op == "fusion" else []
    if not body:
        return sum(nbytes(d, s) for d, s in inst.types) + sum(
            nbytes(d, s) for o in operands for d, s in o.types)
    params = {int(i.args): i for i in body if i.op == "parameter" and i.args.isdigit()}
    read = sum(_read_bytes(body, params[j], sum(nbytes(d, s) for d, s in o.types))
               if j in params else sum(nbytes(d, s) for d, s in o.types)
               for j, o in enumerate(operands))
    return read + _written_bytes(module, body, body[-1])


def traffic_top(hlo_text: str | Module, n: int = 5) -> list[dict]:
    """The `n` source ops (JAX op names) that move the most HBM bytes per step."""
    module = hlo_text if isinstance(hlo_text, Module) else Module(hlo_text)
    fused, by_op = _fused(module), {}
    for comp, insts in module.computations.items():
        if comp in fused:
            continue
        for inst in insts:
            if inst.op not in _NO_TRAFFIC and not inst.op.endswith("-done"):
                key = inst.op_name or inst.op
                by_op[key] = by_op.get(key, 0) + _instruction_traffic(module, inst) * \
                    module.counts.get(comp, 1)
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:n]
    return [{"op_name": k, "bytes": float(v)} for k, v in top]


def traffic_bytes(hlo_text: str | Module, *, loops: bool = True) -> float:
    """Per-device HBM bytes moved: every unfused instruction reads its operands and writes
    its result (slices and in-place dynamic-update-slices only their part), counted as
    often as it runs. A rough model (caches and aliasing ignored) of XLA's "bytes
    accessed", which counts loop bodies once — as this does with `loops=False`."""
    module = hlo_text if isinstance(hlo_text, Module) else Module(hlo_text)
    fused = _fused(module)
    total = 0.0
    for comp, insts in module.computations.items():
        if comp in fused:
            continue
        n = module.counts.get(comp, 1) if loops else 1
        for inst in insts:
            if inst.op in _NO_TRAFFIC or inst.op.endswith("-done"):
                continue
            total += _instruction_traffic(module, inst) * n
    return total
