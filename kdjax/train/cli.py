"""`kdjax train` and `kdjax export` (`kdjax eval`: kdjax.train.eval_cli)."""

from __future__ import annotations

import argparse
import os

from kdjax.distributed import add_distributed_args, initialize_from_args, is_primary, on_primary

TOKENIZER_FILES = (".model", ".tiktoken", ".jinja", "merges.txt", "vocab.json", "vocab.txt")
OVERRIDES_HELP = "any setting below, e.g. optimizer.lr=3e-4 steps=500 (values are YAML)"

TRAIN_HELP = """\
Distil (or train) a student as a YAML config says; settings can be overridden with
key.sub=value arguments. If the run directory already holds a checkpoint, training resumes
from it (the config must agree with the saved one) and ends at `steps`.

  kdjax train --config configs/quickstart.yaml
  kdjax train --config configs/quickstart.yaml optimizer.lr=1e-3 run_dir=runs/lr1e-3
  kdjax train --config configs/quickstart.yaml objective.alpha=1 store.path=null \\
      run_dir=runs/baseline          (hard labels only: the baseline)
  kdjax train --config FILE --print-config [key.sub=value ...]   (validate, print, exit)

The teacher signal comes from a teacher store (store.path, written by `kdjax precompute`)
or an online teacher (teacher.path). Outputs in run_dir: checkpoints/, config.yaml,
metrics.jsonl, tensorboard/, curves.png. Multi-process (one command per host): add
--distributed (TPU pods, SLURM) or --num-processes P --process-id I --coordinator-address
HOST:PORT."""

EXPORT_HELP = """\
Write a run's student (a checkpoint's weights) as a Hugging Face directory that
transformers and `kdjax eval --model` load, with the tokenizer (--tokenizer, default the
run's data.tokenizer) and the generation config of the model it started from.

  kdjax export runs/distilled --out runs/distilled/hf
  kdjax export runs/distilled --out student-bf16 --step 400 --dtype bfloat16"""


def add_parser(subparsers) -> None:
    from kdjax.schema import settings_help
    from kdjax.train import eval_cli
    from kdjax.train.config import Config

    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("train", help="distil (or train) a student from a YAML config",
                              description=TRAIN_HELP, epilog=settings_help(Config),
                              formatter_class=fmt)
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--print-config", action="store_true",
                   help="validate and print the resolved config, then exit")
    add_distributed_args(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=OVERRIDES_HELP)
    p.set_defaults(func=run_train)

    eval_cli.add_parser(subparsers)

    x = subparsers.add_parser("export", help="write a run's student as a Hugging Face directory",
                              description=EXPORT_HELP, formatter_class=fmt)
    x.add_argument("run_dir", help="run directory written by `kdjax train`")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    x.add_argument("--dtype", help="stored dtype, e.g. bfloat16 (default: float32 masters)")
    x.add_argument("--tokenizer", help="tokenizer directory to copy alongside (default: "
                   "the run's data.tokenizer)")
    add_distributed_args(x)
    x.set_defaults(func=run_export)


def run_train(args) -> int:
    from kdjax.train.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    check_paths(config)
    initialize_from_args(args)
    from kdjax.train.loop import train

    resume_step = _check_resume_early(config)
    if resume_step is not None:
        print(f"kdjax train: resuming {config.run_dir} from step {resume_step}")
    pack_if_needed(config)
    summary = train(config)
    if is_primary():
        from kdjax.train.eval_cli import print_summary

        print_summary("train", summary)
    return 0


def check_paths(config) -> None:
    """Refuses (ConfigError naming the key) a run whose directories do not exist, before
    anything is built: the model and teacher directories, the token stores (unless packed
    from `data.dataset` first) and the teacher stores."""
    from kdjax.schema import ConfigError, check_dir

    hf = ("; pass a local Hugging Face model directory (config.json and *.safetensors) or a "
          ".gguf file")
    for key, what in (("model.path", "model directory"), ("model.init_from", "teacher "
                      "directory"), ("teacher.path", "teacher directory")):
        section, name = key.split(".")
        path = getattr(getattr(config, section), name)
        if path is not None and str(path).lower().endswith(".gguf"):
            if not os.path.isfile(os.path.expanduser(path)):
                raise ConfigError(f"{key}: GGUF file {str(path)!r} does not exist")
            continue
        check_dir(path, key, what=what, holds="config.json", hint=hf)
    data = config.data
    if data.dataset is None:
        pack = "; pack one with `kdjax pack` (or set data.dataset to pack it first)"
        check_dir(data.train, "data.train", what="token store", hint=pack)
        check_dir(data.eval, "data.eval", what="token store", hint=pack)
    else:
        check_dir(data.tokenizer, "data.tokenizer", what="tokenizer directory")
    store = "; write it with `kdjax precompute` (see `kdjax precompute --help`)"
    check_dir(config.store.path, "store.path", what="teacher store", hint=store)
    check_dir(config.store.eval_path, "store.eval_path", what="teacher store", hint=store)


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


def run_export(args) -> int:
    from kdjax.train.checkpoint import restore_student
    from kdjax.train.eval_cli import run_config

    config = run_config(args.run_dir, [])
    tokenizer = args.tokenizer or config.data.tokenizer
    if args.tokenizer and not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer!r} is not a directory")
    initialize_from_args(args)
    # every process restores (orbax restores collectively); one writes the directory
    model, step = restore_student(config, args.step)
    origins = [d for d in (config.model.path, tokenizer) if d]
    out = on_primary("export", _write_export, model, args.out, args.dtype, tokenizer, origins)
    if is_primary():
        copied = f" with the tokenizer from {tokenizer}" if out["tokenizer"] else ""
        print(f"exported the student at step {step} of {args.run_dir} to {out['path']}{copied}")
    return 0


def _write_export(model, out_dir: str, dtype: str | None, tokenizer: str | None,
                  origins=()) -> dict:
    """Writes the HF directory, copies the tokenizer's files and the first
    `generation_config.json` among `origins` (the directory the student started from, the
    tokenizer's); returns what it wrote."""
    import shutil

    from kdjax.models import save_pretrained

    out = save_pretrained(model, out_dir, dtype=dtype)
    copied = bool(tokenizer and os.path.isdir(tokenizer))
    if copied:
        for name in os.listdir(tokenizer):
            if "token" in name or name.endswith(TOKENIZER_FILES):
                shutil.copy2(os.path.join(tokenizer, name), out / name)
    generation = next((os.path.join(d, "generation_config.json") for d in origins
                       if os.path.isfile(os.path.join(d, "generation_config.json"))), None)
    if generation:
        shutil.copy2(generation, out / "generation_config.json")
    return {"path": str(out), "tokenizer": copied, "generation_config": generation}
