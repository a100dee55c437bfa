"""f32 numerics shared by the kernels: tempered log-softmax and -inf-safe terms.

The masks here test for exactly `-inf` (a zero probability), never `isfinite`: a NaN
that reaches a kernel is a bug upstream and must propagate, not be silently zeroed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def log_softmax(logits: jax.Array, temperature=1.0) -> jax.Array:
    """log softmax(logits / T) over the last axis, computed in f32."""
    x = logits.astype(jnp.float32)
    if not (isinstance(temperature, int | float) and temperature == 1.0):
        x = x / jnp.asarray(temperature, jnp.float32)
    return jax.nn.log_softmax(x, axis=-1)


def kl_terms(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """Elementwise a·(log a − log b), with 0·log 0 = 0.

    Entries where a = 0 (log_a = -inf) contribute exactly 0 with a zero gradient, even
    when log_b is -inf too (padded vocabulary). The inputs are substituted before the
    arithmetic (the "double where"), so no inf·0 reaches the backward pass.
    """
    live = log_a != NEG_INF
    la = jnp.where(live, log_a, 0.0)
    lb = jnp.where(live, log_b, 0.0)
    return jnp.where(live, jnp.exp(la) * (la - lb), 0.0)


def mixture_log(log_a: jax.Array, log_b: jax.Array, weight_a) -> jax.Array:
    """log(w·a + (1−w)·b) in log space, for 0 < w < 1."""
    return jnp.logaddexp(log_a + jnp.log(weight_a), log_b + jnp.log1p(-weight_a))


def safe_exp(log_x: jax.Array) -> jax.Array:
    """exp that maps -inf to 0 with a zero (not NaN) gradient."""
    live = log_x != NEG_INF
    return jnp.where(live, jnp.exp(jnp.where(live, log_x, 0.0)), 0.0)


def log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler, 2012).

    x ≥ 0 (rounding can push a log-mass that should be ≤ 0 just above it) gives -inf
    with a zero gradient.
    """
    dead = x >= 0.0
    xs = jnp.where(dead, -1.0, x)
    near_zero = xs > -math.log(2.0)
    out = jnp.where(near_zero, jnp.log(-jnp.expm1(jnp.where(near_zero, xs, -1.0))),
                    jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, xs))))
    return jnp.where(dead, NEG_INF, out)
