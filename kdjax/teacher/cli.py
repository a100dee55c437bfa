"""`kdjax precompute` and `kdjax inspect`."""

from __future__ import annotations

import argparse
import json

from kdjax._cliargs import add_config_args, config_overrides
from kdjax.distributed import initialize_from_args

PRECOMPUTE_HELP = """\
Run a teacher once over a token store and write what the student will learn from (its
top-k log-probs, a sample of its distribution, or every logit) to a teacher store. A
rerun of the same command resumes: only shards missing from the store are computed.

  kdjax precompute --config configs/precompute/quickstart_sampled.yaml
  kdjax precompute --teacher TEACHER_DIR --tokens TOKENS/train --out STORE mode=topk k=32
  kdjax precompute --teacher TEACHER_DIR --tokens TOKENS/train --out STORE \\
      mode=sampled num_samples=64 batch_size=16 --overwrite

The token store must have been packed with the teacher's tokenizer (`kdjax pack
--tokenizer TEACHER_DIR`); a store packed with another one is refused. Multi-process (one
command per host): add --distributed (TPU pods, SLURM) or --num-processes P --process-id I
--coordinator-address HOST:PORT; each process writes disjoint whole shards."""

INSPECT_HELP = """\
Describe a teacher store (mode, sizes, fingerprints, bytes per token, teacher mass
covered) and read every chunk back, checking its crc32c.

Exit status: 0 intact; 3 some chunk is missing or damaged (each is named, with its rows);
2 not a teacher store."""


def add_parser(subparsers) -> None:
    from kdjax.schema import settings_help
    from kdjax.teacher.config import PrecomputeConfig

    p = subparsers.add_parser(
        "precompute", help="run a teacher over a token store and write its teacher store "
        "(top-k / sampled / dense; resumable)", description=PRECOMPUTE_HELP,
        epilog=settings_help(PrecomputeConfig), formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(p, {"teacher": "teacher model directory (the `teacher` setting)",
                        "tokens": "token store directory (the `tokens` setting)",
                        "out": "teacher store directory to write (the `out` setting)",
                        "mode": {"choices": ("topk", "sampled", "dense"),
                                 "help": "the `mode` setting"}},
                    example="k=64 temperature=2.0 batch_size=32",
                    config_help="YAML file of the settings below (see configs/precompute/)",
                    overwrite_help="replace an existing store written with other settings")
    p.set_defaults(func=run_precompute)

    q = subparsers.add_parser("inspect", help="describe a teacher store and check every chunk",
                              description=INSPECT_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("store", help="teacher store directory (written by `kdjax precompute`)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--no-check", action="store_true",
                   help="read only the manifest, not the chunks (fast; nothing is verified)")
    q.set_defaults(func=run_inspect)


def precompute_config(args):
    """The PrecomputeConfig of a command line: --config, then key=value overrides, then the
    flags (--teacher, --tokens, --out, --mode, --overwrite)."""
    from kdjax.schema import ConfigError
    from kdjax.teacher.config import PrecomputeConfig

    config = PrecomputeConfig.load(args.config, config_overrides(
        args, ("teacher", "tokens", "out", "mode", "overwrite")))
    missing = [k for k in ("teacher", "tokens", "out") if not getattr(config, k)]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; give them in --config or as "
                          f"--{missing[0]} …")
    return config


def run_precompute(args) -> int:
    config = precompute_config(args)
    initialize_from_args(args)
    from kdjax.teacher.precompute import precompute

    precompute(config)
    return 0


def run_inspect(args) -> int:
    from kdjax.cli import EXIT_DATA_DAMAGE
    from kdjax.schema import check_dir
    from kdjax.teacher.inspect import inspect_store, report_lines

    check_dir(args.store, None, what="teacher store", hint="; pass the directory "
              "`kdjax precompute` wrote (its --out)")
    report = inspect_store(args.store, check=not args.no_check, progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print("\n".join(report_lines(report)))
    return EXIT_DATA_DAMAGE if report["problems"] else 0
