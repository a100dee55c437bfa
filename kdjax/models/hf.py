"""Hugging Face interop: `from_pretrained` reads a local transformers checkpoint directory
into a `Decoder` (sharded when a mesh is given), `save_pretrained` writes one that
transformers loads.

transformers stores `nn.Linear` weights as `[out, in]`; kdjax keeps heads as their
own axis (`q: [H, heads, head_dim]`, `o: [heads, head_dim, H]`), so each tensor maps
by a reshape and a transpose, both views on the memory map: only the slice a device
needs is ever copied. kdjax stacks the blocks' parameters on a leading layer axis
(`layers.attn.q.kernel: [num_layers, H, heads, head_dim]`); transformers' per-layer
tensors (`model.layers.{i}.self_attn.q_proj.weight`) are its slices, read and written
one layer at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from kdjax.sharding import named_sharding, variable_logical_axes

from . import safetensors_io
from .config import DecoderConfig
from .decoder import Decoder

# buffers some older checkpoints carry that are recomputed, never loaded
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _layout(path: tuple, cfg: DecoderConfig) -> list[tuple]:
    """`[(hf_name, hf_shape, view_shape, perm), ...]` for a kdjax parameter: one entry, or
    for a stacked block parameter (`("layers", ...)`) one per layer in order; the kdjax
    value (its layer i) = `W.reshape(view).transpose(perm)`."""
    if path[0] == "layers":
        return [_layer_layout(i, tuple(path[1:]), cfg) for i in range(cfg.num_layers)]
    h, v = cfg.hidden_size, cfg.vocab_size
    if path == ("embed",):
        return [("model.embed_tokens.weight", (v, h), (v, h), (0, 1))]
    if path == ("unembed",):
        return [("lm_head.weight", (v, h), (v, h), (1, 0))]
    if path == ("norm", "scale"):
        return [("model.norm.weight", (h,), (h,), (0,))]
    raise ValueError(f"no transformers tensor for kdjax parameter {path}")


def _layer_layout(i: int, rest: tuple, cfg: DecoderConfig):
    h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    m = cfg.intermediate_size
    prefix = f"model.layers.{i}."
    norms = {("attn_norm", "scale"): "input_layernorm",
             ("mlp_norm", "scale"): "post_attention_layernorm"}
    if rest in norms:
        return prefix + norms[rest] + ".weight", (h,), (h,), (0,)
    if rest[0] == "mlp":
        name = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[rest[1]]
        shape = (h, m) if rest[1] == "down" else (m, h)
        return prefix + f"mlp.{name}.weight", shape, shape, (1, 0)
    proj, kind = rest[1], rest[2]
    base = prefix + "self_attn."
    if proj in ("q_norm", "k_norm"):
        return base + proj + ".weight", (d,), (d,), (0,)
    heads = n if proj in ("q", "o") else k
    name = base + f"{proj}_proj." + ("weight" if kind == "kernel" else "bias")
    if proj == "o":
        if kind == "bias":
            return name, (h,), (h,), (0,)
        return name, (h, n * d), (h, n, d), (1, 2, 0)
    if kind == "bias":
        return name, (heads * d,), (heads, d), (0, 1)
    return name, (heads * d, h), (heads, d, h), (2, 0, 1)


def _abstract_state(cfg: DecoderConfig):
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def from_pretrained(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                    dtype=None, param_dtype=None, **config_overrides) -> Decoder:
    """Loads a local transformers checkpoint directory (config.json + safetensors, single
    or sharded with an index) into a `Decoder`.

    Each tensor is memory-mapped and copied one device slice at a time straight into its
    sharding (`mesh` given) or onto the default device, converted to `param_dtype`.

    Args:
      path: directory written by transformers' `save_pretrained` (or kdjax's), or a
        `.gguf` file (dequantized; needs the `gguf` extra, see `kdjax.models.gguf`).
      mesh: optional mesh; parameters are sharded by their logical axes
        (kdjax.sharding.LOGICAL_RULES).
      dtype: compute dtype (default float32). param_dtype: stored dtype (default float32).
      **config_overrides: other `DecoderConfig` fields (e.g. `remat="full"`).

    Raises:
      ValueError: unsupported architecture/option, or a missing, unexpected or
        wrong-shaped tensor (named in the message).
    """
    from transformers import AutoConfig

    path = Path(path)
    gguf_file = path.suffix.lower() == ".gguf" and not path.is_dir()
    if gguf_file:
        from . import gguf

        hf_config = gguf.load_hf_config(path)  # checks file, extra and architecture
    elif not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; pass a directory written by "
                                "transformers' save_pretrained")
    else:
        hf_config = AutoConfig.from_pretrained(path)
    overrides = dict(config_overrides)
    if dtype is not None:
        overrides["dtype"] = jnp.dtype(dtype).name
    if param_dtype is not None:
        overrides["param_dtype"] = jnp.dtype(param_dtype).name
    # config first: an unsupported option fails before any tensor is read or dequantized
    cfg = DecoderConfig.from_hf(hf_config, **overrides)
    tensors = gguf.gguf_tensors(path) if gguf_file else safetensors_io.open_tensors(path)
    return from_tensors(cfg, tensors, mesh=mesh, source=path)


def from_tensors(cfg: DecoderConfig, tensors, *, mesh: jax.sharding.Mesh | None = None,
                 source: str | os.PathLike = "tensors") -> Decoder:
    """A `Decoder` of `cfg` from `tensors`, a mapping of transformers tensor names to
    array-likes (numpy arrays or memory maps) in transformers' layouts; `source` names
    them in errors. (`from_pretrained` without the reading of config.json.)"""
    path = Path(source)
    graphdef, state = _abstract_state(cfg)
    flat = list(nnx.to_flat_state(state))
    expected = {e[0] for p, _ in flat for e in _layout(p, cfg)}
    unexpected = sorted(n for n in tensors if n not in expected
                        and not n.endswith(_IGNORED_SUFFIXES)
                        and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors that a {cfg.family} model with this "
                         f"config does not use: {unexpected[:8]}"
                         f"{' …' if len(unexpected) > 8 else ''}; check config.json "
                         "(e.g. attention_bias, tie_word_embeddings) matches the weights")
    loaded = []
    for p, var in tqdm(flat, desc=f"loading {path.name}", unit="tensor", leave=False,
                       disable=len(expected) < 64):
        loaded.append((p, var.replace(_load_one(p, var, tensors, cfg, mesh, path))))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _load_one(p, var, tensors, cfg, mesh, path):
    """The value of parameter `p`: its tensor, or its layers' tensors stacked, converted
    and placed (one device slice at a time with a mesh)."""
    srcs = [_source(tensors, entry, path) for entry in _layout(p, cfg)]
    stacked = p[0] == "layers"
    target = var.get_value()
    out_dtype = np.dtype(target.dtype)

    def read(idx=()):
        # np.array(copy=True): jax may alias host numpy memory on CPU, and the parameters
        # must never alias the checkpoint's memory map (the file can be replaced later)
        if not stacked:
            return np.array(srcs[0][idx], dtype=out_dtype, copy=True)
        layers, rest = (idx[0], idx[1:]) if idx else (slice(None), ())
        return np.stack([np.asarray(src[rest], dtype=out_dtype) for src in srcs[layers]])

    if mesh is None:
        return jnp.asarray(read())
    sharding = named_sharding(mesh, variable_logical_axes(var), target.shape)
    return jax.make_array_from_callback(target.shape, sharding, read)


def _source(tensors, entry, path):
    """One transformers tensor, checked, as a view in kdjax's layout."""
    name, hf_shape, view, perm = entry
    if name not in tensors:
        hint = " (config says tie_word_embeddings=False)" if name == "lm_head.weight" else ""
        raise ValueError(f"checkpoint {path} is missing tensor {name!r}{hint}")
    raw = tensors[name]
    if tuple(raw.shape) != hf_shape:
        raise ValueError(f"tensor {name!r} in {path} has shape {tuple(raw.shape)}, but the "
                         f"config implies {hf_shape}")
    return raw.reshape(view).transpose(perm)  # views on the memory map


def save_pretrained(model: Decoder, path: str | os.PathLike, *, dtype=None,
                    max_shard_size: int = 4 << 30) -> Path:
    """Writes `model` as a transformers checkpoint: config.json (LlamaConfig, Qwen3Config,
    … by `config.family`) and safetensors (sharded with an index above
    `max_shard_size` bytes). Tensors are gathered and written one at a time.

    Args:
      dtype: stored dtype (default: the parameters' dtype), e.g. "bfloat16".
    Returns the directory.
    """
    cfg = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg.to_hf().save_pretrained(path)
    state = nnx.state(model, nnx.Param)
    by_name, specs = {}, []
    for p, var in nnx.to_flat_state(state):
        value = var.get_value()
        out = np.dtype(dtype) if dtype is not None else np.dtype(value.dtype)
        for layer, (name, hf_shape, _view, perm) in enumerate(_layout(p, cfg)):
            by_name[name] = (value, layer if p[0] == "layers" else None, perm, hf_shape)
            specs.append((name, hf_shape, out))
    specs.sort(key=lambda s: _hf_order(s[0]))

    def produce(name):
        value, layer, perm, hf_shape = by_name[name]
        if layer is not None:
            value = value[layer]  # one layer gathered at a time
        inverse = np.argsort(perm)
        return np.asarray(jax.device_get(value)).transpose(inverse).reshape(hf_shape)

    safetensors_io.write_tensors(path, specs, produce, max_shard_size=max_shard_size)
    return path


def _hf_order(name: str):
    parts = name.split(".")
    layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1
    return (name.startswith("lm_head"), layer, name)
