"""Vocabulary-axis reductions that also work on a vocab-sharded chunk inside shard_map.

With `axis=None` the chunk holds the whole vocabulary and these are plain reductions.
With a mesh axis name, each device holds a contiguous slice `[offset, offset + V_local)`
of the vocabulary (lm_head sharded column-wise) and the reductions combine shards with
pmax/psum (Megatron-style vocab-parallel cross-entropy, Shoeybi et al., 2019).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def psum(x: Array, axis: str | None) -> Array:
    return x if axis is None else lax.psum(x, axis)


def vocab_offset(v_local: int, axis: str | None):
    """First global vocabulary id held by this device."""
    return 0 if axis is None else lax.axis_index(axis) * v_local


def logsumexp(x: Array, axis: str | None) -> Array:
    """log Σ_v exp(x_v) over the (possibly sharded) last axis, `[C, V_local]` → `[C]`."""
    # The max only stabilizes; the value does not depend on it, so no gradient through it.
    m = lax.stop_gradient(jnp.max(x, axis=-1))
    if axis is not None:
        m = lax.pmax(m, axis)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    s = psum(jnp.sum(jnp.exp(x - m[:, None]), axis=-1), axis)
    return m + jnp.log(s)


def argmax(x: Array, axis: str | None) -> Array:
    """Global id of the largest entry over the (possibly sharded) last axis, `[C, V_local]`
    → `[C]` int32; ties go to the smallest id, as `jnp.argmax` does unsharded."""
    local = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if axis is None:
        return local
    best = jnp.max(x, axis=-1)
    here = best == lax.pmax(best, axis)
    ids = local + vocab_offset(x.shape[-1], axis)
    return lax.pmin(jnp.where(here, ids, jnp.iinfo(jnp.int32).max), axis)


def local_ids(ids: Array, v_local: int, axis: str | None) -> tuple[Array, Array]:
    """(ids relative to this shard clipped into range, whether each id lives here)."""
    rel = ids - vocab_offset(v_local, axis)
    here = (rel >= 0) & (rel < v_local)
    return jnp.clip(rel, 0, v_local - 1), here


def take(x: Array, ids: Array, axis: str | None) -> Array:
    """x[c, ids[c, k]] for global ids, `[C, V_local]`, `[C, K]` → `[C, K]`."""
    rel, here = local_ids(ids, x.shape[-1], axis)
    picked = jnp.take_along_axis(x, rel, axis=-1)
    return psum(jnp.where(here, picked, 0.0), axis)


def scatter(values: Array, ids: Array, v_local: int, axis: str | None) -> Array:
    """Dense `[C, V_local]` with values[c, k] added at ids[c, k] (duplicates add up)."""
    rel, here = local_ids(ids, v_local, axis)
    rows = jnp.arange(ids.shape[0])[:, None]
    out = jnp.zeros((ids.shape[0], v_local), values.dtype)
    return out.at[rows, rel].add(jnp.where(here, values, 0.0))


def one_hot(targets: Array, v_local: int, axis: str | None) -> Array:
    """`[C]` global ids → `[C, V_local]` f32 one-hot of this shard's columns."""
    cols = jnp.arange(v_local) + vocab_offset(v_local, axis)
    return (cols[None, :] == targets[:, None]).astype(jnp.float32)


def softcap(raw: Array, cap: float | None) -> tuple[Array, Array | None]:
    """cap·tanh(raw/cap) and its derivative 1 − tanh², or (raw, None) without a cap."""
    if cap is None:
        return raw, None
    t = jnp.tanh(raw / cap)
    return cap * t, 1.0 - t * t
