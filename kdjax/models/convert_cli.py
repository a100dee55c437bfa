"""`kdjax convert MODEL.gguf --out DIR`: a GGUF checkpoint (llama.cpp's format, e.g. a
quantized Llama / Qwen) as a Hugging Face safetensors directory that kdjax and
transformers load: config.json, model.safetensors, generation_config.json and the
tokenizer (with its chat template).

Quantized weights are dequantized (then stored in --dtype). The directory is written
next to --out and renamed into place at the end, so a failed run leaves nothing behind.
Needs the optional extra: pip install 'kdjax[gguf]'.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="a GGUF checkpoint → a Hugging Face "
                              "safetensors directory", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.gguf", help="the .gguf file to convert")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="stored dtype of the weights (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_convert)


def _size(n: float, units: tuple[str, ...], base: int) -> str:
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= base
    return f"{n:.1f} {units[-1]}"


def run_convert(args: argparse.Namespace) -> int:
    from .gguf import convert_gguf

    start = time.perf_counter()
    try:
        s = convert_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except ImportError as e:  # the missing extra: a user error, one line
        print(f"kdjax convert: {e}", file=sys.stderr)
        return 2
    params = _size(s["params"], ("", "K", "M", "B"), 1000).replace(" ", "")
    written = _size(s["bytes"], ("B", "KB", "MB", "GB", "TB"), 1000)
    print(f"{args.model} → {s['out']}: {s['architecture']}, {s['layers']} layers, "
          f"vocab {s['vocab_size']}, hidden {s['hidden_size']}, {params} params, "
          f"{s['dtype']}, {written} written ({len(s['files'])} files"
          f"{'' if s['tokenizer'] else ', no tokenizer'}) in "
          f"{time.perf_counter() - start:.1f}s")
    return 0
