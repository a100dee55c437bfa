"""2-D matmul with a gradient that avoids XLA:CPU's slow weight-gradient dot form.

XLA differentiates `x @ w` into `dw = dot(x, dy)` contracting dimension 0 of both
operands. On XLA:CPU that form runs slower than the same product with `xᵀ` materialized
first (benchmarks/notes/model.md), and XLA folds a plain transpose back into the dot, so
the transpose is pinned with `lax.optimization_barrier`. On GPU/TPU the plain form is
already fast (the transpose is a free operand flag), so there nothing changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Below this many output elements the plain form was as fast or faster on one core
# (e.g. [1024,384]ᵀ·[1024,384]), and the transpose copy is pure overhead.
_MIN_OUTPUT = 2**18


def _pin_transpose(k: int, m: int) -> bool:
    return k * m >= _MIN_OUTPUT and jax.default_backend() == "cpu"


def weight_grad(x: jax.Array, dy: jax.Array, preferred_element_type=None) -> jax.Array:
    """`xᵀ @ dy` for `x [N, K]`, `dy [N, M]` → `[K, M]`."""
    xt = lax.optimization_barrier(x.T) if _pin_transpose(x.shape[1], dy.shape[1]) else x.T
    return jnp.dot(xt, dy, preferred_element_type=preferred_element_type)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x [N, K]`, `w [K, M]`; the gradient of `w` goes through `weight_grad`."""
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    dx = jnp.dot(dy, w.T).astype(x.dtype)
    dw = weight_grad(x, dy).astype(w.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)
