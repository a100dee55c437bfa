"""`kdjax generate` and `kdjax filter`."""

from __future__ import annotations

import argparse

from kdjax._cliargs import add_config_args, config_overrides
from kdjax.distributed import initialize_from_args

GENERATE_HELP = """\
A model (teacher or student) writes completions: each prompt of an example store is
completed n times (label mode: sequence-level KD, Kim & Rush 2016), or new instructions
are grown from a seed file and answered (expand mode: Self-Instruct). The result is a
generated dataset (parquet shards + manifest) that `kdjax pack` turns into training
rows, and its curated copy in OUT/curated. A rerun of the same command resumes: only
missing shards are generated, and the output equals an uninterrupted run's.

  kdjax pack prompts.jsonl --tokenizer TEACHER --out stores/prompts --layout examples \\
      --prompt-len 256
  kdjax generate --model TEACHER --prompts stores/prompts/train --out gen/train \\
      n=4 temperature=0.7 top_p=0.95 max_new_tokens=256
  kdjax generate --model TEACHER --out gen/expanded mode=expand \\
      expand.seed_file=configs/seed_instructions.txt expand.num_instructions=200
  kdjax pack gen/train/curated --tokenizer TEACHER --seq-len 512 --out stores/seqkd

Multi-process (one command per host): add --distributed or --num-processes P
--process-id I --coordinator-address HOST:PORT; every process runs the sharded model,
process 0 writes."""

FILTER_HELP = """\
Curate a generated dataset on its own (the `filter` settings of `kdjax generate`):
finished completions only, length bounds, a minimum mean log-prob, exact and near
duplicates, self-consistency (majority answer). Writes a generated dataset to --out and
prints what each filter dropped.

  kdjax filter gen/train --out gen/train-majority filter.answer_regex='answer is (\\d+)'"""


def add_parser(subparsers) -> None:
    from kdjax.generate.config import GenerateConfig
    from kdjax.schema import settings_help

    p = subparsers.add_parser(
        "generate", help="a model writes completions of prompts (or grows and answers "
        "instructions) into a generated dataset; resumable", description=GENERATE_HELP,
        epilog=settings_help(GenerateConfig), formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(p, {"model": "the generating model (the `model` setting)",
                        "prompts": "example store of prompts (the `prompts` setting)",
                        "out": "generated dataset to write (the `out` setting)"},
                    example="n=4 temperature=0.7")
    p.set_defaults(func=run_generate_command)

    f = subparsers.add_parser("filter", help="curate a generated dataset (dedup, length, "
                              "log-prob, self-consistency)", description=FILTER_HELP,
                              formatter_class=argparse.RawTextHelpFormatter)
    f.add_argument("dataset", help="a generated dataset directory (`kdjax generate --out`)")
    f.add_argument("--out", required=True, help="the curated dataset to write")
    f.add_argument("overrides", nargs="*", metavar="filter.key=value",
                   help="filter settings, e.g. filter.min_mean_logprob=-1.5")
    f.set_defaults(func=run_filter_command)


def generate_config(args):
    from kdjax.generate.config import GenerateConfig

    return GenerateConfig.load(args.config, config_overrides(
        args, ("model", "prompts", "out", "overwrite")))


def run_generate_command(args) -> int:
    from kdjax.distributed import is_primary
    from kdjax.generate.run import run_generate, summary_lines

    config = generate_config(args)
    config.check_paths()
    initialize_from_args(args)
    summary = run_generate(config)
    if is_primary() and config.progress:
        print("\n".join(summary_lines(summary)))
    return 0


def run_filter_command(args) -> int:

    from kdjax.generate.config import FilterCommandConfig
    from kdjax.generate.curate import write_curated
    from kdjax.generate.dataset import COLUMNS, GeneratedDataset
    from kdjax.schema import ConfigError, load

    bad = [o for o in args.overrides if not o.startswith("filter.")]
    if bad:
        raise ConfigError(f"kdjax filter takes filter.* settings only, got {bad[0]!r}")
    config = load(FilterCommandConfig, None, args.overrides).filter
    source = GeneratedDataset(args.dataset)
    extra = [c for c in source.manifest["columns"] if c not in COLUMNS]
    read, kept, dropped = write_curated(source, args.out, config, extra)
    drops = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none"
    print(f"curated {args.out}: kept {kept} of {read} (dropped: {drops})")
    return 0
