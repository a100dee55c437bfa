"""Sequence log-probs and preference / ranking losses vs float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses as L
from tests.losses import _refs
from tests.tolerances import TOL, assert_close

f64, logsig = _refs.f64, _refs.sigmoid_log


def ref_seq(logits, targets, mask, average):
    ls = _refs.log_softmax(logits)
    tg = np.where(np.asarray(mask) != 0, np.asarray(targets), 0)
    picked = np.take_along_axis(ls, tg[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    total = (m * picked).sum(-1)
    return total / m.sum(-1) if average else total


def ref_rrhf(lp, sc, valid):
    lp, sc = f64(lp), np.asarray(sc, np.float64)
    out = np.zeros(lp.shape[:-1])
    for idx in np.ndindex(*out.shape):
        k = lp.shape[-1]
        out[idx] = sum(max(0.0, lp[idx][i] - lp[idx][j]) for i in range(k) for j in range(k)
                       if valid[idx][i] and valid[idx][j] and sc[idx][i] < sc[idx][j])
    return out


def ref_pro(lp, sc, valid):
    lp, sc = f64(lp), np.asarray(sc, np.float64)
    out = np.zeros(lp.shape[:-1])
    for idx in np.ndindex(*out.shape):
        order = sorted((i for i in range(lp.shape[-1]) if valid[idx][i]),
                       key=lambda i: (-sc[idx][i], i))  # score descending, ties by index
        x = lp[idx][order]
        out[idx] = -sum(x[k] - np.log(np.exp(x[k:]).sum()) for k in range(len(x)))
    return out


def ref_pairs(pc, pr, rc, rr, beta, eps):
    d = (f64(pc) - f64(pr)) - (f64(rc) - f64(rr))
    dpo = -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
    ipo = (d - 1 / (2 * beta)) ** 2
    return dpo, ipo


@jax.jit
def rank_all(x, y, z, w, sc, valid):
    """Every pairwise/groupwise loss on `[..., K]` candidates and their pair slices."""
    return {
        "dpo": L.dpo(x, y, z, w, beta=0.3, label_smoothing=0.1),
        "ipo": L.ipo(x, y, z, w, beta=0.3),
        "simpo": L.simpo(x, y, beta=2.0, gamma=0.5),
        "margin_mse": L.margin_mse(x, y, z, w),
        "rrhf": L.rrhf(x, sc, where=valid),
        "pro": L.pro(x, sc, where=valid),
        "pro_all": L.pro(x, sc),
        "listwise_kl": L.listwise_kl(x, z, temperature=2.0),
    }


def rank_refs(x, y, z, w, sc, valid):
    dpo, ipo = ref_pairs(x, y, z, w, 0.3, 0.1)
    all_valid = np.ones(valid.shape, bool)
    return {
        "dpo": dpo, "ipo": ipo,
        "simpo": -logsig(2.0 * (f64(x) - f64(y)) - 0.5),
        "margin_mse": ((f64(x) - f64(y)) - (f64(z) - f64(w))) ** 2,
        "rrhf": ref_rrhf(x, sc, valid), "pro": ref_pro(x, sc, valid),
        "pro_all": ref_pro(x, sc, all_valid),
        "listwise_kl": _refs.dense("forward_kl", x, z, 2.0),
    }


def rank_inputs(rng, shape, dtype):
    x, y, z, w = (jnp.asarray(rng.normal(size=shape) * 2, dtype) for _ in range(4))
    sc = jnp.asarray(rng.integers(0, 3, size=shape), jnp.float32)  # with ties
    valid = rng.random(shape) < 0.7
    return x, y, z, w, sc, valid


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_ranking_losses_match_float64_reference(rng, dtype):
    for shape in [(6,), (2, 3, 4)] if dtype == jnp.float32 else [(3, 5)]:
        args = rank_inputs(rng, shape, dtype)
        outs, refs = rank_all(*args), rank_refs(*args)
        for key, out in outs.items():
            assert out.dtype == jnp.float32, key
            assert_close(out, refs[key], dtype, err_msg=f"{key} {shape}")


def test_ranking_grads(rng):
    x, y, z, w, _, valid = rank_inputs(rng, (2, 5), jnp.float32)
    sc = jnp.asarray(rng.permuted(np.tile(np.arange(5.0), (2, 1)), axis=-1), jnp.float32)
    f = jax.jit(lambda *a: jnp.stack([jnp.sum(v) for v in rank_all(*a, sc, valid).values()]))
    check_grads(f, (x, y, z, w), order=1, modes=("rev",), eps=1e-3)
    g = jax.jit(jax.grad(lambda a: jnp.sum(L.pro(a, sc, where=valid))))(x)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_array_equal(np.asarray(g)[~valid], 0.0)  # left-out candidates


def test_pro_ties_by_index_and_permutation(rng):
    lp = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    f = jax.jit(L.pro)
    # ties broken by index: scores (1, 1, 0, 0) rank 0, 1, 2, 3; (distinct scores) the same
    assert_close(f(lp, jnp.asarray([1.0, 1.0, 0.0, 0.0])), f(lp, jnp.asarray([3.0, 2.0, 1.0, 0.0])))
    assert not np.isclose(f(lp, jnp.asarray([1.0, 1.0, 0.0, 0.0])),
                          f(lp, jnp.asarray([2.0, 3.0, 1.0, 0.0])))
    perm = rng.permutation(4)
    sc = jnp.asarray([0.3, 2.0, -1.0, 0.9])
    assert_close(f(lp[perm], sc[perm]), f(lp, sc))


@jax.jit
def seq_all(logits, targets, mask, fmask):
    return (L.sequence_logprobs(logits, targets, mask),
            L.sequence_logprobs(logits, targets, mask, average=True),
            L.sequence_logprobs(logits, targets, fmask))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sequence_logprobs(rng, dtype):
    for lead in [(2,), (2, 3)] if dtype == jnp.float32 else [(3,)]:
        v, n = 7, 6
        logits = jnp.asarray(rng.normal(size=lead + (n, v)) * 2, dtype)
        targets = rng.integers(0, v, size=lead + (n,))
        mask = rng.random(lead + (n,)) < 0.7
        mask[..., 0] = True
        targets = jnp.asarray(np.where(mask, targets, -100), jnp.int32)  # ignored when masked
        fmask = jnp.asarray(mask * rng.uniform(0.5, 1.5, size=mask.shape), jnp.float32)
        total, avg, weighted = seq_all(logits, targets, jnp.asarray(mask), fmask)
        assert_close(total, ref_seq(logits, targets, mask, False), dtype)
        assert_close(avg, ref_seq(logits, targets, mask, True), dtype)
        assert_close(weighted, ref_seq(logits, targets, fmask, False), dtype)
    g = jax.jit(jax.grad(lambda a: jnp.sum(seq_all(a, targets, jnp.asarray(mask), fmask)[0])))
    onehot = np.eye(v)[np.where(mask, np.asarray(targets), 0)]
    ref = mask[..., None] * (onehot - _refs.softmax(logits))  # d/dlogits of Σ mask·log q
    # a bf16 input gets a bf16 gradient: its rounding (2^-8 relative) bounds the error
    gtol = TOL["grad"] if dtype == jnp.float32 else dict(rtol=8e-3, atol=8e-3)
    assert_close(g(logits), ref, "float32", **gtol)
    # padded vocabulary (never a target): finite values, zero gradient on the padding
    padded = logits.at[..., -2:].set(-jnp.inf)
    live_targets = jnp.where(targets >= v - 2, 0, targets)
    gp = np.asarray(jax.jit(jax.grad(lambda a: jnp.sum(
        L.sequence_logprobs(a, live_targets, jnp.asarray(mask)))))(padded))
    assert np.all(np.isfinite(gp)) and np.all(gp[..., -2:] == 0.0)
    empty = jax.jit(L.sequence_logprobs, static_argnames="average")(
        logits, targets, jnp.zeros(mask.shape, bool), average=True)
    np.testing.assert_array_equal(empty, 0.0)
    bad = seq_all(logits, targets.at[(0,) * targets.ndim].set(v), jnp.asarray(mask), fmask)[0]
    bad = np.asarray(bad).reshape(-1)  # an unmasked out-of-range target is NaN, not clamped
    assert np.isnan(bad[0]) and np.isfinite(bad[1:]).all()


X = jnp.zeros((3,))
BAD = [
    (lambda: L.dpo(X, X, X, X, beta=0.0), ValueError, r"beta must be > 0, got 0.0"),
    (lambda: L.dpo(X, X, X, X, label_smoothing=0.7), ValueError, r"label_smoothing.*got 0.7"),
    (lambda: L.dpo(X, X[:2], X, X), ValueError, r"policy_rejected has shape \(2,\)"),
    (lambda: L.ipo(X, X, X, X, beta=-1.0), ValueError, r"beta must be > 0, got -1.0"),
    (lambda: L.simpo(X, X.astype(jnp.int32)), TypeError, r"rejected_avg_logps.*int32"),
    (lambda: L.rrhf(X, X[:2]), ValueError, r"scores has shape \(2,\)"),
    (lambda: L.pro(X, X, where=jnp.ones(2, bool)), ValueError, r"where has shape \(2,\)"),
    (lambda: L.listwise_kl(X, X, temperature=0.0), ValueError, r"temperature must be > 0"),
    (lambda: L.margin_mse(X, X, X, jnp.zeros(4)), ValueError, r"teacher_neg has shape \(4,\)"),
    (lambda: L.sequence_logprobs(jnp.zeros((4, 5)), jnp.zeros(3, int), None), ValueError,
     r"targets has shape \(3,\)"),
    (lambda: L.sequence_logprobs(jnp.zeros((4, 5)), jnp.zeros(4), None), TypeError,
     r"targets must be an integer"),
    (lambda: L.sequence_logprobs(jnp.zeros((4, 5)), jnp.zeros(4, int), jnp.ones(3)), ValueError,
     r"mask has shape \(3,\)"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_arguments_raise_at_trace_time(call, exc, match):
    with pytest.raises(exc, match=match):
        jax.jit(call).trace()

