"""Compile a lowered step and report per-device memory, FLOPs, collectives and a roofline.

All numbers are PER DEVICE and PER STEP unless named `global`. Three FLOP counts, kept
apart on purpose:

- `model`: the architecture's FLOPs (kdjax.compile.flops), global and ÷ D; MFU uses these.
- `hlo`: dots and convolutions of the compiled per-device program, loop bodies multiplied
  by their trip counts (kdjax.compile.hlo.dot_flops); includes remat and any duplicated
  work, so hlo ≈ model ÷ D (× 4/3 with full remat) when the step divides its work.
- `xla_cost`: `compiled.cost_analysis()["flops"]`, which counts each loop body ONCE (on
  CPU and TPU), so it undercounts scanned layers and chunked losses; shown for reference.

Custom-call kernels (Pallas splash attention on TPU) are opaque to the HLO count; they are
listed in `flops.opaque_kernels`, and `hardware_per_device` = hlo + the model's attention
FLOPs ÷ D when there are any.

The roofline is an ESTIMATE from vendor ceilings (kdjax.compile.chips), not a
measurement, and an upper bound: it ignores vector-unit work, kernel efficiency and
imperfect overlap. compute = max(hardware, model) FLOPs / peak, memory = HBM bytes moved /
HBM bandwidth, collectives = ring bytes sent / ICI bandwidth; step = max(compute, memory) +
collectives (no overlap of communication: pessimistic where XLA overlaps it); MFU = model
FLOPs ÷ D / (step × peak).
"""

from __future__ import annotations

import re
import time
from typing import Any

from kdjax.compile import hlo
from kdjax.compile.steps import Lowered

GIB = 2**30


class DoesNotFit(Exception):
    """A step needs more memory per device than the chip has; `str()` is one line naming
    the overflow and what to change; `report` holds what is known."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


def gib(n: float) -> str:
    """Bytes in the largest unit that keeps 3 digits: "1.23 GiB", "45.6 MiB", "12 KiB"."""
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _advice(part: str, step: str) -> str:
    return {
        "temporaries": "raise micro_batches (gradient accumulation), lower global_batch_size "
                       "or data.seq_len, or set model.remat=full" if step == "train" else
                       "lower the batch size or data.seq_len",
        "params": "shard the parameters: raise mesh.fsdp (or mesh.tensor)",
        "opt_state": "shard the optimizer state: raise mesh.fsdp (or mesh.tensor)",
        "teacher_params": "shard the teacher: raise mesh.fsdp (precompute: --precompute "
                          "mesh=[1,-1,1]) or use a bf16 teacher",
        "batch": "lower global_batch_size or data.seq_len",
    }.get(part, "use more or larger chips")


def overflow_message(step: str, memory: dict, limit: int, chip_name: str) -> str:
    """"per-device memory X > Y of CHIP (train step): largest part; what to change"."""
    parts = {k: memory.get(k, 0) for k in ("temporaries", "params", "opt_state",
                                           "teacher_params", "batch")}
    worst = max(parts, key=parts.get)
    listed = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
    return (f"{step} step: per-device memory {gib(memory['total'])} > {gib(limit)} HBM of "
            f"{chip_name}: {listed}; largest is {worst}: {_advice(worst, step)}")


def precheck(low: Lowered, limit: int | None, chip_name: str) -> None:
    """Refuses before compiling when the inputs alone exceed `limit` bytes per device."""
    if limit is None:
        return
    inputs = sum(low.inputs.values())
    if inputs > limit:
        memory = dict(low.inputs, total=inputs)
        raise DoesNotFit(overflow_message(low.name, memory, limit, chip_name) +
                         " (inputs alone, before compiling)", {"step": low.name,
                                                               "memory": memory})


def _compile(low: Lowered, limit: int | None, chip_name: str):
    try:
        return low.lowered.compile()
    except Exception as e:  # XLA refuses programs larger than HBM with RESOURCE_EXHAUSTED
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
            raise
        first = next((ln for ln in text.splitlines() if "memory" in ln.lower()), text)
        first = re.sub(r"^\s*RESOURCE_EXHAUSTED:\s*", "", first).strip()
        inputs = ", ".join(f"{k} {gib(v)}" for k, v in low.inputs.items())
        raise DoesNotFit(f"{low.name} step does not fit {chip_name}: XLA: {first} (inputs "
                         f"per device: {inputs}); {_advice('temporaries', low.name)}",
                         {"step": low.name, "xla_error": first}) from None


def memory_of(low: Lowered, compiled) -> dict[str, int]:
    """Per-device bytes: the input groups, XLA's temporaries, outputs that do not reuse a
    donated input, generated code, and their `total`."""
    m = compiled.memory_analysis()
    out = dict(low.inputs)
    out["arguments"] = int(m.argument_size_in_bytes)
    out["temporaries"] = int(m.temp_size_in_bytes)
    out["outputs_not_aliased"] = int(m.output_size_in_bytes - m.alias_size_in_bytes)
    out["generated_code"] = int(m.generated_code_size_in_bytes)
    out["total"] = (out["arguments"] + out["temporaries"] + out["outputs_not_aliased"]
                    + out["generated_code"])
    return out


def _collective_rows(colls: list[hlo.Collective]) -> list[dict[str, Any]]:
    """Collectives grouped by (kind, dtype, operand → result), biggest traffic first."""
    rows: dict[tuple, dict[str, Any]] = {}
    for c in colls:
        key = (c.kind, c.dtype, c.operand_shape, c.shape, c.group_size)
        row = rows.setdefault(key, {"kind": c.kind, "dtype": c.dtype,
                                    "operand_shape": list(c.operand_shape),
                                    "shape": list(c.shape), "group_size": c.group_size,
                                    "bytes": c.bytes, "count": 0, "op_name": c.op_name})
        row["count"] += c.count
    return sorted(rows.values(), key=lambda r: -r["bytes"] * r["count"])


def roofline(flops_hw: float, model_per_device: float, traffic: float, wire: float,
             chip, tokens_per_device: float) -> dict[str, Any] | None:
    """Step-time and MFU estimate (see the module doc), or None without a known chip."""
    if chip is None:
        return None
    # the step does at least the model's FLOPs, whatever the compiled dots show
    compute = max(flops_hw, model_per_device) / chip.peak_flops
    memory = traffic / chip.hbm_bandwidth
    comm = wire / chip.ici_bandwidth
    step = max(compute, memory) + comm
    bound = "compute" if compute >= memory else "memory"
    return {"estimate": True, "compute_s": compute, "memory_s": memory, "collective_s": comm,
            "step_s": step, "bound": bound if comm < max(compute, memory) else "collectives",
            "mfu": model_per_device / (step * chip.peak_flops) if step > 0 else None,
            "tokens_per_s_per_device": tokens_per_device / step if step > 0 else None,
            "assumes": "step = max(compute, memory) + collectives (no overlap); vendor "
                       f"ceilings of {chip.name} ({chip.source})"}


def analyze(low: Lowered, *, chip=None, hbm_limit: int | None = None,
            keep: dict | None = None) -> dict[str, Any]:
    """Compiles `low` and returns its report (a JSON-able dict); raises DoesNotFit.
    `keep["compiled"]` receives the compiled executable when a dict is given."""
    chip_name = chip.name if chip else "the given limit"
    precheck(low, hbm_limit, chip_name)
    t0 = time.perf_counter()
    compiled = _compile(low, hbm_limit, chip_name)
    seconds = time.perf_counter() - t0
    if keep is not None:
        keep["compiled"] = compiled
    text = compiled.as_text()
    module = hlo.Module(text)
    colls = hlo.collectives(module)
    devices = low.mesh.devices.size
    memory = memory_of(low, compiled)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    per_device = low.flops.total / devices
    flops = {"model_global": low.flops.total, "model_student_global": low.flops.student,
             "model_teacher_global": low.flops.teacher, "model_per_device": per_device,
             "hlo_per_device": hlo.dot_flops(module),
             "xla_cost_per_device": float(cost.get("flops", 0.0)),
             "tokens_global": low.flops.tokens}
    flops["hlo_over_model"] = flops["hlo_per_device"] / per_device if per_device else None
    flops["opaque_kernels"] = hlo.opaque_kernels(module)
    # kernels XLA cannot see into are taken to do the model's attention FLOPs
    flops["hardware_per_device"] = flops["hlo_per_device"] + (
        low.flops.attention / devices if flops["opaque_kernels"] else 0.0)
    traffic = hlo.traffic_bytes(module)
    wire = sum(c.wire_bytes * c.count for c in colls)
    report = {"step": low.name, "devices": devices, "mesh": dict(low.mesh.shape),
              "compile_s": seconds, "memory": memory, "hbm_bytes": hbm_limit,
              "flops": flops, "hbm_traffic_bytes": traffic,
              "hbm_traffic_top": hlo.traffic_top(module),
              "collectives": {"by_kind": hlo.by_kind(colls), "ops": _collective_rows(colls),
                              "wire_bytes": wire},
              "unknown_loops": module.unknown_loops,
              "roofline": roofline(flops["hardware_per_device"], per_device, traffic, wire, chip,
                                   low.flops.tokens / devices),
              "notes": low.notes}
    report["fits"] = hbm_limit is None or memory["total"] <= hbm_limit
    if not report["fits"]:
        raise DoesNotFit(overflow_message(low.name, memory, hbm_limit, chip_name), report)
    return report
