"""Hidden-state and attention losses vs float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses as L
from tests.losses import _refs
from tests.tolerances import assert_close


def ref_hidden(hs, ht, proj):
    x = _refs.f64(hs) if proj is None else _refs.f64(hs) @ _refs.f64(proj)
    y = _refs.f64(ht)
    mse = ((x - y) ** 2).mean(-1)
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    return mse, 1.0 - cos


def ref_attention_kl(s, t, mask):
    """Per (…, head, query) KL over keys with masked keys removed, mean over heads."""
    s, t = _refs.f64(s), _refs.f64(t)
    mask = np.broadcast_to(mask, s.shape) if mask is not None else np.ones(s.shape, bool)
    out = np.zeros(s.shape[:-1])
    for idx in np.ndindex(*s.shape[:-1]):
        m = mask[idx] & ~(np.isneginf(s[idx]) & np.isneginf(t[idx]))
        if m.any():
            out[idx] = _refs.kl(_refs.softmax(t[idx][m]), _refs.softmax(s[idx][m]))
    return out.mean(-2)


@jax.jit
def hidden_all(hs, ht, hs2, proj):
    return (L.hidden_mse(hs, ht), L.hidden_cosine(hs, ht),
            L.hidden_mse(hs2, ht, proj), L.hidden_cosine(hs2, ht, proj))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_hidden_match_float64_reference(rng, dtype):
    shapes = [(5,), (2, 3)] if dtype == jnp.float32 else [(4,)]
    for lead in shapes:
        hs = jnp.asarray(rng.normal(size=lead + (6,)), dtype)
        ht = jnp.asarray(rng.normal(size=lead + (6,)), dtype)
        hs2 = jnp.asarray(rng.normal(size=lead + (4,)), dtype)
        proj = jnp.asarray(rng.normal(size=(4, 6)) / 2, dtype)
        mse, cos, pmse, pcos = hidden_all(hs, ht, hs2, proj)
        rmse, rcos = ref_hidden(hs, ht, None)
        prmse, prcos = ref_hidden(hs2, ht, proj)
        for out, ref in ((mse, rmse), (cos, rcos), (pmse, prmse), (pcos, prcos)):
            assert out.shape == lead and out.dtype == jnp.float32
            assert_close(out, ref, dtype)


def test_hidden_grads_and_zero_vector(rng):
    hs, ht = (jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for _ in range(2))
    hs2 = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    proj = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    f = jax.jit(lambda *a: jnp.stack([jnp.sum(x) for x in hidden_all(*a)]))
    check_grads(f, (hs, ht, hs2, proj), order=1, modes=("rev",), eps=1e-2)
    zero = hs.at[0].set(0.0)
    val, g = jax.jit(jax.value_and_grad(lambda a: jnp.sum(L.hidden_cosine(a, ht))))(zero)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(L.hidden_cosine(zero, ht)[0], 1.0)
    # the loss is zero exactly when the directions agree
    np.testing.assert_allclose(jax.jit(L.hidden_cosine)(ht * 3.0, ht), 0.0, atol=1e-6)


@jax.jit
def attention_all(s, t, mask):
    return L.attention_kl(s, t), L.attention_kl(s, t, key_mask=mask)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_attention_kl_matches_reference(rng, dtype):
    q = k = 5
    causal = np.tril(np.ones((q, k), bool))
    for lead in ([(2, 3)] if dtype == jnp.float32 else []) + [(3,)]:  # (batch,) heads
        s = jnp.asarray(rng.normal(size=lead + (q, k)) * 2, dtype)
        t = jnp.asarray(rng.normal(size=lead + (q, k)) * 2, dtype)
        plain, masked = attention_all(s, t, jnp.asarray(causal))
        assert plain.shape == lead[:-1] + (q,) and plain.dtype == jnp.float32
        assert_close(plain, ref_attention_kl(s, t, None), dtype)
        assert_close(masked, ref_attention_kl(s, t, causal), dtype)


def test_attention_kl_padding_rows_and_inf_scores(rng):
    b, h, q, k = 2, 2, 4, 4
    s = jnp.asarray(rng.normal(size=(b, h, q, k)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(b, h, q, k)), jnp.float32)
    causal = np.tril(np.ones((q, k), bool))
    s_inf = jnp.where(causal, s, -jnp.inf)  # a model's own -inf masking
    t_inf = jnp.where(causal, t, -jnp.inf)
    pad = np.ones((b, 1, 1, k), bool)
    pad[1, ..., 2:] = False  # sequence 1 has 2 real keys...
    mask = jnp.asarray(pad & causal & pad.transpose(0, 1, 3, 2))  # ...and padding queries
    f = jax.jit(jax.value_and_grad(lambda a, b_, m: jnp.sum(L.attention_kl(a, b_, key_mask=m))))
    for a, b_ in ((s, t), (s_inf, t_inf)):
        val, g = f(a, b_, mask)
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
        out = jax.jit(L.attention_kl)(a, b_, key_mask=mask)
        assert_close(out, ref_attention_kl(a, b_, np.asarray(mask)))
        np.testing.assert_array_equal(np.asarray(out)[1, 2:], 0.0)  # fully masked queries
    assert_close(jax.jit(L.attention_kl)(s_inf, t_inf), ref_attention_kl(s, t, causal))
    f2 = jax.jit(lambda a, b_: jnp.sum(L.attention_kl(a, b_, key_mask=jnp.asarray(causal))))
    check_grads(f2, (s, t), order=1, modes=("rev",), eps=1e-2)


H = jnp.zeros((2, 4))
BAD = [
    (lambda: L.hidden_mse(H, jnp.zeros((2, 5))), ValueError, r"width 4 differs.*projection.*4, 5"),
    (lambda: L.hidden_mse(H, H[:1]), ValueError, r"leading"),
    (lambda: L.hidden_cosine(H, H, jnp.zeros((4, 3))), ValueError,
     r"projection has shape \(4, 3\), expected \[H_s, H_t\] = \[4, 4\]"),
    (lambda: L.hidden_mse(H.astype(jnp.int32), H), TypeError, r"student_hidden.*int32"),
    (lambda: L.attention_kl(jnp.zeros((2, 3, 3)), jnp.zeros((2, 3, 4))), ValueError,
     r"teacher_scores has shape \(2, 3, 4\).*keys"),
    (lambda: L.attention_kl(jnp.zeros((3, 3)), jnp.zeros((3, 3))), ValueError,
     r"student_scores must have at least 3"),
    (lambda: L.attention_kl(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3, 3)), key_mask=jnp.ones(3)),
     TypeError, r"key_mask must be a bool"),
    (lambda: L.attention_kl(jnp.zeros((1, 3, 3)), jnp.zeros((1, 3, 3)),
                            key_mask=jnp.ones((2, 3, 3), bool)), ValueError, r"key_mask of shape"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_arguments_raise_at_trace_time(call, exc, match):
    with pytest.raises(exc, match=match):
        jax.jit(call).trace()
