"""Conversion between `DecoderConfig` and transformers' Llama/Mistral/Qwen2/Qwen3 configs.

Only options that change the forward are read; anything kdjax does not implement
(another activation, MLP biases, partial rotary, yarn RoPE, mixed sliding layers)
is refused with an error that names the option and its value.
"""

from __future__ import annotations

from typing import Any

_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_ROPE_META = ("rope_type", "type", "rope_theta")


def _get(hf: Any, name: str, default=None):
    if isinstance(hf, dict):
        return hf.get(name, default)
    return getattr(hf, name, default)


def _unsupported(option: str, value, why: str) -> ValueError:
    return ValueError(f"unsupported config option {option}={value!r}: {why}")


def _rope_from_hf(hf) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = dict(_get(hf, "rope_parameters") or {})
    if not params:
        params = dict(_get(hf, "rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise _unsupported("rope_parameters", params, "per-layer-type RoPE is not implemented")
    theta = params.get("rope_theta", _get(hf, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", _get(hf, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise _unsupported("partial_rotary_factor", partial, "kdjax rotates the full head_dim")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    scaling = {k: v for k, v in params.items() if k not in _ROPE_META}
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings",
                           _get(hf, "max_position_embeddings"))
    return float(theta), {"rope_type": rope_type, **scaling}


def _sliding_from_hf(hf, family: str, num_layers: int) -> int | None:
    window = _get(hf, "sliding_window")
    if family == "llama" or window is None:
        return None
    if family in ("qwen2", "qwen3") and not _get(hf, "use_sliding_window", False):
        return None
    layer_types = _get(hf, "layer_types") or ["sliding_attention"] * num_layers
    if family != "mistral" and len(set(layer_types)) > 1:
        raise _unsupported("layer_types", layer_types,
                           "kdjax applies sliding_window to all layers or none "
                           "(set max_window_layers=0 or use_sliding_window=False)")
    return int(window)


def config_from_hf(cls, hf, **overrides):
    """`DecoderConfig` from a transformers config object or dict."""
    model_type = _get(hf, "model_type")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"unsupported architecture model_type={model_type!r} "
                         f"(architectures={_get(hf, 'architectures')}); kdjax supports "
                         f"{_MODEL_TYPES}")
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        raise _unsupported("hidden_act", act, "kdjax implements SwiGLU with silu only")
    if _get(hf, "mlp_bias", False):
        raise _unsupported("mlp_bias", True, "kdjax MLPs have no biases")
    num_layers = _get(hf, "num_hidden_layers")
    num_heads = _get(hf, "num_attention_heads")
    hidden = _get(hf, "hidden_size")
    theta, scaling = _rope_from_hf(hf)
    if model_type == "qwen2":
        bias, out_bias = True, False
    else:
        bias = out_bias = bool(_get(hf, "attention_bias", False))
    kwargs = dict(
        vocab_size=_get(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_get(hf, "intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=_get(hf, "num_key_value_heads") or num_heads,
        head_dim=_get(hf, "head_dim") or hidden // num_heads,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
        attention_bias=bias,
        attention_out_bias=out_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_from_hf(hf, model_type, num_layers),
        max_position_embeddings=_get(hf, "max_position_embeddings", 2048),
        family=model_type,
        bos_token_id=_get(hf, "bos_token_id"),
        eos_token_id=_get(hf, "eos_token_id"),
        pad_token_id=_get(hf, "pad_token_id"),
    )
    kwargs.update(overrides)
    return cls(**kwargs)


def _check_exportable(cfg) -> None:
    fam = cfg.family
    if fam == "qwen2":
        if not cfg.attention_bias or cfg.attention_out_bias:
            raise _unsupported("attention_bias", (cfg.attention_bias, cfg.attention_out_bias),
                               "Qwen2 always has q/k/v biases and no o_proj bias")
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            raise _unsupported("head_dim", cfg.head_dim,
                               "Qwen2 needs head_dim == hidden_size // num_heads")
    elif fam == "mistral":
        if cfg.attention_bias or cfg.attention_out_bias:
            raise _unsupported("attention_bias", True, "Mistral has no attention biases")
    elif cfg.attention_bias != cfg.attention_out_bias:
        raise _unsupported("attention_out_bias", cfg.attention_out_bias,
                           f"{fam} uses one attention_bias flag for q/k/v and o_proj")
    if cfg.qk_norm != (fam == "qwen3"):
        raise _unsupported("qk_norm", cfg.qk_norm, f"family {fam!r} fixes qk_norm="
                           f"{fam == 'qwen3'}; choose family='qwen3' for q/k norms")
    if cfg.sliding_window is not None and fam == "llama":
        raise _unsupported("sliding_window", cfg.sliding_window,
                           "Llama has no sliding window; use family='mistral'")


def config_to_hf(cfg):
    """A transformers config for `cfg` (class chosen by `cfg.family`)."""
    import transformers

    _check_exportable(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(dict(cfg.rope_scaling))
    eos = cfg.eos_token_id
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, rope_parameters=rope,
        bos_token_id=cfg.bos_token_id, eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        pad_token_id=cfg.pad_token_id, hidden_act="silu",
        architectures=[cfg.architecture],
    )
    if cfg.family != "qwen2":
        kwargs["head_dim"] = cfg.head_dim
    if cfg.family in ("llama", "qwen3"):
        kwargs["attention_bias"] = cfg.attention_bias
    if cfg.family == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    elif cfg.family in ("qwen2", "qwen3"):
        kwargs.update(use_sliding_window=cfg.sliding_window is not None,
                      sliding_window=cfg.sliding_window, max_window_layers=0)
    config_cls = getattr(transformers, cfg.architecture.replace("ForCausalLM", "Config"))
    return config_cls(**kwargs)
