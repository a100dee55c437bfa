"""`kdjax eval`: held-out metrics of run checkpoints and of plain Hugging Face models,
one run or a table comparing several."""

from __future__ import annotations

import argparse
import json

from kdjax.distributed import add_distributed_args, initialize_from_args, is_primary

EVAL_HELP = """\
Held-out cross-entropy and perplexity (plus KL to the teacher and top-1 agreement when a
teacher signal is there) of run checkpoints, or of any Hugging Face model directory (a
teacher, a baseline) on a token store. Several at once print a table.

  kdjax eval runs/distilled                        the newest checkpoint, the run's settings
  kdjax eval runs/distilled runs/baseline          a table comparing the runs
  kdjax eval --model TEACHER_DIR --data TOKENS/eval [--store TEACHER_STORE]
  kdjax eval runs/distilled --model TEACHER_DIR --data TOKENS/eval    runs and models

A run is evaluated with its own config (`data.eval`, `store.eval_path` or `teacher.path`,
`eval.batches`, `eval.batch_size`); key.sub=value arguments override it, e.g.
eval.batches=32. A --model is evaluated on --data, in --batch-size rows per batch, over
--batches batches (default: the whole store), against --store when given."""

COLUMNS = (("step", "step"), ("ce", "held-out CE"), ("perplexity", "perplexity"),
           ("kl_teacher", "KL(teacher‖model)"), ("top1_agreement", "top-1 agreement"),
           ("tokens", "tokens"))


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="held-out CE / perplexity / KL to the teacher of "
                              "runs or Hugging Face models (a table for several)",
                              description=EVAL_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("targets", nargs="*", metavar="RUN_DIR | key.sub=value",
                   help="run directories written by `kdjax train`, and config overrides "
                   "applied to each run (e.g. eval.batches=32)")
    e.add_argument("--step", type=int, help="checkpoint step of the runs (default: the "
                   "newest of each)")
    e.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="a Hugging Face model directory to evaluate on --data (repeatable)")
    e.add_argument("--data", help="token store the --model directories are evaluated on")
    e.add_argument("--store", help="teacher store of --data (adds KL(teacher‖model) and "
                   "top-1 agreement for the --model directories)")
    e.add_argument("--batch-size", type=int, help="rows per batch for --model (default: 8, "
                   "rounded to a multiple of the device count)")
    e.add_argument("--batches", type=int, help="batches per --model (default: every full "
                   "batch of --data)")
    e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute and weight dtype of the --model directories (default: "
                   "float32)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_distributed_args(e)
    e.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from kdjax.schema import ConfigError

    runs = [t for t in args.targets if "=" not in t]
    overrides = [t for t in args.targets if "=" in t]
    if not runs and not args.model:
        raise ConfigError("nothing to evaluate: give run directories (kdjax eval RUN_DIR) or "
                          "--model DIR --data TOKENS")
    if args.model and not args.data:
        raise ConfigError("--model needs --data TOKENS (the token store to evaluate on)")
    if (args.data or args.store) and not args.model:
        raise ConfigError("--data and --store apply to --model directories; a run is "
                          "evaluated on its own data.eval (override it: data.eval=PATH)")
    configs = {run: run_config(run, overrides) for run in runs}  # all checked before work
    initialize_from_args(args)
    results = {run: evaluate_checkpoint(config, step=args.step)
               for run, config in configs.items()}
    for model in args.model:
        results[model] = evaluate_model(model, args.data, store=args.store,
                                        batch_size=args.batch_size, batches=args.batches,
                                        dtype=args.dtype)
    if not is_primary():  # every process computed the same metrics; one reports them
        return 0
    if len(results) == 1:
        (metrics,) = results.values()
        if args.json:
            print(json.dumps(metrics, indent=2, sort_keys=True, default=str))
        else:
            print_summary("eval", metrics)
    elif args.json:
        print(json.dumps(results, indent=2, sort_keys=True, default=str))
    else:
        print(table(results))
    return 0


def table(results: dict[str, dict]) -> str:
    """A markdown table: one row per run or model, the columns any of them has."""
    cols = [(k, name) for k, name in COLUMNS if any(k in m for m in results.values())]
    lines = ["| run / model | " + " | ".join(name for _, name in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for who, m in results.items():
        cells = ["-" if k not in m else str(int(m[k])) if k in ("step", "tokens")
                 else f"{m[k]:.4f}" for k, _ in cols]
        lines.append(f"| {who} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_config(run_dir: str, overrides: list[str]):
    """The config a run saved, with `overrides` (and its new place, if it moved)."""
    import os

    from kdjax.schema import check_dir
    from kdjax.train.checkpoint import read_run_config

    check_dir(run_dir, None, what="run directory", hint="; pass the run_dir of a "
              "`kdjax train` run")
    config = read_run_config(run_dir)
    if os.path.abspath(config.run_dir) != os.path.abspath(run_dir):  # the run moved
        overrides = [f"run_dir={run_dir}", *overrides]
    return config.replace(*overrides) if overrides else config


def evaluate_checkpoint(config, step: int | None = None) -> dict:
    """Held-out metrics of checkpoint `step` (default newest) of `config`'s run, with the
    run's eval settings (`eval.batches`, `eval.batch_size`) and teacher signal."""
    import types

    import jax

    from kdjax.train import loop
    from kdjax.train.checkpoint import restore_student
    from kdjax.train.state import param_shardings, split_model

    if not config.data.eval:
        raise FileNotFoundError(f"run {config.run_dir} has no held-out data: set "
                                "data.eval=PATH (a token store)")
    config.check_checkpoints()
    config.check_devices(jax.device_count())
    mesh = config.mesh.make()
    model, step = restore_student(config, step)
    graphdef, params, rest = split_model(model)
    params = jax.device_put(params, param_shardings(mesh, model))
    _, eval_tokens, _, eval_store = loop._open_stores(config, model.config.vocab_size)
    teacher = (loop.build_teacher(config.teacher.path, config.teacher.dtype, mesh,
                                  config.teacher.remat) if config.teacher.path else None)
    view = types.SimpleNamespace(graphdef=graphdef, params={"model": params}, rest=rest)
    with jax.set_mesh(mesh):
        run_eval = loop.make_evaluator(config, mesh, view, eval_tokens, eval_store, teacher)
        return {"step": step, **run_eval(view)}


def evaluate_model(model_dir: str, data: str, *, store: str | None = None,
                   batch_size: int | None = None, batches: int | None = None,
                   dtype: str = "float32") -> dict:
    """Held-out metrics of a Hugging Face model directory on token store `data` (and
    against teacher store `store`), data-parallel over every device."""
    import jax

    from kdjax.data import Loader, open_token_store
    from kdjax.models import from_pretrained
    from kdjax.schema import ConfigError, check_dir
    from kdjax.sharding import make_mesh
    from kdjax.teacher import open_teacher_store
    from kdjax.train import evaluate as ev
    from kdjax.train.state import split_model

    check_dir(model_dir, "--model", what="model directory", holds="config.json")
    check_dir(data, "--data", what="token store")
    tokens = open_token_store(data)
    n_dev = jax.device_count()
    bs = batch_size or n_dev * max(1, 8 // n_dev)
    if bs % n_dev:
        raise ConfigError(f"--batch-size {bs} is not divisible by the {n_dev} devices; use a "
                          f"multiple of {n_dev}")
    n = tokens.num_rows // bs if batches is None else min(batches, tokens.num_rows // bs)
    if n < 1:
        raise ConfigError(f"--data {data!r} has {tokens.num_rows} rows, fewer than one batch "
                          f"of {bs}; lower --batch-size")
    mesh = make_mesh()
    model = from_pretrained(model_dir, mesh=mesh, dtype=dtype, param_dtype=dtype)
    vocab = int(model.config.vocab_size)
    if tokens.vocab_size > vocab:
        raise ConfigError(f"--data {data!r} holds ids of a {tokens.vocab_size}-token "
                          f"vocabulary but {model_dir} has {vocab}; it was packed with "
                          "another tokenizer")
    teacher_store = None
    if store is not None:
        teacher_store = open_teacher_store(store)
        teacher_store.check_compatible(tokens, vocab_size=vocab)
    graphdef, params, rest = split_model(model)
    loader = Loader(tokens, global_batch_size=bs, seed=0, mesh=mesh,
                    teacher_store=teacher_store, shuffle=False)
    with jax.set_mesh(mesh):
        fn = ev.make_eval_fn(graphdef, mesh, store_manifest=teacher_store and
                             teacher_store.manifest)
        return ev.evaluate(fn, params, rest, (loader.batch_at(i) for i in range(n)))


def print_summary(command: str, summary) -> None:
    """A short, human summary of a command's result dict (`kdjax train`, `kdjax eval`):
    scalars first, then where things were written."""
    if not isinstance(summary, dict):
        print(f"kdjax {command}: {summary}")
        return
    print(f"kdjax {command} done:")
    for key, value in summary.items():
        if not isinstance(value, str | int | float | dict | None):
            continue  # e.g. the final train state
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
            print(f"  {key}: {inner}")
        else:
            print(f"  {key}: {_fmt(value)}")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
