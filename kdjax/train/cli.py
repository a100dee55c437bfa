"""`kdjax train`, `kdjax eval` and `kdjax export` (registered by kdjax/cli.py).

    kdjax train --config configs/quickstart.yaml [key.sub=value ...]
        Trains; if the run directory already holds a checkpoint, resumes from it (the
        config must agree with the saved one, see kdjax.train.checkpoint).
    kdjax train --config FILE --print-config [key.sub=value ...]
        Validates and prints the resolved config, then exits (nothing is built).
    kdjax eval RUN_DIR [--step N] [key.sub=value ...]
        Held-out CE / perplexity (and KL / top-1 agreement with a teacher signal) of a
        checkpoint, with the run's own config.
    kdjax export RUN_DIR --out DIR [--step N] [--dtype bfloat16]
        Writes the student as a Hugging Face directory (transformers loads it), plus the
        tokenizer when the run names one.

Multi-process (one command per host): add `--distributed` (TPU pods, SLURM) or
`--num-processes P --process-id I --coordinator-address HOST:PORT`. Every process computes;
process 0 alone writes what the hosts share (the packed stores of `data.dataset`, the
export) and prints the summary, the others wait for it (`kdjax.distributed.on_primary`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kdjax.distributed import add_distributed_args, initialize_from_args, is_primary, on_primary

TOKENIZER_FILES = (".model", ".tiktoken", ".jinja", "merges.txt", "vocab.json", "vocab.txt")
OVERRIDES_HELP = "config overrides, e.g. optimizer.lr=3e-4 steps=500 (values are YAML)"


def add_parser(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("train", help="distil (or train) a student from a YAML config",
                              description=__doc__, formatter_class=fmt)
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--print-config", action="store_true",
                   help="validate and print the resolved config, then exit")
    add_distributed_args(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="evaluate a run's checkpoint on held-out data",
                              description=__doc__, formatter_class=fmt)
    e.add_argument("run_dir", help="run directory written by `kdjax train`")
    e.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_distributed_args(e)
    e.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    e.set_defaults(func=run_eval)

    x = subparsers.add_parser("export", help="write a run's student as a Hugging Face dir",
                              description=__doc__, formatter_class=fmt)
    x.add_argument("run_dir", help="run directory written by `kdjax train`")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    x.add_argument("--dtype", help="stored dtype, e.g. bfloat16 (default: float32 masters)")
    x.add_argument("--tokenizer", help="tokenizer directory to copy alongside (default: "
                   "the run's data.tokenizer)")
    add_distributed_args(x)
    x.set_defaults(func=run_export)


def _fail(command: str, error: Exception) -> int:
    print(f"kdjax {command}: {error}", file=sys.stderr)
    return 2


def _run_config(run_dir: str, overrides: list[str]):
    from kdjax.train.checkpoint import read_run_config

    config = read_run_config(run_dir)
    if os.path.abspath(config.run_dir) != os.path.abspath(run_dir):  # the run moved
        overrides = [f"run_dir={run_dir}", *overrides]
    return config.replace(*overrides) if overrides else config


def run_train(args) -> int:
    from kdjax.train.checkpoint import ResumeError
    from kdjax.train.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail("train", e)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    initialize_from_args(args)
    from kdjax.train.loop import train

    try:
        resume_step = _check_resume_early(config)
        if resume_step is not None:
            print(f"kdjax train: resuming {config.run_dir} from step {resume_step}")
        pack_if_needed(config)
        summary = train(config)
    except (ConfigError, ResumeError) as e:
        return _fail("train", e)
    if is_primary():
        _print_summary("train", summary)
    return 0


def _check_resume_early(config) -> int | None:
    """The step a run would resume from, after checking the saved config agrees (the data
    fingerprints are checked by the loop once the stores are open), or None if fresh."""
    from kdjax.train.checkpoint import Checkpointer

    if not os.path.isdir(os.path.join(config.run_dir, "checkpoints")):
        return None
    with Checkpointer(config, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            return None
        return ckpt.check_resume(data=False)


def pack_if_needed(config) -> dict | None:
    """Packs `data.dataset` into the token stores named by `data.train` / `data.eval` when
    `data.train` does not exist yet (what `kdjax pack` does); returns its summary. In a
    multi-process job process 0 checks and packs, the others wait (all see one answer)."""
    if config.data.dataset is None:
        return None
    return on_primary("pack", _pack_if_missing, config)


def _pack_if_missing(config) -> dict | None:
    data = config.data
    if os.path.exists(os.path.join(data.train, "manifest.json")):
        return None
    from kdjax.data.build import build_token_store

    out = build_token_store(data.dataset, data.tokenizer, data.pack_dir, seq_len=data.seq_len,
                            text_field=data.text_field, split=data.split,
                            eval_fraction=data.eval_fraction, seed=config.seed,
                            progress=config.logging.progress)
    for name in ("train", "eval"):
        if name in out:
            print(f"packed {name}: {out[name]['rows']} rows × {data.seq_len} tokens → "
                  f"{out[name]['path']}")
    return out


def run_eval(args) -> int:
    from kdjax.train.config import ConfigError

    try:
        config = _run_config(args.run_dir, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        return _fail("eval", e)
    initialize_from_args(args)
    try:
        metrics = evaluate_checkpoint(config, step=args.step)
    except (ConfigError, FileNotFoundError) as e:
        return _fail("eval", e)
    if not is_primary():  # every process computed the same metrics; one reports them
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    else:
        _print_summary("eval", metrics)
    return 0


def evaluate_checkpoint(config, step: int | None = None) -> dict:
    """Held-out metrics of checkpoint `step` (default newest) of `config`'s run, with the
    run's eval settings (`eval.batches`, `eval.batch_size`) and teacher signal."""
    import types

    import jax

    from kdjax.train import loop
    from kdjax.train.checkpoint import restore_student
    from kdjax.train.state import param_shardings, split_model

    if not config.data.eval:
        raise FileNotFoundError("the run has no held-out data: set data.eval=PATH")
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


def run_export(args) -> int:
    from kdjax.train.checkpoint import restore_student
    from kdjax.train.config import ConfigError

    try:
        config = _run_config(args.run_dir, [])
        tokenizer = args.tokenizer or config.data.tokenizer
        if args.tokenizer and not os.path.isdir(tokenizer):
            raise FileNotFoundError(f"--tokenizer {tokenizer!r} is not a directory")
        initialize_from_args(args)
        # every process restores (orbax restores collectively); one writes the directory
        model, step = restore_student(config, args.step)
        out = on_primary("export", _write_export, model, args.out, args.dtype, tokenizer)
    except (ConfigError, FileNotFoundError) as e:
        return _fail("export", e)
    if is_primary():
        copied = f" with the tokenizer from {tokenizer}" if out["tokenizer"] else ""
        print(f"exported the student at step {step} of {args.run_dir} to {out['path']}{copied}")
    return 0


def _write_export(model, out_dir: str, dtype: str | None, tokenizer: str | None) -> dict:
    """Writes the HF directory (and copies the tokenizer's files); returns what it wrote."""
    import shutil

    from kdjax.models import save_pretrained

    out = save_pretrained(model, out_dir, dtype=dtype)
    copied = bool(tokenizer and os.path.isdir(tokenizer))
    if copied:
        for name in os.listdir(tokenizer):
            if "token" in name or name.endswith(TOKENIZER_FILES):
                shutil.copy2(os.path.join(tokenizer, name), out / name)
    return {"path": str(out), "tokenizer": copied}


def _print_summary(command: str, summary) -> None:
    """A short, human summary: scalars first, then where things were written."""
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
