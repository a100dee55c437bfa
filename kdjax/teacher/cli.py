"""`kdjax precompute` and `kdjax inspect` (registered by kdjax/cli.py via `add_parser`).

    kdjax precompute --config precompute.yaml [key=value ...]
    kdjax precompute --teacher CKPT --tokens TOKENS --out STORE mode=sampled num_samples=64
    kdjax inspect STORE [--json] [--no-check]

Multi-process (one command per host/process): add `--num-processes P --process-id I
--coordinator-address HOST:PORT`, or `--distributed` where JAX detects them (TPU pods,
SLURM). Each process writes disjoint whole shards of the same store.
"""

from __future__ import annotations

import argparse
import json
import sys

from kdjax.distributed import add_distributed_args, initialize_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("precompute", help="run a teacher over a token store and write "
                              "its teacher store (sampled / top-k / dense)",
                              description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file of PrecomputeConfig settings")
    p.add_argument("--teacher", help="teacher checkpoint directory")
    p.add_argument("--tokens", help="token store directory")
    p.add_argument("--out", help="teacher store directory to write (resumable)")
    p.add_argument("--mode", choices=("sampled", "topk", "dense"))
    add_distributed_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override a setting, e.g. k=64 temperature=2.0 batch_size=32")
    p.set_defaults(func=run_precompute)

    q = subparsers.add_parser("inspect", help="describe a teacher store and check every chunk")
    q.add_argument("store", help="teacher store directory")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--no-check", action="store_true", help="skip reading every chunk")
    q.set_defaults(func=run_inspect)


def run_precompute(args) -> int:
    from kdjax.teacher.config import PrecomputeConfig

    overrides = list(args.overrides)
    for key in ("teacher", "tokens", "out", "mode"):
        if getattr(args, key) is not None:
            overrides.append(f"{key}={getattr(args, key)}")
    config = PrecomputeConfig.load(args.config, overrides)
    missing = [k for k in ("teacher", "tokens", "out") if not getattr(config, k)]
    if missing:
        print(f"kdjax precompute: missing {', '.join(missing)}; give them in --config or as "
              f"--{missing[0]} …", file=sys.stderr)
        return 2
    initialize_from_args(args)
    from kdjax.teacher.precompute import precompute

    precompute(config)
    return 0


def run_inspect(args) -> int:
    from kdjax.teacher.inspect import inspect_store, report_lines

    report = inspect_store(args.store, check=not args.no_check, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print("\n".join(report_lines(report)))
    return 1 if report["problems"] else 0
