"""Token-weighted reduction: (sum, count) pairs, divided last.

Kernels return per-token values; these reducers turn them into a `Weighted(sum, count)`
so that micro-batches, hosts and logging windows combine by adding sums and counts,
and the mean is taken once at the end (MaxText-style metrics).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weighted:
    """A token-weighted total: `sum` of values and `count` of (weighted) tokens, f32."""

    sum: jax.Array
    count: jax.Array

    def __add__(self, other: Weighted) -> Weighted:
        return Weighted(self.sum + other.sum, self.count + other.count)

    def mean(self) -> jax.Array:
        """sum / count, and 0 where count is 0 (an empty window is not NaN)."""
        safe = jnp.where(self.count > 0, self.count, 1.0)
        return jnp.where(self.count > 0, self.sum / safe, 0.0)

    @classmethod
    def zero(cls) -> Weighted:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def masked_sum_count(values: jax.Array, mask: jax.Array | None = None) -> Weighted:
    """Σ mask·values and Σ mask over all axes, in f32.

    Args:
      values: `[...]` per-token (or per-pair) values.
      mask: None (all ones), or bool / float weights broadcastable to `values`.
        Positions with mask 0 contribute nothing, even when the value there is NaN/inf.
    """
    v = jnp.asarray(values).astype(jnp.float32)
    if mask is None:
        return Weighted(jnp.sum(v), jnp.asarray(v.size, jnp.float32))
    m = jnp.asarray(mask)
    try:
        shape = jnp.broadcast_shapes(m.shape, v.shape)
    except ValueError:
        raise ValueError(
            f"mask of shape {m.shape} does not broadcast to values of shape {v.shape}; give it "
            "the values' shape (or size-1 axes, e.g. [B, 1] for a per-row mask)"
        ) from None
    if shape != v.shape:
        raise ValueError(f"mask of shape {m.shape} would broadcast values {v.shape} to {shape}; "
                         "it may not add axes to the values")
    m = jnp.broadcast_to(m.astype(jnp.float32), v.shape)
    total = jnp.sum(jnp.where(m != 0, v * m, 0.0))
    return Weighted(total, jnp.sum(m))


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Token-weighted mean of `values` under `mask` (0 when the mask is empty)."""
    return masked_sum_count(values, mask).mean()
