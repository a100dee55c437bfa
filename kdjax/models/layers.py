"""Decoder building blocks in Flax NNX: dense projections with logical axis names,
RMSNorm, rotary embeddings (default / linear / llama3), and the SwiGLU MLP.

Parameters are stored in `param_dtype` (f32 master weights) and cast to the compute
`dtype` at use; norms and softmax run in f32 as transformers does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax import linalg, platform
from kdjax.sharding import constrain

INIT_STD = 0.02  # transformers' default initializer_range for these families


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None],
          dtype, init: str = "normal") -> nnx.Param:
    """An nnx.Param carrying its logical axis names (mapped to a mesh in kdjax.sharding)."""
    if init == "normal":
        # A key of the platform's fast implementation seeded from the nnx stream: same
        # N(0, 0.02²) init (see `platform.param_rng_impl`).
        seed = jax.random.bits(rngs.params(), dtype=jnp.uint32)
        key = jax.random.key(seed, impl=platform.param_rng_impl())
        value = INIT_STD * jax.random.normal(key, tuple(shape), jnp.float32)
    elif init == "ones":
        value = jnp.ones(tuple(shape), jnp.float32)
    else:
        value = jnp.zeros(tuple(shape), jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


_matmul2d = linalg.matmul


def project(spec: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`einsum(spec, x, kernel)`; when the spec contracts x's trailing axes with the
    kernel's leading axes (`"blh,hm->blm"`, `"blh,hnd->blnd"`, `"blnd,ndh->blh"`), it is
    computed as one 2-D matmul `[B*L, K] @ [K, M]` over flattened axes.

    Why: on CPU, XLA differentiates the N-D einsum into weight-gradient dots that
    contract two axes (batch, length) and materializes transposed copies of the
    activation gradients for them; the 2-D form's gradients are plain `xᵀ @ dy` dots
    (timings: `benchmarks/layers.py`, results in benchmarks/results/layers.md).
    Same values; the reshapes merge adjacent row-major axes (bitcasts). The 2-D matmul's
    weight gradient goes through `kdjax.linalg.matmul` (the dot form XLA:CPU runs best).
    """
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    n_contract = len(lhs) + len(rhs) - len(out)
    if n_contract % 2 == 0 and n_contract > 0:
        n_contract //= 2
        lead, contract = lhs[:-n_contract], lhs[-n_contract:]
        if (rhs[:n_contract] == contract and out == lead + rhs[n_contract:]
                and len(set(lhs + rhs)) == len(lead) + len(rhs)):
            rows, kdim = math.prod(x.shape[:len(lead)]), math.prod(kernel.shape[:n_contract])
            y = _matmul2d(x.reshape(rows, kdim),
                          kernel.reshape(kdim, math.prod(kernel.shape[n_contract:])))
            return y.reshape(x.shape[:len(lead)] + kernel.shape[n_contract:])
    return jnp.einsum(spec, x, kernel)


class Dense(nnx.Module):
    """`y = einsum(spec, x, kernel) (+ bias)`; kernel shape/axes given explicitly so that
    heads stay a separate axis (no reshapes that would break sharding)."""

    def __init__(self, spec: str, shape, axes, *, bias_shape=None, bias_axes=None,
                 param_dtype, dtype, rngs: nnx.Rngs):
        self.spec, self.dtype = spec, dtype
        self.kernel = param(rngs, shape, axes, param_dtype)
        self.bias = (param(rngs, bias_shape, bias_axes, param_dtype, "zeros")
                     if bias_shape is not None else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = project(self.spec, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            bias = self.bias[...].astype(self.dtype)
            y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


class RMSNorm(nnx.Module):
    """`w * x / sqrt(mean(x²) + eps)`, statistics in f32 (Zhang & Sennrich 2019)."""

    def __init__(self, size: int, eps: float, *, param_dtype, dtype, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, (size,), ("norm",), param_dtype, "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., size]` → same shape, in `dtype`; the mean runs over the last axis."""
        # the 2-D row view is the CPU-fast form; it merges batch (and head) axes, which
        # under sharding forces a gather, so elsewhere the original shape is reduced
        y = rows(x) if platform.row_view_reductions() else x
        y32 = y.astype(jnp.float32)
        y32 = y32 * jax.lax.rsqrt(jnp.mean(y32 * y32, axis=-1, keepdims=True) + self.eps)
        # transformers casts back to the input dtype before the weight multiply
        scale = self.scale[...].astype(self.dtype)
        scale = scale.reshape((1,) * (y.ndim - 1) + scale.shape)
        return (scale * y32.astype(self.dtype)).reshape(x.shape)


def rows(x: jax.Array) -> jax.Array:
    """`x` as a 2-D `[rows, last axis]` array (a bitcast). Reductions over the last axis
    run on this form on CPU (`platform.row_view_reductions`): XLA:CPU runs them slower on
    arrays with a leading axis of size 1 (batch 1) than on the same data as rows (timings
    of RMSNorm's forward+backward: `benchmarks/layers.py`, benchmarks/results/layers.md)."""
    return x.reshape(-1, x.shape[-1])


def embed_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """`table[tokens]` in the compute `dtype`: `[V, H]` master table, `[B, L]` int tokens →
    `[B, L, H]` dtype.

    The table is cast to `dtype` *before* it is gathered onto each device (as FSDP
    gathers every weight at use), so a bf16 step moves a bf16 table, never the f32
    master. Its gradient is accumulated in f32 (a scatter-add of every token's
    cotangent): summing thousands of repeats of a frequent token in bf16 would lose the
    precision the dot products' f32 accumulation keeps for every other weight.
    """
    return _embed_lookup(table, tokens, jnp.dtype(dtype).name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _embed_lookup(table, tokens, dtype):
    # cast where the table lies (pinned, or XLA moves the cast after the gather), then
    # replicate: a take from a vocab/embed-sharded table makes XLA rematerialize it
    # anyway, with warnings
    local = constrain(table.astype(dtype), ("vocab", "embed"))
    return jnp.take(constrain(local, (None, None)), tokens, axis=0)


def _embed_lookup_fwd(table, tokens, dtype):
    return _embed_lookup(table, tokens, dtype), (table, tokens)


def _embed_lookup_bwd(dtype, residuals, g):
    table, tokens = residuals
    # each device scatters its own tokens into a whole (replicated) table, so the token
    # axis never moves; the partial tables are then summed into the table's sharding
    zeros = constrain(jnp.zeros(table.shape, jnp.float32), (None, None))
    grad = zeros.at[tokens].add(g.astype(jnp.float32))
    return constrain(grad, ("vocab", "embed")).astype(table.dtype), None


_embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` (f64 numpy, cast later), with optional
    linear or llama3 scaling (transformers.modeling_rope_utils)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, L, head_dim]` f32 for integer positions `[B, L]` (halves repeated,
    the rotate-half layout of Llama checkpoints)."""
    # inv_freq is rounded to f32 first, as transformers does, so angles match bit-for-bit
    inv = jnp.asarray(inv_freq, jnp.float32).reshape((1,) * positions.ndim + (-1,))
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on `x [B, L, heads, head_dim]` with cos/sin `[B, L, head_dim]` (Su et al. 2021)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))` (Shazeer 2020)."""

    def __init__(self, hidden: int, inner: int, *, param_dtype, dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate = Dense("blh,hm->blm", (hidden, inner), ("embed", "mlp"), **kw)
        self.up = Dense("blh,hm->blm", (hidden, inner), ("embed", "mlp"), **kw)
        self.down = Dense("blm,mh->blh", (inner, hidden), ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate(x)) * self.up(x)
        h = constrain(h, ("batch", "length", "mlp"))
        return self.down(h)
