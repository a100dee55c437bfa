"""kdjax.linalg.matmul: same values and gradients as `x @ w`, in XLA:CPU's fast dot form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kdjax import linalg
from tests.tolerances import assert_close


def _inputs(rng, n=48, k=24, m=40):
    return (rng.standard_normal((n, k)), rng.standard_normal((k, m)),
            rng.standard_normal((n, m)))


def test_values_and_grads_match_float64(rng):
    x, w, c = _inputs(rng)
    loss = lambda x_, w_: jnp.sum(jnp.tanh(linalg.matmul(x_, w_)) * c)
    val, (gx, gw) = jax.value_and_grad(loss, (0, 1))(jnp.float32(x), jnp.float32(w))
    y = x @ w  # float64 reference: d/dy sum(tanh(y) c) = (1 - tanh²) c
    dy = (1 - np.tanh(y) ** 2) * c
    assert_close(val, np.sum(np.tanh(y) * c), rtol=1e-5, atol=1e-4)
    assert_close(gx, dy @ w.T, "grad", atol=1e-5)
    assert_close(gw, x.T @ dy, "grad", atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grads_equal_autodiff_of_plain_matmul(rng, dtype):
    x, w, c = (jnp.asarray(a, dtype) for a in _inputs(rng))
    f = lambda mm: jax.grad(lambda x_, w_: jnp.sum((mm(x_, w_) * c).astype(jnp.float32)),
                            (0, 1))(x, w)
    ours, ref = f(linalg.matmul), f(jnp.matmul)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
        np.testing.assert_allclose(np.float32(a), np.float32(b), **tol)


def test_under_remat_dots_policy(rng):
    x, w, c = (jnp.float32(a) for a in _inputs(rng))
    body = lambda x_, w_: jnp.sum(jax.nn.silu(linalg.matmul(x_, w_)) * c)
    plain = jax.grad(body, (0, 1))(x, w)
    remat = jax.grad(jax.checkpoint(body, policy=jax.checkpoint_policies.checkpoint_dots),
                     (0, 1))(x, w)
    for a, b in zip(remat, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_cpu_weight_grad_is_compiled_without_dim0_contraction():
    # The reason the module exists: XLA folds a bare transpose back into a dot that
    # contracts dimension 0 of both operands (the slow form on XLA:CPU).
    x, dy = jnp.ones((64, 512)), jnp.ones((64, 1024))  # output above linalg._MIN_OUTPUT
    ours = jax.jit(linalg.weight_grad).lower(x, dy).compile().as_text()
    plain = jax.jit(lambda a, b: a.T @ b).lower(x, dy).compile().as_text()
    assert "lhs_contracting_dims={0}" in plain  # the yardstick still shows the slow form
    assert "lhs_contracting_dims={0}" not in ours and "lhs_contracting_dims={1}" in ours
    small = jax.jit(linalg.weight_grad).lower(x[:, :32], dy[:, :48]).compile().as_text()
    assert "lhs_contracting_dims={0}" in small  # small outputs keep the plain form


def test_sharded_rows_match_single_device(rng):
    # data-parallel rows: the weight gradient sums over shards (a psum XLA inserts)
    x, w, c = (jnp.float32(a) for a in _inputs(rng, n=64))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))  # auto axes, as kdjax.sharding
    rows = NamedSharding(mesh, P("data", None))
    xs, cs = jax.device_put(x, rows), jax.device_put(c, rows)
    g = jax.jit(jax.grad(lambda x_, w_, c_: jnp.sum(linalg.matmul(x_, w_) * c_), (0, 1)))
    for a, b in zip(g(xs, w, cs), g(x, w, c)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
