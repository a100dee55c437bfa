"""A new user's walk through every documented command on a real Hugging Face model, with
the mistakes new users make, checking that each mistake is one clear line and an exit
status (2, or 3 for a damaged store), never a traceback.

    python examples/new_user_walkthrough.py                 # ~3 min on 2 CPU cores
    python examples/new_user_walkthrough.py --workdir /tmp/walk --keep

The teacher is a Llama built here with transformers (`LlamaForCausalLM.save_pretrained`,
random weights: a real HF directory with config.json, safetensors, generation_config.json)
and a byte-level BPE tokenizer trained here on the data, saved beside it, as a hub model
directory has it. The data are Python's own docstrings (prose, on every machine). Nothing
is downloaded. Every command runs as a user would run it (`python -m kdjax.cli …`, a
subprocess); the script prints one line per step and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ_LEN = 64


def make_corpus(path: Path, min_docs: int = 400) -> list[str]:
    """Docstrings of the standard library (modules, classes, functions) as jsonl."""
    import importlib
    import inspect

    docs = []
    for name in ("os", "json", "argparse", "pathlib", "collections", "itertools", "functools",
                 "subprocess", "shutil", "tempfile", "textwrap", "string", "re", "inspect",
                 "dataclasses", "typing", "logging", "threading", "random", "statistics"):
        module = importlib.import_module(name)
        for obj in (module, *vars(module).values()):
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            if doc and len(doc) > 80 and doc not in docs:
                docs.append(doc)
    assert len(docs) >= min_docs, len(docs)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def make_teacher(out: Path, docs: list[str], vocab: int) -> int:
    """A tiny Llama saved by transformers, with its own tokenizer; returns its vocab size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdjax.models import train_bpe_tokenizer

    tok = train_bpe_tokenizer(docs, vocab, out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return len(tok)


class Walk:
    """Runs `kdjax …` commands in `root` and records what each one showed."""

    def __init__(self, root: Path):
        self.root, self.failures, self.steps = root, [], 0
        self.env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.env.pop("KDJAX_DEBUG", None)

    def kdjax(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kdjax.cli", *argv], cwd=self.root,
                              env=self.env, capture_output=True, text=True, timeout=600)

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        self.steps += 1
        print(f"  {'ok ' if ok else 'FAIL'} {what}" + (f"\n       {detail}" if detail else ""),
              flush=True)
        if not ok:
            self.failures.append(what)

    def works(self, what: str, *argv: str, expect: str = "") -> str:
        """A command that must succeed (exit 0, no traceback, `expect` in its output)."""
        p = self.kdjax(*argv)
        out = p.stdout + p.stderr
        ok = p.returncode == 0 and "Traceback" not in out and expect in out
        self.check(what, ok, "" if ok else f"exit {p.returncode}: {out[-2000:]}")
        return out

    def mistake(self, what: str, *argv: str, expect: str, status: int = 2) -> None:
        """A mistake: exit `status`, no traceback, and a last stderr line `kdjax CMD: …`
        holding `expect` (progress bars or warnings may come before it)."""
        p = self.kdjax(*argv)
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        ok = (p.returncode == status and "Traceback" not in p.stdout + p.stderr
              and last.startswith(f"kdjax {argv[0]}: ") and expect in last)
        self.check(f"{what} → exit {p.returncode}", ok, last if ok else
                   f"exit {p.returncode}, stderr: {p.stderr[-2000:]}")


def walk(root: Path) -> Walk:
    w = Walk(root)
    print("setting up: corpus, tokenizers, a transformers Llama teacher", flush=True)
    docs = make_corpus(root / "docs.jsonl")
    vocab = make_teacher(root / "teacher", docs, 384)
    from kdjax.models import train_bpe_tokenizer

    train_bpe_tokenizer(docs[:40], 300, root / "quickstart_tokenizer")  # another tokenizer

    print("the documented commands", flush=True)
    pack = ["docs.jsonl", "--seq-len", str(SEQ_LEN), "--eval-fraction", "0.1"]
    w.works("pack with the teacher's tokenizer", "pack", *pack, "--tokenizer", "teacher",
            "--out", "tokens", expect="train:")
    w.works("pack with another tokenizer", "pack", *pack, "--tokenizer",
            "quickstart_tokenizer", "--out", "tokens_other")
    w.works("pack at another sequence length", "pack", "docs.jsonl", "--seq-len", "32",
            "--tokenizer", "teacher", "--out", "tokens32")
    pre = ["precompute", "--teacher", "teacher", "--tokens", "tokens/train"]
    w.works("precompute sampled", *pre, "--out", "sampled", "mode=sampled", "num_samples=32",
            "batch_size=8", "shard_rows=16", expect="distinct ids drawn")
    w.works("precompute top-k (--overwrite accepted)", *pre, "--out", "topk", "--mode", "topk",
            "k=16", "batch_size=8", "shard_rows=16", "--overwrite", expect="teacher store")
    w.works("precompute the eval split", "precompute", "--teacher", "teacher", "--tokens",
            "tokens/eval", "--out", "topk_eval", "k=16", "batch_size=8", "progress=false")
    (root / "sampled" / "ledger" / "shard-000001.json").unlink()  # as if killed
    w.works("precompute resumes", *pre, "--out", "sampled", "mode=sampled",
            "num_samples=32", "batch_size=8", "shard_rows=16",
            "progress=false", expect="shards already written")
    out = w.works("inspect", "inspect", "sampled", expect="every chunk read back intact")
    w.check("inspect names ids drawn (before the cap) and ids stored (after) apart",
            "distinct ids drawn/position" in out and "ids stored/position" in out)
    out = w.works("inspect --no-check", "inspect", "topk", "--no-check",
                  expect="chunks NOT checked")
    w.check("inspect --no-check claims nothing it did not read", "intact" not in out)

    init = (f"model.init={{vocab_size: {vocab}, hidden_size: 32, intermediate_size: 64, "
            "num_layers: 1, num_heads: 2}")
    common = ["steps=4", "global_batch_size=8", init, "model.dtype=float32", "mesh.data=-1",
              "data.tokenizer=teacher", "data.eval=tokens/eval", "eval.batches=1",
              "checkpoint.every=0", "checkpoint.async_save=false", "logging.tensorboard=false",
              "logging.plot=false", "logging.progress=false"]
    config = root / "run.yaml"
    config.write_text("run_dir: runs/distilled\nsteps: 4\nglobal_batch_size: 8\n"
                      "model: {init: {vocab_size: 2}}\ndata: {train: tokens/train}\n")
    train = ["train", "--config", str(config), *common]
    w.works("train from the top-k store", *train, "store.path=topk",
            "store.eval_path=topk_eval", expect="kdjax train done")
    w.works("train the hard-label baseline (the quickstart recipe, eval store kept)", *train,
            "store.eval_path=topk_eval", "objective.alpha=1", "store.path=null",
            "run_dir=runs/baseline", expect="kl_teacher")
    w.works("train with an online teacher", *train, "teacher.path=teacher",
            "teacher.dtype=float32", "run_dir=runs/online", expect="kdjax train done")
    w.works("eval a run", "eval", "runs/distilled", expect="ce:")
    w.works("eval the teacher (a plain HF model)", "eval", "--model", "teacher", "--data",
            "tokens/eval", "--store", "topk_eval", expect="kl_teacher")
    w.works("eval: a table of runs and the teacher", "eval", "runs/distilled",
            "runs/baseline", "--model", "teacher", "--data", "tokens/eval",
            expect="| run / model |")
    w.works("export", "export", "runs/distilled", "--out", "student_hf", expect="exported")
    w.check("export copies generation_config.json",
            (root / "student_hf" / "generation_config.json").is_file())

    print("the mistakes", flush=True)
    w.mistake("precompute a token store packed with another tokenizer", *pre[:3], "--tokens",
              "tokens_other/train", "--out", "wrong", expect="packed with another tokenizer")
    w.mistake("precompute: a missing teacher directory", "precompute", "--teacher",
              "SmolLM2-135M", "--tokens", "tokens/train", "--out", "x", expect="does not exist")
    w.mistake("precompute: a misspelled setting", *pre, "--out", "x", "topk=16",
              expect="did you mean 'k'")
    w.mistake("precompute: a missing token store", "precompute", "--teacher", "teacher",
              "--tokens", "tokens/trian", "--out", "x", expect="does not exist")
    w.mistake("precompute: other settings into an existing store", *pre, "--out", "topk",
              "k=8", expect="--overwrite")
    w.works("precompute a store of another tokenizer anyway (tokenizer=…)", "precompute",
            "--teacher", "teacher", "--tokens", "tokens_other/train", "--out", "store_other",
            "tokenizer=quickstart_tokenizer", "k=8", "batch_size=8", "progress=false")
    w.works("precompute a store of another sequence length", "precompute", "--teacher",
            "teacher", "--tokens", "tokens32/train", "--out", "store32", "k=8",
            "batch_size=8", "progress=false")
    w.mistake("train on a store of another tokenizer", *train, "store.path=store_other",
              "run_dir=runs/x", expect="another tokenizer")
    w.mistake("train on a store of another sequence length", *train, "store.path=store32",
              "run_dir=runs/x", expect="another sequence length")
    w.mistake("train: a misspelled key", *train, "optimizer.learning_rate=1e-3",
              expect="did you mean 'optimizer.lr'")
    w.mistake("train: a missing model directory", *train, "store.path=topk",
              "model.init=null", "model.path=SmolLM2-135M", expect="does not exist")
    w.mistake("inspect: a missing store", "inspect", "no_such_store", expect="does not exist")
    shutil.copytree(root / "topk", root / "damaged_json")
    (root / "damaged_json" / "arrays" / "ids" / "zarr.json").write_text('{"broken')
    w.mistake("inspect: a damaged zarr.json", "inspect", "damaged_json", status=3,
              expect="cannot open array")
    shutil.copytree(root / "topk", root / "damaged_chunk")
    chunk = next((root / "damaged_chunk" / "arrays" / "logprobs" / "c").rglob("0"))
    chunk = chunk if chunk.is_file() else next(f for f in chunk.rglob("*") if f.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    p = w.kdjax("inspect", "damaged_chunk")
    w.check(f"inspect: a damaged chunk → exit {p.returncode}",
            p.returncode == 3 and "CORRUPT" in p.stdout and "Traceback" not in p.stderr)
    w.mistake("train on a damaged store", *train, "store.path=damaged_json", "run_dir=runs/x",
              status=3, expect="cannot open array")
    w.mistake("eval: a missing run directory", "eval", "runs/nope", expect="does not exist")
    w.mistake("eval: a missing model directory", "eval", "--model", "nope", "--data",
              "tokens/eval", expect="does not exist")
    w.mistake("eval: a misspelled override", "eval", "runs/distilled", "eval.batchs=2",
              expect="did you mean 'eval.batches'")
    w.mistake("export: a missing run directory", "export", "runs/nope", "--out", "x",
              expect="does not exist")
    return w


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="directory to work in (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kdjax-walk-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        w = walk(root)
    finally:
        if not (args.keep or args.workdir):
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{w.steps - len(w.failures)} of {w.steps} checks passed in "
          f"{time.perf_counter() - t0:.0f} s" + (f"; FAILED: {w.failures}" if w.failures else ""))
    return 1 if w.failures else 0


if __name__ == "__main__":
    sys.exit(main())
