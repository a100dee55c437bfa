"""The jitted precompute step (teacher forward → signal) and per-shard statistics."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import platform
from kdjax.models.decoder import normalize_indices
from kdjax.teacher import signal
from kdjax.teacher.config import PrecomputeConfig


def normalize_layers(layers, num_layers: int) -> tuple[int, ...]:
    """Residual-stream indices in [0, num_layers] (negatives count from the end), sorted."""
    n = num_layers + 1
    return tuple(sorted(normalize_indices(
        layers, n, "hidden_layers", f"the teacher's {n} residual-stream states (0 = embeddings)")))


def build_step(model, config: PrecomputeConfig, batch_sharding: NamedSharding,
               hidden_layers: tuple[int, ...], chunk_tokens: int | None = None):
    """Returns `(step, state)`: `step(state, tokens, segment_ids, positions, rows)` → dict.

    Inputs are `[B, L]` int32 (rows `[B]` int32, the token-store row of each batch row,
    which seeds its draws). Outputs are batch-sharded: the signal arrays of the store
    (see `kdjax.teacher.signal`), `hidden_<layer>` `[B, L, H]`, and the per-position
    statistics `mass, distinct, dropped` `[B, L]`. The model is split into (graph, state)
    so its weights are an argument of the jitted function, not constants baked into it;
    the jitted step is cached on (graph, signal settings, sharding), so a rerun in the
    same process (resume, benchmark repeats) does not compile again. Sampled and top-k
    logits are computed `chunk_tokens` positions per device at a time (never all `[B, L,
    V]` at once; None: `kdjax.platform.precompute_chunk_tokens()`); dense mode stores the
    logits, so it computes them whole.
    """
    chunk_tokens = chunk_tokens or platform.precompute_chunk_tokens()
    graphdef, state = nnx.split(model)
    key = (config.mode, config.k, config.num_samples, config.num_slots,
           float(config.temperature), int(config.seed), config.dense_dtype,
           config.hidden_dtype, int(chunk_tokens))
    return _jitted_step(graphdef, key, batch_sharding, tuple(hidden_layers)), state


@functools.lru_cache(maxsize=8)
def _jitted_step(graphdef, key, batch_sharding, hidden_layers):
    (mode, k, num_samples, num_slots, temperature, seed, dense_dtype, hidden_dtype,
     chunk_tokens) = key

    def step(state, tokens, segment_ids, positions, rows):
        teacher = nnx.merge(graphdef, state)
        dense = mode == "dense"
        out = teacher(tokens, segment_ids=segment_ids, positions=positions,
                      return_logits=dense, hidden_layers=hidden_layers)
        shape = tokens.shape
        if dense:
            logits = out.logits
            sig = signal.dense_signal(logits, jnp.dtype(dense_dtype))
            sig.update(mass=jnp.ones(shape, jnp.float32),
                       distinct=jnp.full(shape, logits.shape[-1], jnp.int32),
                       dropped=jnp.zeros(shape, jnp.int32))
        else:
            sig = _mesh_signal(out.hidden, teacher.lm_head(), mode, batch_sharding,
                               keys=signal.row_keys(seed, rows) if mode == "sampled" else None,
                               k=k, num_samples=num_samples, num_slots=num_slots,
                               temperature=temperature, chunk_tokens=chunk_tokens)
            if mode == "topk":
                sig["distinct"] = jnp.full(shape, k, jnp.int32)
                sig["dropped"] = jnp.zeros(shape, jnp.int32)
        for h in hidden_layers:
            sig[f"hidden_{h}"] = out.hidden_states[h].astype(jnp.dtype(hidden_dtype))
        return sig

    return jax.jit(step, out_shardings=batch_sharding)


def _mesh_signal(hidden, lm_head, mode, batch_sharding: NamedSharding, *, keys,
                 chunk_tokens, **settings):
    """`signal.chunked_signal` on each device's own rows, in shard_map.

    Rows are split over the batch axes of `batch_sharding` and, when the local rows
    divide by them, further over the remaining mesh axes (tensor parallelism leaves the
    teacher's hidden states replicated there): every device reduces its own rows'
    full-vocabulary logits, chunk by chunk, against the gathered (parameter-sized)
    lm_head, so no `[tokens, V]` array is ever split over devices or gathered. Draws
    depend only on (seed, row), so the signal is the same on any mesh.
    """
    mesh = batch_sharding.mesh
    spec = batch_sharding.spec
    batch_axes = () if not len(spec) or spec[0] is None else (
        (spec[0],) if isinstance(spec[0], str) else tuple(spec[0]))
    rest = tuple(a for a in mesh.axis_names if a not in batch_axes and mesh.shape[a] > 1)
    local_rows = batch_sharding.shard_shape(hidden.shape[:2])[0]
    if rest and local_rows % math.prod(mesh.shape[a] for a in rest) == 0:
        batch_axes += rest
    rows_spec = P(batch_axes or None)
    per_device = hidden.shape[0] // math.prod(mesh.shape[a] for a in batch_axes)

    def local(h, w, *maybe_keys):
        return signal.chunked_signal(h, w, mode, keys=maybe_keys[0] if maybe_keys else None,
                                     chunk_len=max(1, chunk_tokens // per_device), **settings)

    args, in_specs = (hidden, lm_head), (rows_spec, P())
    if keys is not None:
        args, in_specs = (*args, keys), (*in_specs, rows_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=rows_spec,
                         check_vma=False)(*args)


def shard_stats(data: dict[str, np.ndarray | list[np.ndarray]], mode: str) -> dict:
    """Statistics of one written shard over its loss positions (loss_mask True). Values
    are arrays or lists of per-step parts (concatenated along rows here).

    `mass_sum` is Σ teacher mass on the kept ids (f64, in row order so a recomputed shard
    gives the same number); `overflow_positions` counts positions that drew more than U
    distinct ids; `dropped_samples` the draws lost to that limit; `max_id` the largest id
    with signal, so a run with a smaller vocabulary can be refused.
    """
    def get(name, dtype=None):
        v = data[name]
        return np.asarray(np.concatenate(v) if isinstance(v, list) else v, dtype)

    mask = get("loss_mask", bool)
    dropped = get("dropped", np.int64)[mask]
    out = {"positions": int(mask.sum()),
           "mass_sum": float(get("mass", np.float64)[mask].sum()),
           "distinct_sum": int(get("distinct", np.int64)[mask].sum()),
           "overflow_positions": int((dropped > 0).sum()),
           "dropped_samples": int(dropped.sum()),
           "max_id": -1}
    if mode in ("sampled", "topk") and mask.any():
        ids = get("ids")[mask]
        if mode == "sampled":
            ids = ids[get("counts")[mask] > 0]
        out["max_id"] = int(ids.max()) if ids.size else -1
    return out


def total_stats(infos: list[dict], mode: str, num_samples: int, vocab_size: int) -> dict:
    """Sums per-shard statistics (in shard order) into the manifest's `stats`."""
    keys = ("positions", "distinct_sum", "overflow_positions", "dropped_samples")
    tot = {k: sum(int(i[k]) for i in infos) for k in keys}
    mass = sum(float(i["mass_sum"]) for i in infos)
    n = max(tot["positions"], 1)
    stats = {"positions": tot["positions"], "mass_covered": mass / n,
             "distinct_per_position": tot["distinct_sum"] / n,
             "overflow_positions": tot["overflow_positions"],
             "overflow_rate": tot["overflow_positions"] / n,
             "dropped_samples": tot["dropped_samples"],
             "max_id": max((int(i["max_id"]) for i in infos), default=-1)}
    if mode == "sampled":
        stats["dropped_sample_rate"] = tot["dropped_samples"] / (n * num_samples)
    if mode == "dense":
        stats["max_id"] = vocab_size - 1
    return stats
