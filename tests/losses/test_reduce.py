"""Token-weighted reducers: masked == sliced, weights, empty windows, NaN at masked slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L
from tests.tolerances import assert_close

reduce_jit = jax.jit(L.masked_sum_count)


def test_masked_equals_sliced(rng):
    values = rng.normal(size=(4, 9)).astype(np.float32)
    lengths = rng.integers(0, 10, size=4)
    lengths[0] = 9
    mask = np.arange(9)[None, :] < lengths[:, None]
    w = reduce_jit(jnp.asarray(values), jnp.asarray(mask))
    kept = np.concatenate([values[i, :n] for i, n in enumerate(lengths)])
    assert isinstance(w, L.Weighted) and w.sum.dtype == jnp.float32
    assert_close(w.sum, kept.astype(np.float64).sum())
    np.testing.assert_array_equal(w.count, lengths.sum())
    assert_close(w.mean(), kept.astype(np.float64).mean())
    assert_close(L.masked_mean(jnp.asarray(values), jnp.asarray(mask)), kept.mean())
    # micro-batches combine by adding sums and counts, then dividing once
    parts = [reduce_jit(jnp.asarray(values[i:i + 2]), jnp.asarray(mask[i:i + 2])) for i in (0, 2)]
    total = parts[0] + parts[1]
    assert_close(total.sum, w.sum)
    assert_close(total.mean(), w.mean())


def test_weights_none_bf16_and_broadcast(rng):
    values = jnp.asarray(rng.normal(size=(3, 5)), jnp.bfloat16)
    weights = rng.uniform(0.0, 2.0, size=(3, 5))
    w = reduce_jit(values, jnp.asarray(weights, jnp.float32))
    v64 = np.asarray(values.astype(jnp.float32), np.float64)
    assert_close(w.sum, (v64 * weights.astype(np.float32)).sum(), "bfloat16")
    assert_close(w.count, weights.astype(np.float32).sum())
    full = jax.jit(L.masked_sum_count)(values)
    assert_close(full.sum, v64.sum(), "bfloat16")
    np.testing.assert_array_equal(full.count, 15.0)
    rows = np.array([[True], [False], [True]])  # [B, 1] broadcasts along the tokens
    r = reduce_jit(values, jnp.asarray(rows))
    assert_close(r.sum, v64[[0, 2]].sum(), "bfloat16")
    np.testing.assert_array_equal(r.count, 10.0)


def test_empty_window_and_masked_nan(rng):
    values = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32).at[1, 3].set(jnp.nan)
    values = values.at[0, 0].set(jnp.inf)
    mask = jnp.asarray([[False, True, True, True], [True, True, True, False]])
    mean, grad = jax.jit(jax.value_and_grad(lambda v: L.masked_mean(v, mask)))(values)
    expected = np.asarray(values)[np.asarray(mask)].astype(np.float64).mean()
    assert_close(mean, expected)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[~np.asarray(mask)], 0.0)
    empty = reduce_jit(values, jnp.zeros((2, 4), bool))
    assert float(empty.count) == 0.0 and float(empty.mean()) == 0.0
    zero = L.Weighted.zero() + empty
    assert float(zero.mean()) == 0.0
    assert jax.tree_util.tree_leaves(zero)  # a pytree: it crosses jit and psum as is


def test_bad_mask_shapes():
    v = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 2, 3\) would broadcast"):
        L.masked_sum_count(v, jnp.ones((1, 2, 3)))
    with pytest.raises(ValueError, match=r"mask of shape \(4,\) does not broadcast"):
        L.masked_sum_count(v, jnp.ones(4))
