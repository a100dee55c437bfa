"""GGUF checkpoints (llama.cpp's single-file format): load one as a `Decoder`, or convert
it to a Hugging Face safetensors directory.

transformers reads the file (through the `gguf` package, dequantizing every tensor to
float32 and undoing llama.cpp's q/k row permutation); kdjax then takes the resulting
state dict exactly as it takes a safetensors checkpoint (`kdjax.models.hf.from_tensors`),
so a GGUF loads to the same model as its conversion does.

Needs the optional extra: `pip install 'kdjax[gguf]'` (gguf, torch, accelerate).
Architectures: those kdjax implements — GGUF `general.architecture` llama (Llama, and
Mistral, which llama.cpp files as llama), qwen2 and qwen3.

Note: transformers' GGUF loader ignores llama.cpp's `rope_freqs` tensor (Llama 3.1+
RoPE scaling); such files load without RoPE scaling, as in transformers (a warning
says so). Convert the original Hugging Face checkpoint for those models.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# GGUF `general.architecture` values that map to a kdjax family
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
CONVERT_DTYPES = ("float32", "bfloat16", "float16")
EXTRA_HINT = "pip install 'kdjax[gguf]'"


def require_extra() -> None:
    """Raises ModuleNotFoundError naming the `gguf` extra when a package it installs
    (gguf, torch, accelerate: what transformers needs to read GGUF) is missing."""
    for module in ("gguf", "torch", "accelerate"):
        try:
            __import__(module)
        except ImportError as e:
            raise ModuleNotFoundError(
                f"reading GGUF files needs the optional packages gguf, torch and accelerate "
                f"({module} is not installed): {EXTRA_HINT}", name=module) from e


def check_gguf_file(path: str | os.PathLike) -> Path:
    """`path` as a Path, after checking it is an existing file that starts with the GGUF
    magic bytes (FileNotFoundError / IsADirectoryError / ValueError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a .gguf file (for a Hugging "
                                "Face directory use it directly, no conversion is needed)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not "
                         f"{GGUF_MAGIC!r}")
    return path


def gguf_metadata(path: str | os.PathLike) -> dict:
    """The few header facts kdjax checks before loading: `architecture`, `name`,
    `tensors` (names). Reads the header only (the tensor data stays memory-mapped)."""
    from gguf import GGUFReader

    path = check_gguf_file(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated or damaged header
        raise ValueError(f"{path} could not be read as GGUF: {type(e).__name__}: {e}") from e

    def text(key):
        field = reader.fields.get(key)
        if field is None or not field.data:
            return None
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")

    return {"architecture": text("general.architecture"), "name": text("general.name"),
            "tensors": [t.name for t in reader.tensors]}


def _check_supported(path: Path) -> dict:
    meta = gguf_metadata(path)
    arch = meta["architecture"]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture general.architecture={arch!r} in "
                         f"{path}; kdjax supports {SUPPORTED_ARCHITECTURES}")
    if "rope_freqs.weight" in meta["tensors"]:
        warnings.warn(f"{path} has a rope_freqs tensor (Llama 3.1+ RoPE scaling) that "
                      "transformers' GGUF loader, and so kdjax, ignores: the model loads "
                      "without RoPE scaling. Convert the original Hugging Face checkpoint "
                      "for exact results.", stacklevel=3)
    return meta


def _checked(path) -> Path:
    require_extra()
    path = check_gguf_file(path)
    _check_supported(path)
    return path


def load_hf_config(path: str | os.PathLike, *, check: bool = True):
    """The transformers config transformers derives from the GGUF header (no tensors
    read), after the file, extra and architecture checks (`check=False`: done already)."""
    path = _checked(path) if check else Path(path)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


def load_torch_model(path: str | os.PathLike, *, check: bool = True):
    """The transformers model (float32, dequantized) of a GGUF file, after the checks."""
    path = _checked(path) if check else Path(path)
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer (vocabulary, merges, special tokens, chat template) a GGUF file
    describes, as transformers builds it."""
    require_extra()
    path = check_gguf_file(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def gguf_tensors(path: str | os.PathLike) -> dict:
    """The file's tensors, dequantized to float32 NumPy arrays under their transformers
    names (what `kdjax.models.from_pretrained` loads a `.gguf` file from)."""
    model = load_torch_model(path, check=False)
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def _plain_model(model, torch_dtype):
    """A plain (not GGUF-marked) transformers model of `model`'s config holding its
    weights in `torch_dtype`: transformers refuses `save_pretrained` on a GGUF-loaded
    model, so its state dict moves into a fresh one (built on the meta device, so no
    random initialization and no copy in float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    converted = {}  # tied tensors stay one tensor
    state = {name: converted.setdefault(id(t), t.detach().to(torch_dtype))
             for name, t in model.state_dict().items()}
    plain.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str = "float32", overwrite: bool = False) -> dict:
    """Writes a `.gguf` file as a Hugging Face directory: config.json, model.safetensors
    (sharded above 5 GB), generation_config.json and the tokenizer's files.

    Atomic: everything is written to a temporary directory next to `out_dir` that is
    renamed to `out_dir` at the end; a failure leaves no `out_dir` (and, with
    `overwrite`, the old one untouched).

    Args:
      dtype: stored dtype, one of CONVERT_DTYPES (the GGUF's quantized weights are
        dequantized to float32 first).
      overwrite: replace an existing `out_dir` (refused otherwise).
    Returns a summary: architecture, model_type, layers, vocab_size, hidden_size,
      params, dtype, bytes (written), files, tokenizer (whether one was written), out.
    Raises FileExistsError for an existing `out_dir` without `overwrite`, and what
      `from_gguf` raises.
    """
    path, out = Path(path), Path(out_dir)
    if dtype not in CONVERT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {CONVERT_DTYPES}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    from .config import DecoderConfig

    # checks the file, extra and architecture; only what kdjax can load is converted, and
    # an unsupported option fails before any tensor is dequantized
    DecoderConfig.from_hf(load_hf_config(path))
    model = load_torch_model(path, check=False)
    import torch

    plain = _plain_model(model, getattr(torch, dtype))
    del model
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
            has_tokenizer = True
        except Exception as e:  # the weights are still worth having
            warnings.warn(f"{path}: no tokenizer written ({type(e).__name__}: {e})",
                          stacklevel=2)
            has_tokenizer = False
        files = sorted(p.name for p in tmp.iterdir())
        written = sum(p.stat().st_size for p in tmp.iterdir())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cfg = plain.config
    return {
        "architecture": (cfg.architectures or [type(plain).__name__])[0],
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "params": sum(p.numel() for p in plain.parameters()),
        "dtype": dtype,
        "bytes": written,
        "files": files,
        "tokenizer": has_tokenizer,
        "out": str(out),
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Renames `tmp` to `out`; an existing `out` is moved aside first and deleted only
    after the rename (restored if the rename fails)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
