"""A small parser of compiled HLO text: instructions, computations, types, call counts.

`Module(text)` reads the instruction lines `%name = TYPE op(operands), attrs` of every
computation of `compiled.as_text()`, keeps a table of each name's type (operands print as
bare names) and the call graph, so `Module.counts` says how many times each computation
runs per execution of the entry (`while` bodies × their trip counts).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from functools import cached_property

# bits per element of HLO primitive types (sub-byte types round up per element)
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16,
         "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64,
         "c64": 64, "c128": 128, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
                      r"branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a dense `dtype[shape]` HLO array (no layout padding or tiling)."""
    return (_BITS.get(dtype, 32) * math.prod(shape) + 7) // 8


def _arrays(type_text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """`f32[8,4]{1,0}` or a tuple type → ((dtype, shape), ...); comments are skipped."""
    type_text = re.sub(r"/\*.*?\*/", "", type_text)
    return tuple((d, tuple(int(s.replace("<=", "")) for s in dims.split(",") if s))
                 for d, dims in _ARRAY.findall(type_text) if d in _BITS)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at `text[start]`."""
    depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
    closing = set(pairs.values())
    for i in range(start, len(text)):
        if text[i] in pairs:
            depth += 1
        elif text[i] in closing:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: `name = types op(operands), attrs` inside `computation`."""

    name: str
    computation: str
    op: str
    types: tuple[tuple[str, tuple[int, ...]], ...]
    operands: tuple[str, ...]
    attrs: str
    args: str = ""

    @property
    def op_name(self) -> str:
        """The JAX source op (`metadata={op_name=...}`), for telling where it came from."""
        m = _OP_NAME.search(self.attrs)
        return m.group(1) if m else ""


def _parse_instruction(line: str, computation: str) -> Instruction | None:
    m = _DEF.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):  # tuple type
        end = _balanced(rest, 0)
    else:
        brace = rest.find("{")
        space = rest.find(" ")
        end = space if brace < 0 or brace > space else _balanced(rest, brace)
    type_text, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    op = rest[:paren].strip()
    close = _balanced(rest, paren)
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[paren:close]))
    return Instruction(name, computation, op, _arrays(type_text), operands, rest[close:],
                       rest[paren + 1:close - 1])


class Module:
    """An HLO module's text, parsed into computations, instructions and call counts."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry: str | None = None
        current = None
        for line in text.splitlines():
            header = _HEADER.match(line)
            if header:
                current = header.group(2)
                self.computations[current] = []
                if header.group(1):
                    self.entry = current
                continue
            if current is None:
                continue
            inst = _parse_instruction(line, current)
            if inst is not None:
                self.computations[current].append(inst)
        self.defs = {i.name: i for insts in self.computations.values() for i in insts}

    def operand_types(self, inst: Instruction) -> tuple[tuple[str, tuple[int, ...]], ...]:
        out = ()
        for name in inst.operands:
            if name in self.defs:
                out += self.defs[name].types
        return out

    def trip_count(self, inst: Instruction) -> int | None:
        """Iterations of a `while`: XLA's known_trip_count, else `i < constant` in the
        condition (the counted loops of scan / fori_loop), else None."""
        m = _TRIP.search(inst.attrs)
        if m:
            return int(m.group(1))
        cond = re.search(r"condition=%?([\w.\-]+)", inst.attrs)
        body = self.computations.get(cond.group(1), []) if cond else []
        consts = {i.name: i.args for i in body if i.op == "constant"
                  and re.fullmatch(r"-?\d+", i.args.strip())}
        for i in body:
            if i.op == "compare" and "direction=LT" in i.attrs:
                for operand in i.operands:
                    if operand in consts:
                        return int(consts[operand])
        return None

    def _calls(self, comp: str) -> list[tuple[str, int]]:
        """(callee, times per execution of `comp`) for each call site in `comp`."""
        out = []
        for inst in self.computations.get(comp, ()):
            trips = (self.trip_count(inst) or 1) if inst.op == "while" else 1
            for kind, names in _CALLEES.findall(inst.attrs):
                n = trips if kind in ("body", "condition") else 1
                out += [(c, n) for c in re.findall(r"[\w.\-]+", names)
                        if c in self.computations]
        return out

    @cached_property
    def counts(self) -> dict[str, int]:
        """Executions of each computation per run of the entry (loops multiply)."""
        calls = {c: self._calls(c) for c in self.computations}
        callers = {c: 0 for c in self.computations}
        for edges in calls.values():
            for callee, _ in edges:
                callers[callee] += 1
        # Kahn's order (HLO call graphs are acyclic): a computation's count is final
        # once every caller has added to it
        counts = {c: 0 for c in self.computations}
        if self.entry:
            counts[self.entry] = 1
        ready = [c for c, n in callers.items() if n == 0]
        while ready:
            comp = ready.pop()
            for callee, n in calls[comp]:
                counts[callee] += counts[comp] * n
                callers[callee] -= 1
                if callers[callee] == 0:
                    ready.append(callee)
        return counts

    @cached_property
    def unknown_loops(self) -> int:
        """`while` loops whose trip count could not be read (counted once)."""
        return sum(1 for insts in self.computations.values() for i in insts
                   if i.op == "while" and self.trip_count(i) is None)

    def count(self, inst: Instruction) -> int:
        return self.counts.get(inst.computation, 1)


