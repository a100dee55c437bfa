"""Architectures of well-known checkpoints, for compiling a config whose model directory is
not on this machine (a pod's shared file system, seen from a laptop).

Each entry is the subset of the model's public Hugging Face `config.json` that
`DecoderConfig.from_hf` reads, copied from the model cards' config files
(huggingface.co/<org>/<name>/blob/main/config.json). A local `config.json` always wins;
a directory named like an entry (case-insensitive, any parent path) falls back to it.
"""

from __future__ import annotations

import json
import os

_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8,
               rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=128000,
               eos_token_id=128001, hidden_act="silu")
_QWEN25 = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
               max_position_embeddings=32768, use_sliding_window=False,
               bos_token_id=151643, eos_token_id=151645)


def _llama3_rope(factor: float) -> dict:
    return dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))


PRESETS: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, head_dim=64,
                         tie_word_embeddings=True, **_llama3_rope(32.0)),
    "llama-3.2-3b": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, head_dim=128,
                         tie_word_embeddings=True, **_llama3_rope(32.0)),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, head_dim=128,
                         tie_word_embeddings=False, **_llama3_rope(8.0)),
    "qwen2.5-0.5b": dict(_QWEN25, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False),
}


def _preset_name(path: str) -> str | None:
    name = os.path.basename(os.path.normpath(str(path))).lower()
    for suffix in ("-instruct", "-it"):
        name = name.removesuffix(suffix)
    return name if name in PRESETS else None


def hf_config(path: str) -> tuple[dict, str]:
    """`(config.json dict, where it came from)` for a model directory: the local file, else
    the built-in entry matching the directory's name.

    Raises:
      FileNotFoundError: neither exists; the message lists the known names.
    """
    local = os.path.join(os.path.expanduser(str(path)), "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            data = json.load(f)
        return data.get("text_config", data), local
    name = _preset_name(path)
    if name is None:
        raise FileNotFoundError(
            f"{path} has no config.json on this machine and its name matches no built-in "
            f"architecture ({', '.join(sorted(PRESETS))}); copy the checkpoint's config.json "
            "there (weights are not needed) or use a directory named after one of these")
    return dict(PRESETS[name]), f"built-in {name} architecture (no {local})"
