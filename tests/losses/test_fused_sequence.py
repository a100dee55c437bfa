"""fused_sequence_logprobs equals sequence_logprobs on materialized logits (values, grads)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import dpo, fused_sequence_logprobs, sequence_logprobs
from tests.tolerances import TOL, assert_close

B, L, H, V = 4, 9, 16, 40


@partial(jax.jit, static_argnames=("average", "cap"))
def _both(h, w, y, m, *, average, cap):
    """A nonlinear function of the per-sequence log-probs, so that each sequence gets its
    own cotangent (as in DPO)."""

    def fused(h, w):
        lp = fused_sequence_logprobs(h, w, y, m, average=average, chunk_size=5,
                                     logit_softcap=cap)
        return jnp.sum(jnp.sin(lp)), lp

    def naive(h, w):
        z = jnp.dot(h.astype(jnp.float32), w.astype(jnp.float32))
        z = z if cap is None else cap * jnp.tanh(z / cap)
        lp = sequence_logprobs(z, y, m, average=average)
        return jnp.sum(jnp.sin(lp)), lp

    return (jax.value_and_grad(fused, (0, 1), has_aux=True)(h, w),
            jax.value_and_grad(naive, (0, 1), has_aux=True)(h, w))


@pytest.mark.parametrize("average,cap", [(False, None), (True, 4.0)])
def test_matches_materialized(rng, average, cap):
    h = jnp.asarray(rng.normal(size=(B, L, H)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(H, V)) * 0.4, jnp.float32)
    y = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    m = jnp.asarray(rng.random((B, L)) > 0.3)
    ((_, flp), fg), ((_, nlp), ng) = _both(h, w, y, m, average=average, cap=cap)
    assert flp.shape == (B,)
    assert_close(flp, nlp, rtol=1e-5, atol=1e-5)
    for a, b in zip(fg, ng):
        assert_close(a, b, **TOL["grad"])


def test_dpo_on_fused_logprobs(rng):
    """Unbatched [L, H] inputs and the DPO composition: grads equal the materialized ones."""
    hs = [jnp.asarray(rng.normal(size=(L, H)), jnp.float32) for _ in range(2)]
    w = jnp.asarray(rng.normal(size=(H, V)) * 0.4, jnp.float32)
    ys = [jnp.asarray(rng.integers(0, V, L), jnp.int32) for _ in range(2)]

    def loss(w, seq):
        pc, pr = (seq(h, w, y) for h, y in zip(hs, ys))
        return dpo(pc, pr, jnp.float32(-30.0), jnp.float32(-31.0), beta=0.5)

    fused = lambda h, w, y: fused_sequence_logprobs(h, w, y, chunk_size=4)
    naive = lambda h, w, y: sequence_logprobs(h @ w, y)
    a = jax.jit(jax.value_and_grad(partial(loss, seq=fused)))(w)
    b = jax.jit(jax.value_and_grad(partial(loss, seq=naive)))(w)
    assert np.ndim(a[0]) == 0
    assert_close(a[0], b[0])
    assert_close(a[1], b[1], **TOL["grad"])
