"""`DecoderConfig`: the one description of a decoder, with conversion to and from
transformers' config objects (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

Imports no JAX (config parsing validates `model.init` with it), and owns the names the
settings choose from: `DTYPES`, `REMAT_POLICIES`, `ATTENTION_IMPLS`, `FAMILIES`."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# compute / parameter dtypes a model section may name (student, online teacher, precompute)
DTYPES = ("float32", "bfloat16", "float16")
# per-layer jax.checkpoint policies (`kdjax.models.blocks.REMAT` maps them to policies)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# "auto" picks the platform's fused kernel (`kdjax.platform.attention_impl`)
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# rope_parameters keys that each rope_type needs (besides rope_type and rope_theta)
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only transformer: pre-norm RMSNorm blocks with GQA + RoPE attention and a
    SwiGLU MLP (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
        head_dim: sizes; `head_dim=None` means `hidden_size // num_heads`.
      rope_theta: RoPE base. rope_scaling: None or a dict with `rope_type` in
        ("linear", "llama3") and that type's keys (transformers' `rope_parameters`).
      rms_norm_eps: RMSNorm epsilon. tie_word_embeddings: lm_head = embedding.T.
      attention_bias: bias on q/k/v projections. attention_out_bias: bias on o_proj
        (Llama/Qwen3 `attention_bias=True` sets both; Qwen2 has only q/k/v biases).
      qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
      sliding_window: None, or keys more than `sliding_window - 1` positions back are
        masked (Mistral).
      max_position_embeddings: longest position the model was trained for.
      family: one of FAMILIES; chooses the transformers class on export.
      param_dtype: dtype of stored (master) parameters; dtype: compute dtype.
      remat: "none" | "full" | "dots" | "dots_no_batch" (jax.checkpoint policy per layer).
      scan_layers: run the stacked layers with `lax.scan` (compile time and program size
        independent of depth); False runs a Python loop over the same stacked
        parameters (the reference, and the compile-time baseline). Parameters are
        stacked on a leading "layers" axis either way.
      attention_impl: "auto" | "xla" | "cudnn" | "splash": the attention kernel. "auto"
        picks the platform's fused kernel (`kdjax.platform.attention_impl`: cpu → xla,
        gpu → cudnn, tpu → splash); "xla" is the reference. Layers whose scores are
        requested and KV-cache decoding always use "xla".
      bos_token_id, eos_token_id, pad_token_id: carried through to/from transformers.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    family: str = "llama"
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    attention_impl: str = "auto"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):  # hashable and immutable for jit
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even for RoPE")
        for name, choices, note in (
                ("family", FAMILIES, " (the supported families)"), ("remat", REMAT_POLICIES, ""),
                ("attention_impl", ATTENTION_IMPLS, " ('auto' picks the platform's kernel)")):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"DecoderConfig.{name}={value!r}; choose one of "
                                 f"{choices}{note}")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"DecoderConfig.scan_layers must be True or False, got "
                             f"{self.scan_layers!r}")
        for name in ("param_dtype", "dtype"):
            try:
                np.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r} is not a "
                                 "dtype name (e.g. 'float32', 'bfloat16')") from e
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"DecoderConfig.sliding_window must be None or > 0, got "
                             f"{self.sliding_window}")
        _check_rope_scaling(self.rope_scaling)

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count (embedding and lm_head counted once each, once if tied)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) * self.attention_bias + h * self.attention_out_bias
        attn += 2 * d * self.qk_norm
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else h * self.vocab_size
        return self.num_layers * layer + self.vocab_size * h + head + h

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> DecoderConfig:
        """From a transformers `PretrainedConfig` (or its `to_dict()`); unsupported
        architectures and options raise ValueError naming them."""
        from .hf_config import config_from_hf

        return config_from_hf(cls, hf_config, **overrides)

    def to_hf(self):
        """A transformers config of the matching class (LlamaConfig, Qwen3Config, …)."""
        from .hf_config import config_to_hf

        return config_to_hf(self)

    @property
    def architecture(self) -> str:
        return _ARCHITECTURES[self.family]


class _FrozenDict(dict):
    """A dict that hashes (so configs can be static jit arguments) and refuses edits."""

    def __hash__(self):
        return hash(tuple(sorted((k, repr(v)) for k, v in self.items())))

    def _refuse(self, *args, **kwargs):
        raise TypeError("DecoderConfig.rope_scaling is read-only; use config.replace(...)")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse


def _check_rope_scaling(scaling) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling rope_type={rope_type!r} is not supported; kdjax "
                         f"implements {ROPE_TYPES}")
    missing = [k for k in _ROPE_KEYS[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs keys {missing}; "
                         f"got {dict(scaling)}")
