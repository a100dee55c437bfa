"""Reading a compiled (SPMD-partitioned) HLO module: collectives, dot FLOPs, loop counts.

`compiled.as_text()` of a jitted step on a mesh is the per-device program, so every shape
here is what ONE device holds. The parser is deliberately small: it reads instruction
lines `%name = TYPE op(operands), attrs` of every computation, keeps a table of each
name's type (operands print as bare names), and the call graph, so an instruction inside a
`while` body counts once per trip (XLA's `cost_analysis()` counts loop bodies once, on CPU
and on TPU alike).

    from kdjax.compile import hlo
    text = jitted.lower(*args).compile().as_text()
    for c in hlo.collectives(text):
        print(c.kind, c.dtype, c.operand_shape, "->", c.shape, c.bytes, "×", c.count)
    hlo.with_dim(hlo.collectives(text), 65536)   # all-gathers that build a 65536 axis
    hlo.dot_flops(text)                            # per-device dot/conv FLOPs × trip counts
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

from kdjax.compile.hlo_cost import dot_flops, opaque_kernels, traffic_bytes, traffic_top
from kdjax.compile.hlo_module import Instruction, Module, nbytes

__all__ = ["KINDS", "Collective", "Instruction", "Module", "by_kind", "collectives",
           "dot_flops", "nbytes", "opaque_kernels", "total_bytes", "traffic_bytes",
           "traffic_top", "with_dim", "with_shape"]

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the per-device program (shapes are per device).

    Attributes:
      kind: one of KINDS.
      dtype: HLO element type, e.g. "bf16".
      shape: result shape; operand_shape: operand shape.
      bytes: bytes of the larger of operand and result (the full-size buffer).
      group_size: devices taking part in each group (None when unreadable).
      count: executions per step (loop trip counts multiplied in).
      name, op_name: HLO instruction name and the JAX op it came from.
    """

    kind: str
    dtype: str
    shape: tuple[int, ...]
    operand_shape: tuple[int, ...]
    bytes: int
    group_size: int | None
    count: int
    name: str
    op_name: str = ""

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per execution with ring algorithms: (n−1)/n of the full
        buffer for gather/scatter/all-to-all, twice that for all-reduce."""
        n = self.group_size or 1
        if self.kind == "collective-permute":
            return float(self.bytes)
        frac = (n - 1) / n if n > 1 else 0.0
        return self.bytes * frac * (2.0 if self.kind == "all-reduce" else 1.0)


def _group_size(attrs: str) -> int | None:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:  # mesh['axis_0'=4,'axis_1'=2] ... {'axis_0'}: product of the named axes
        sizes = dict(re.findall(r"'([\w]+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([\w]+)'", m.group(2)))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)  # iota form [groups,size]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    if "source_target_pairs" in attrs:
        return 2
    return None


def _kind(op: str) -> str | None:
    base = op[:-len("-start")] if op.endswith("-start") else op
    return base if base in KINDS else None


def collectives(hlo_text: str | Module) -> list[Collective]:
    """Every collective in the module, one entry per array (tuple collectives split).

    `*-start` async forms count once (their `-done` is skipped). On TPU a reduce-scatter
    may be a fusion around an all-reduce + dynamic-slice (`all-reduce-scatter*`
    computations): it is reported as a reduce-scatter with the fusion's result shape.
    """
    module = hlo_text if isinstance(hlo_text, Module) else Module(hlo_text)
    out = []
    for comp, insts in module.computations.items():
        root = insts[-1].types if insts else ()
        for inst in insts:
            kind = _kind(inst.op)
            if kind is None:
                continue
            operands = module.operand_types(inst)
            results = inst.types
            if inst.op.endswith("-start") and len(results) >= 2 * len(operands) > 0:
                results = results[len(operands):2 * len(operands)]  # (operands, results, …)
            if kind == "all-reduce" and comp.startswith("all-reduce-scatter") and root:
                kind, results = "reduce-scatter", root
            group, n = _group_size(inst.attrs), module.count(inst)
            for i, (dtype, shape) in enumerate(results):
                op_shape = operands[i][1] if i < len(operands) else shape
                size = max(nbytes(dtype, shape), nbytes(dtype, op_shape))
                out.append(Collective(kind, dtype, shape, op_shape, size, group, n, inst.name,
                                      inst.op_name))
    return out


def with_dim(colls: Iterable[Collective], size: int,
             kinds: Sequence[str] = ("all-gather",)) -> list[Collective]:
    """Collectives of `kinds` whose RESULT has a dimension of `size` that the operand
    lacks, i.e. that build an axis of that size on every device (e.g. the global token
    axis gathered onto each chip)."""
    return [c for c in colls if c.kind in kinds and size in c.shape
            and c.shape.count(size) > c.operand_shape.count(size)]


def with_shape(colls: Iterable[Collective], shape: Sequence[int],
               kinds: Sequence[str] = KINDS) -> list[Collective]:
    """Collectives of `kinds` whose result or operand has exactly `shape`."""
    shape = tuple(shape)
    return [c for c in colls if c.kind in kinds and shape in (c.shape, c.operand_shape)]


def total_bytes(colls: Iterable[Collective], kind: str | None = None) -> int:
    """Σ bytes × count (per device, per step), optionally of one kind."""
    return sum(c.bytes * c.count for c in colls if kind is None or c.kind == kind)


def by_kind(colls: Iterable[Collective]) -> dict[str, dict[str, float]]:
    """{kind: {"ops", "bytes", "wire_bytes"}} per device per step (counts multiplied in)."""
    out: dict[str, dict[str, float]] = {}
    for c in colls:
        row = out.setdefault(c.kind, {"ops": 0, "bytes": 0, "wire_bytes": 0.0})
        row["ops"] += c.count
        row["bytes"] += c.bytes * c.count
        row["wire_bytes"] += c.wire_bytes * c.count
    return out


