"""Pod scale without a pod: the shipped pod configs compiled ahead of time for TPU slices.

For each (config, TPU topology) it runs what `kdjax compile` runs — the real train (and
precompute) step lowered on abstract inputs and compiled through libtpu on this CPU host —
and tabulates per chip: memory against HBM, model FLOPs vs the compiled program's dot
FLOPs, collective and HBM bytes, and the roofline ESTIMATE of step time and MFU (vendor
ceilings, kdjax/compile/chips.py; not a measurement). Then, on 8 fake CPU devices, the
measured step time of a tiny config against 1 device (the fake devices share this host's
cores, so this shows the work is divided, not a speed-up).

    python benchmarks/scale.py                 # everything (~30 min on 2 cores)
    python benchmarks/scale.py --quick         # one shrunk compile + fake devices (~1 min)
    python benchmarks/scale.py --measure --out F.md   # on an accelerator: measured vs
                                                      # estimated MFU of the train step
"""

from __future__ import annotations

import os
import platform as host
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc
import jax
import jax.numpy as jnp

from kdjax.compile import chips, report, steps
from kdjax.compile.cli import compile_config
from kdjax.compile.plan import make_plan
from kdjax.train.config import load_config

LLAMA = "configs/llama3_8b_to_1b_sampled_tpu.yaml"
QWEN = "configs/qwen25_7b_to_05b_online_gpu.yaml"
LLAMA_PRE = dict(teacher="/mnt/shared/hf/Llama-3.1-8B",
                 precompute=["mesh=[1,-1,1]", "num_samples=64", "num_slots=32",
                             "batch_size=256", "dtype=bfloat16"])
NO_WINDOWED = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false "
               "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")
# (label, config, overrides, topology, steps, compile_config kwargs; "env": run the case
# in a subprocess with these variables, e.g. libtpu flags, which are read once per process)
CASES = [
    ("Llama-3.1-8B → 3.2-1B sampled", LLAMA, ["data.seq_len=4096"], "v5p:2x4x4",
     ("train", "precompute"), LLAMA_PRE),
    ("Llama-3.1-8B → 3.2-1B sampled", LLAMA, ["data.seq_len=4096"], "v5p:4x4x8",
     ("train",), {}),
    ("Llama-3.1-8B → 3.2-1B sampled", LLAMA, ["data.seq_len=4096"], "v5e:4x4", ("train",), {}),
    ("… micro_batches=4", LLAMA, ["data.seq_len=4096", "micro_batches=4"], "v5e:4x4",
     ("train",), {}),
    ("… without windowed einsums†", LLAMA, ["data.seq_len=4096"], "v5p:2x4x4", ("train",),
     {"env": {"LIBTPU_INIT_ARGS": NO_WINDOWED}}),
    ("Qwen2.5-7B → 0.5B online", QWEN, ["data.seq_len=2048", "mesh.fsdp=-1"], "v5e:4x4",
     ("train",), {}),
]
QUICK = [("Llama sampled config, 2-layer 1024-vocab student", LLAMA,
          ["data.seq_len=128", "global_batch_size=8", "model.path=null",
           "model.init={vocab_size: 1024, hidden_size: 128, intermediate_size: 256, "
           "num_layers: 2, num_heads: 4, num_kv_heads: 2, tie_word_embeddings: true}"],
          "v5p:2x2x2", ("train",), {})]
TINY = ["data.seq_len=256", "global_batch_size=16", "mesh.data=-1", "mesh.fsdp=1",
        "model.path=null", "model.dtype=float32",
        "model.init={vocab_size: 4096, hidden_size: 256, intermediate_size: 512, "
        "num_layers: 4, num_heads: 8, num_kv_heads: 4, tie_word_embeddings: true}"]
GIB = 2**30
LEGEND = """Columns, per chip and per step: memory = arguments + XLA temporaries + unaliased
outputs + code (`compiled.memory_analysis()`) against the chip's HBM; model FLOPs = 6·P +
attention (+ 2·P_t for an online teacher) ÷ chips (kdjax/compile/flops.py); compiled dots ÷
model = the compiled program's dot/convolution FLOPs with loop trip counts multiplied in,
over model FLOPs (1.33 is full remat's extra forward; more means duplicated work);
collective GiB = bytes of every collective × executions; HBM GiB moved = each unfused
instruction's operands + result × executions (a model of XLA's "bytes accessed");
est. step = max(FLOPs / peak, HBM bytes / HBM bandwidth) + ring collective bytes / ICI
bandwidth (no overlap assumed), with FLOPs = compiled dots + the model's attention FLOPs
when attention runs in an opaque kernel (splash); est. MFU = model FLOPs / (est. step ×
peak). A roofline is an upper bound: it ignores vector-unit work (norms, softmax, the loss's
exp/log), kernel efficiency and imperfect overlap, so measured MFU will be lower. Synthetic
teacher stores (N=64 draws in U=32 slots) stand in for stores not on this host; model
directories not on this host use the built-in Llama-3.x / Qwen2.5 architectures.

† `LIBTPU_INIT_ARGS="--xla_tpu_enable_windowed_einsum_for_all_gather=false
--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"`: with 8 rows per chip XLA turns
the FSDP matmuls into windowed einsums over the contraction dimension (16 collective-permute
steps per matmul), each step re-reading and re-writing the whole `[tokens, 8192]`
accumulator — most of the HBM traffic of the plain row. Without them the weights are
all-gathered instead. Whether the hardware agrees is for a measurement to say."""


def _row(label, topology, name, r):
    m, f, rf = r["memory"], r["flops"], r.get("roofline") or {}
    coll = sum(v["bytes"] for v in r["collectives"]["by_kind"].values())
    mesh = "×".join(str(v) for v in r["mesh"].values())
    return (f"| {label} | {topology} ({r['devices']}) | {name} | {mesh} | "
            f"{m['total'] / GIB:.1f} / {(r['hbm_bytes'] or 0) / GIB:.0f} | "
            f"{m['temporaries'] / GIB:.1f} | {f['model_per_device']:.3g} | "
            f"{f['hlo_over_model']:.2f} | {coll / GIB:.2f} | "
            f"{r['hbm_traffic_bytes'] / GIB:.0f} | {rf.get('step_s', float('nan')):.3g} "
            f"({rf.get('bound', '-')}) | {100 * rf.get('mfu', float('nan')):.1f}% | "
            f"{r['compile_s']:.0f} |")


HEADER = ("| config | topology (chips) | step | mesh d×f×t | memory/chip GiB (of HBM) | "
          "temps GiB | model FLOPs/chip | compiled dots ÷ model | collective GiB/chip | "
          "HBM GiB moved/chip | est. step s (bound) | est. MFU | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _compile_elsewhere(config, overrides, topology, which, env) -> dict:
    """`kdjax compile --json` in a subprocess with extra environment variables."""
    import json
    import subprocess

    cmd = [sys.executable, "-m", "kdjax.cli", "compile", "--config", config, "--topology",
           topology, "--json", "--step", which[0] if len(which) == 1 else "all", *overrides]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout)


def tpu_table(cases) -> list[str]:
    lines = [HEADER]
    for label, config, overrides, topology, which, kw in cases:
        t0 = time.perf_counter()
        try:
            if "env" in kw:
                result = _compile_elsewhere(config, overrides, topology, which, kw["env"])
            else:
                result = compile_config(config, overrides, topology=topology, steps=which,
                                        **kw)
        except report.DoesNotFit as e:
            lines.append(f"| {label} | {topology} | {'/'.join(which)} | | **does not fit**: "
                         f"{e} | | | | | | | | |")
            continue
        except Exception as e:  # noqa: BLE001  (a row per failure; the table goes on)
            lines.append(f"| {label} | {topology} | | | error: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]} | | | | | | | | |")
            continue
        for name, r in result["steps"].items():
            lines.append(_row(label, topology, name, r))
        print(f"{label} {topology}: {time.perf_counter() - t0:.0f} s", flush=True)
    return lines


def materialize(tree, vocab: int, seed: int = 0):
    """Real arrays for a tree of sharded ShapeDtypeStructs, made on their devices: small
    random floats, token ids below `vocab`, counts that sum to nothing in particular."""
    leaves, treedef = jax.tree.flatten_with_path(tree)
    out = []
    for i, (path, x) in enumerate(leaves):
        name, key = jax.tree_util.keystr(path), jax.random.key(seed + i)
        if jnp.issubdtype(x.dtype, jnp.floating):
            make = lambda k=key, x=x: (0.02 * jax.random.normal(k, x.shape)).astype(x.dtype)
        elif any(s in name for s in ("tokens", "targets", "ids")):
            make = lambda k=key, x=x: jax.random.randint(k, x.shape, 0, vocab).astype(x.dtype)
        elif "segment_ids" in name or "counts" in name or x.dtype == jnp.bool_:
            make = lambda x=x: jnp.ones(x.shape, x.dtype)
        else:
            make = lambda x=x: jnp.zeros(x.shape, x.dtype)
        out.append(jax.jit(make, out_shardings=x.sharding)())
    return jax.tree.unflatten(treedef, out)


def time_train(config_path, overrides, devices, repeats=5):
    """(report, median measured step seconds) of the config's train step on `devices`."""
    plan = make_plan(load_config(config_path, overrides), devices)
    low = steps.train_step(plan)
    chip = chips.chip_of(devices[0]) if devices[0].platform != "cpu" else None
    keep = {}
    r = report.analyze(low, chip=chip, hbm_limit=chip.hbm_bytes if chip else None, keep=keep)
    state, batch, t_args = materialize(low.args, plan.student.config.vocab_size)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        state, metrics = keep["compiled"](state, batch, t_args)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return r, statistics.median(times[1:])


def fake_devices() -> list[str]:
    lines = ["| devices | mesh | measured step s (median of 5) | model FLOPs/device | "
             "compiled dots/device | temps MiB/device |", "|---|---|---|---|---|---|"]
    for n in (1, 8):
        r, t = time_train(LLAMA, TINY, jax.devices("cpu")[:n])
        f = r["flops"]
        lines.append(f"| {n} | {'×'.join(str(v) for v in r['mesh'].values())} | {t:.3f} | "
                     f"{f['model_per_device']:.3g} | {f['hlo_per_device']:.3g} | "
                     f"{r['memory']['temporaries'] / 2**20:.0f} |")
    return lines


def measure(overrides) -> list[str]:
    devices = jax.devices()
    chip = chips.chip_of(devices[0])
    r, t = time_train(LLAMA, overrides, devices)
    per_device = r["flops"]["model_per_device"]
    est = r.get("roofline") or {}
    measured = per_device / (t * chip.peak_flops) if chip else None
    return ["| device | config overrides | est. step s | measured step s | est. MFU | "
            "measured MFU |", "|---|---|---|---|---|---|",
            f"| {len(devices)} × {devices[0].device_kind} | {' '.join(overrides)} | "
            f"{est.get('step_s', float('nan')):.3g} | {t:.3g} | "
            f"{100 * est.get('mfu', float('nan')):.1f}% | "
            f"{'-' if measured is None else f'{100 * measured:.1f}%'} |"]


def fake_cpu_devices(n: int = 8) -> None:
    """CPU-only JAX with `n` devices, set before JAX starts its backend."""
    if bc.backend_started():
        raise ValueError("benchmarks/scale.py needs 8 fake CPU devices, which must be set "
                         "before JAX starts its backend")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # also for `kdjax compile` subprocesses
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def build_parser(parser=None):
    p = bc.new_parser(__doc__, parser)
    p.add_argument("--quick", action="store_true", help="one shrunk compile + fake devices")
    p.add_argument("--measure", action="store_true", help="on an accelerator: run the train "
                   "step and report measured MFU next to the estimate")
    p.add_argument("--measure-overrides", nargs="*", default=[
        "global_batch_size=8", "data.seq_len=2048", "mesh.data=1", "mesh.fsdp=-1"],
                   help="overrides of the Llama config for --measure")
    p.add_argument("--out", default=str(bc.RESULTS / "scale.md"))
    return p


def run(args, argv) -> int:
    if not args.measure:
        fake_cpu_devices()
    command = bc.command("scale.py", argv)
    text = [f"## Scale: `kdjax compile` for TPU slices\n\nCommand: `{command}`  \n"
            f"Host: {host.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}; every "
            "MFU here is a roofline ESTIMATE from vendor ceilings unless marked measured.\n"]
    if args.measure:
        text += ["### Measured on this accelerator", ""] + measure(args.measure_overrides)
    else:
        text += ["### TPU slices (ahead of time, libtpu on this CPU host)", ""]
        text += tpu_table(QUICK if args.quick else CASES) + ["", LEGEND]
        text += ["", "### 8 fake CPU devices vs 1 (they share the host's cores: per-device "
                 "FLOPs and memory divide, the step time does not)", ""] + fake_devices()
    bc.write("\n".join(text) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(bc.main(build_parser, run))
