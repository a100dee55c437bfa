"""`kdjax score`."""

from __future__ import annotations

import argparse

from kdjax._cliargs import add_config_args, config_overrides
from kdjax.distributed import initialize_from_args

SCORE_HELP = """\
The teacher scores the K candidate completions of each prompt and a preference dataset is
written (parquet shards + manifest): per prompt the candidates, their scores, ranks and
chosen/rejected pairs, for the ranking objective (DPO, IPO, SimPO, RRHF, PRO, listwise KL).
  method=likelihood  the teacher's mean log-prob of each completion given the prompt
  method=judge       the teacher grades each answer (template: judge.template); the score
                     is the expected grade under its next-token distribution over the
                     grade tokens, so no sampling noise
  method=labels      no teacher: the data's own chosen/rejected labels
With reference=DIR (e.g. the student's starting checkpoint) each candidate's summed
log-prob and token count under that frozen reference are stored too (ref_logps,
ref_counts), so training never runs it. A rerun of the same command resumes: only
missing shards are scored, and the output equals an uninterrupted run's.

  kdjax generate --model STUDENT --prompts stores/prompts/train --out gen/train \\
      n=4 temperature=1.0
  kdjax score --model TEACHER --data gen/train --out prefs/train reference=STUDENT
  kdjax score --config configs/score/judge.yaml
  kdjax score --data pairs.jsonl --out prefs/trl method=labels reference=STUDENT

Multi-process (one command per host): add --distributed or --num-processes P
--process-id I --coordinator-address HOST:PORT; every process runs the sharded models,
process 0 writes."""


def add_parser(subparsers) -> None:
    from kdjax.schema import settings_help
    from kdjax.score.config import ScoreConfig

    p = subparsers.add_parser(
        "score", help="the teacher scores K candidates per prompt (likelihood or judge) "
        "into a preference dataset; resumable", description=SCORE_HELP,
        epilog=settings_help(ScoreConfig), formatter_class=argparse.RawTextHelpFormatter)
    add_config_args(p, {"model": "the scoring teacher (the `model` setting)",
                        "data": "the candidates: generated dataset or preference data (the "
                        "`data` setting)",
                        "out": "preference dataset to write (the `out` setting)",
                        "method": "likelihood | judge | labels (the `method` setting)"},
                    example="method=judge pairs=all")
    p.set_defaults(func=run_score_command)


def score_config(args):
    from kdjax.score.config import ScoreConfig

    return ScoreConfig.load(args.config, config_overrides(
        args, ("model", "data", "out", "method", "overwrite")))


def run_score_command(args) -> int:
    from kdjax.distributed import is_primary
    from kdjax.score.run import run_score, summary_lines

    config = score_config(args)
    config.check_paths()
    initialize_from_args(args)
    summary = run_score(config)
    if is_primary() and config.progress:
        print("\n".join(summary_lines(summary)))
    return 0
