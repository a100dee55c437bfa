"""Causal query blocks in `attend`: the skipped key blocks change nothing (values and
gradients on every non-padding row), and the decoder that uses them matches torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.models.attention import attend, attention_mask, causal_query_blocks
from tests.models.conftest import VOCAB
from tests.tolerances import assert_close


@pytest.mark.parametrize("length, blocks", [(64, 1), (128, 1), (255, 1), (256, 2),
                                            (384, 3), (1000, 5), (1024, 8), (4096, 8)])
def test_block_count(length, blocks):
    assert causal_query_blocks(length) == blocks


@pytest.mark.parametrize("blocks, window", [(2, None), (4, None), (3, 5)])
def test_blocked_equals_full_attention(rng, blocks, window):
    b, n_heads, kv, d, length = 2, 4, 2, 8, 24
    q = jnp.asarray(rng.standard_normal((b, length, n_heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, length, kv, d)), jnp.float32)
            for _ in range(2))
    seg = np.array([[1] * 10 + [2] * 14, [1] * 7 + [2] * 9 + [0] * 8], np.int32)
    slots = jnp.arange(length)
    mask = attention_mask(jnp.asarray(seg), jnp.asarray(seg), slots, slots, window)
    live = jnp.asarray(seg != 0)[:, :, None, None]  # padding rows: arbitrary either way
    c = jnp.asarray(rng.standard_normal((b, length, n_heads, d)), jnp.float32)

    def loss(q, k, v, nb):
        out, _ = attend(q, k, v, mask, kv, jnp.float32, query_blocks=nb)
        return jnp.sum(jnp.where(live, out * c, 0.0)), out

    (l1, full), g1 = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, 1)
    (l2, blocked), g2 = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, blocks)
    np.testing.assert_allclose(np.where(live, blocked, 0), np.where(live, full, 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, e in zip(g2, g1):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_blocks_refuse_non_causal_shapes(rng):
    q = jnp.ones((1, 8, 2, 4))
    k = v = jnp.ones((1, 12, 2, 4))
    mask = jnp.ones((1, 8, 12), bool)
    with pytest.raises(ValueError, match="query_blocks=2 needs causal self-attention"):
        attend(q, k, v, mask, 2, jnp.float32, query_blocks=2)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_long_rows_match_torch(families, name, rng):
    # 256 rows: the decoder runs 2 query blocks (the parity tests' short rows run 1)
    fam = families(name)
    tokens = rng.integers(3, VOCAB, (1, 256)).astype(np.int32)
    logits = nnx.jit(lambda m, t: m(t).logits)(fam.model, jnp.asarray(tokens))
    assert_close(logits, fam.torch_logits(tokens).logits.numpy(), rtol=0, atol=1e-4)
