"""Abstract inputs of the real steps: no weights loaded, no data read.

Everything here is a `jax.ShapeDtypeStruct` carrying the `NamedSharding` the run would
give the array, built the way `kdjax train` / `kdjax precompute` build the real thing:
the student from `nnx.eval_shape` of its `Decoder` (f32 master copies, as
`create_train_state` keeps), the optimizer state from `jax.eval_shape(tx.init, params)`,
the batch with the loader's keys, dtypes and sharding, the teacher store's `teacher_*`
arrays from the store's manifest — or, when the store is not on this machine, from a
synthetic manifest for `store.mode` with the precompute settings (k, N, U) given.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kdjax.compile.presets import hf_config
from kdjax.sharding import logical_to_spec, state_shardings

SDS = jax.ShapeDtypeStruct


@dataclasses.dataclass(frozen=True)
class AbstractModel:
    """A decoder without weights: `graphdef`, `params` / `rest` pure dicts of sharded
    ShapeDtypeStructs (`rest` None when empty), its `config` and where that came from."""

    graphdef: Any
    params: dict
    rest: dict | None
    config: Any
    source: str


def decoder_config(path: str, **overrides):
    """`(DecoderConfig, source)` of a model directory: its local config.json, else the
    built-in architecture its name matches (see `presets`), with `overrides` (dtype, …)."""
    from kdjax.models import DecoderConfig

    data, source = hf_config(path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return DecoderConfig.from_hf(data, **overrides), source


def abstract_model(cfg, mesh, *, source: str = "", f32_params: bool = False) -> AbstractModel:
    """The sharded abstract `Decoder(cfg)`; `f32_params` stores floating params as f32
    (the train state's master weights, whatever `param_dtype` says)."""
    from kdjax.models import Decoder

    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shardings = nnx.to_pure_dict(state_shardings(params, mesh))

    def place(x, sharding):
        dtype = jnp.float32 if f32_params and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return SDS(x.shape, dtype, sharding=sharding)

    params = jax.tree.map(place, nnx.to_pure_dict(params), shardings)
    rest = nnx.to_pure_dict(rest)
    replicated = NamedSharding(mesh, PartitionSpec())
    rest = jax.tree.map(lambda x: SDS(x.shape, x.dtype, sharding=replicated), rest)
    return AbstractModel(graphdef, params, rest if jax.tree.leaves(rest) else None, cfg, source)


def batch_sharding(mesh) -> NamedSharding:
    """The loader's sharding: the first (batch) axis over the `batch` logical axis."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))


def token_batch(rows: int, seq_len: int, mesh) -> dict[str, SDS]:
    """`tokens, targets, segment_ids, positions` int32 and `loss_mask` bool `[rows, L]`,
    as `Loader.batch_at` returns them."""
    sh = batch_sharding(mesh)
    out = {k: SDS((rows, seq_len), jnp.int32, sharding=sh)
           for k in ("tokens", "targets", "segment_ids", "positions")}
    out["loss_mask"] = SDS((rows, seq_len), jnp.bool_, sharding=sh)
    return out


def teacher_batch(manifest: dict, rows: int, mesh) -> dict[str, SDS]:
    """The `teacher_*` batch arrays the loader merges from a store with this manifest:
    the loss arrays of its mode and its hidden states (stored dtypes, `[rows, L, ...]`)."""
    from kdjax.teacher.store import LOSS_ARRAYS

    sh = batch_sharding(mesh)
    names = LOSS_ARRAYS[manifest["mode"]] + tuple(
        f"hidden_{int(h)}" for h in manifest.get("hidden_layers") or ())
    return {f"teacher_{n}": SDS((rows, *manifest["arrays"][n]["shape"][1:]),
                                np.dtype(manifest["arrays"][n]["dtype"]), sharding=sh)
            for n in names}


def synthetic_manifest(mode: str, *, seq_len: int, vocab_size: int, precompute,
                       hidden_size: int = 0) -> dict:
    """What `kdjax precompute` with `precompute` (a PrecomputeConfig) would record about its
    arrays and signal, for a store that is not on this machine."""
    from kdjax.teacher.store import array_layout

    layout = array_layout(mode=mode, seq_len=seq_len, vocab_size=vocab_size, k=precompute.k,
                          num_samples=precompute.num_samples, num_slots=precompute.num_slots,
                          logprob_dtype=precompute.logprob_dtype,
                          dense_dtype=precompute.dense_dtype,
                          hidden_layers=precompute.hidden_layers, hidden_size=hidden_size,
                          hidden_dtype=precompute.hidden_dtype)
    return {"mode": mode, "vocab_size": vocab_size, "seq_len": seq_len,
            "temperature": precompute.temperature,
            "k": precompute.k if mode == "topk" else None,
            "num_samples": precompute.num_samples if mode == "sampled" else None,
            "num_slots": precompute.num_slots if mode == "sampled" else None,
            "hidden_layers": list(precompute.hidden_layers), "hidden_size": hidden_size,
            "arrays": {n: {"shape": [0, *shape], "dtype": str(np.dtype(dt))}
                       for n, (shape, dt) in layout.items()}, "synthetic": True}


def store_manifest(path: str | None, mode: str | None, **synthetic) -> dict | None:
    """The manifest of the store at `path` when it is on this machine, else a synthetic one
    for `mode` (see `synthetic_manifest`); None without a store."""
    if path is None:
        return None
    if os.path.isfile(os.path.join(path, "manifest.json")):
        from kdjax.teacher import open_teacher_store

        return dict(open_teacher_store(path).manifest)
    if mode is None:
        raise ValueError(f"the teacher store {path} is not on this machine and store.mode is "
                         "not set, so its arrays are unknown; add store.mode=sampled (or "
                         "topk / dense)")
    return synthetic_manifest(mode, **synthetic)


def seq_len_of(config) -> int:
    """Row length L of the run: the local token store's, else `data.seq_len`."""
    path = os.path.join(config.data.train, "manifest.json")
    if os.path.isfile(path):
        from kdjax.data import open_token_store

        return int(open_token_store(config.data.train).seq_len)
    if config.data.seq_len:
        return int(config.data.seq_len)
    raise ValueError(f"the row length is unknown: the token store {config.data.train} is not "
                     "on this machine and data.seq_len is not set; add data.seq_len=4096 "
                     "(the --seq-len the store was packed with)")
