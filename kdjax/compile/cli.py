"""`kdjax compile`: ahead-of-time memory, FLOPs and collectives of a config's real steps.

    kdjax compile --config configs/llama3_8b_to_1b_sampled_tpu.yaml --topology v5p:2x4x4 \\
        data.seq_len=4096
    kdjax compile --config configs/quickstart.yaml --devices 8 --step all store.mode=sampled
    kdjax compile --config FILE --topology v5e:4x4 --step precompute \\
        --teacher /mnt/shared/hf/Llama-3.1-8B --precompute mesh=[1,-1,1] num_samples=64

Like MaxText's train_compile.py: the train step of `kdjax train` (and with --step the eval
step and the `kdjax precompute` step) is lowered on abstract inputs — no weights loaded,
no data read — and compiled for a TPU topology (libtpu, from any host: `pip install -e
'.[tpu]'`) or N CPU devices. It prints, per device: memory (parameters, optimizer state,
batch, XLA temporaries) against the chip's HBM, FLOPs (model ÷ devices vs the compiled
program), every collective with shapes and bytes, and a roofline ESTIMATE of step time and
MFU from vendor ceilings. Model directories that are not on this host are read from their
config.json if present, else from built-in architectures matched by name (Llama-3.x,
Qwen2.5); a teacher store that is not here is replaced by a synthetic one of `store.mode`.

XLA's TPU flags are read from LIBTPU_INIT_ARGS, as on the pod: compile with the flags the
run will use (benchmarks/results/scale.md shows what disabling windowed einsums does).

Exit status: 0 when every compiled step fits; 2 with one line naming the overflow when one
does not, or for a bad topology, mesh or config (--debug shows tracebacks).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

STEPS = ("train", "eval", "precompute")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("compile", help="ahead-of-time memory / FLOPs / collectives of "
                              "a config's steps for a TPU topology or N devices",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML config (as `kdjax train`)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--topology", help="TPU topology, e.g. v5e:4x4, v5p:2x4x4, v6e:8x8")
    where.add_argument("--devices", type=int, help="N CPU devices (fake ones if needed)")
    p.add_argument("--step", choices=(*STEPS, "all"), default="train",
                   help="which step to compile (default: train)")
    p.add_argument("--teacher", help="teacher directory of the precompute step (default: "
                   "teacher.path); also sizes a synthetic teacher store")
    p.add_argument("--precompute", action="append", default=[], metavar="KEY=VALUE",
                   help="precompute setting (repeatable), e.g. num_samples=64 "
                   "k=32 batch_size=256 mesh=[1,-1,1] dtype=bfloat16")
    p.add_argument("--hbm-gib", type=float, help="per-device memory limit in GiB (default: "
                   "the chip's HBM; none for CPU devices)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. global_batch_size=64 data.seq_len=2048")
    p.set_defaults(func=run_compile)


def _devices(topology: str | None, n: int | None):
    from kdjax.compile import target

    if topology:
        return target.topology_devices(topology)
    if n:
        return target.cpu_devices(n)
    import jax

    return jax.devices()


def compile_config(config_path: str, overrides=(), *, topology: str | None = None,
                   devices: int | None = None, steps=("train",), teacher: str | None = None,
                   precompute=(), hbm_gib: float | None = None) -> dict[str, Any]:
    """Compiles `steps` of a config; returns the result dict `render` prints.

    Raises:
      report.DoesNotFit (with `.report`), target.TargetError, ConfigError, ValueError,
      FileNotFoundError: the one-line reasons the CLI prints.
    """
    from kdjax.compile import chips, report, target
    from kdjax.compile import steps as build
    from kdjax.compile.plan import make_plan
    from kdjax.train.config import load_config

    config = load_config(config_path, list(overrides))
    config.check_checkpoints()  # the local model directories, as `kdjax train` checks them
    devs = _devices(topology, devices)
    chip = chips.chip_of(devs[0]) if devs[0].platform != "cpu" else None
    limit = int(hbm_gib * 2**30) if hbm_gib else (chip.hbm_bytes if chip else None)
    plan = make_plan(config, devs, precompute=precompute, teacher=teacher)
    result = {"config": config_path, "overrides": list(overrides), "notes": plan.notes,
              "target": {"topology": topology, "devices": len(devs),
                         "device_kind": devs[0].device_kind, "platform": devs[0].platform,
                         "description": target.describe(devs),
                         "chip": None if chip is None else chip.__dict__, "hbm_bytes": limit},
              "steps": {}}
    for name in steps:
        t_path = teacher or config.teacher.path
        if name == "precompute" and not t_path:
            if len(steps) == 1:
                raise ValueError("--step precompute needs the teacher: pass --teacher PATH "
                                 "(a checkpoint directory or a known model name)")
            result["steps"][name] = {"skipped": "offline config without --teacher PATH"}
            continue
        low = (build.precompute_step(plan, t_path) if name == "precompute"
               else getattr(build, f"{name}_step")(plan))
        try:
            result["steps"][name] = report.analyze(low, chip=chip, hbm_limit=limit)
        except report.DoesNotFit as e:
            result["steps"][name] = {"error": str(e), **e.report}
            e.report = result
            raise
    done = [n for n, r in result["steps"].items() if "skipped" not in r]
    mfu = {n: r["roofline"]["mfu"] for n, r in result["steps"].items()
           if r.get("roofline")}
    extra = "; estimated MFU " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in mfu.items()) \
        if mfu else ""
    result["fits"] = True
    result["summary"] = (f"fits: {', '.join(done)} step(s) on {target.describe(devs)}"
                         + (f" within {limit / 2**30:.1f} GiB per device" if limit else "")
                         + extra)
    return result


def run_compile(args) -> int:
    from kdjax.compile.report import DoesNotFit
    from kdjax.compile.target import TargetError
    from kdjax.train.config import ConfigError

    steps = STEPS if args.step == "all" else (args.step,)
    try:
        result = compile_config(args.config, args.overrides, topology=args.topology,
                                devices=args.devices, steps=steps, teacher=args.teacher,
                                precompute=args.precompute, hbm_gib=args.hbm_gib)
    except DoesNotFit as e:
        if args.debug:
            raise
        if args.json:
            print(json.dumps({**e.report, "fits": False, "error": str(e)}, indent=2,
                             default=str))
        print(f"kdjax compile: does not fit: {e}", file=sys.stderr)
        return 2
    except (ConfigError, TargetError, ValueError, FileNotFoundError, KeyError) as e:
        if args.debug:
            raise
        print(f"kdjax compile: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        from kdjax.compile.render import render

        print(render(result))
    return 0
