"""Top-k (sparse) and sampled teachers vs float64 references, the dense kernel and statistics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax import losses as L
from tests.losses import _refs
from tests.tolerances import TOL, assert_close

GRAD = TOL["grad"]
N = 8  # draws per token in the sampled teacher


def topk_teacher(rng, shape, k, dtype=jnp.float32):
    """Teacher logits and its log-probs at k distinct ids (random order, not sorted)."""
    t = jnp.asarray(rng.normal(size=shape) * 2.0, jnp.float32)
    ids = np.argsort(rng.random(shape), axis=-1)[..., :k]
    logprobs = np.take_along_axis(np.asarray(jax.nn.log_softmax(t)), ids, -1)
    return t, jnp.asarray(ids, jnp.int32), jnp.asarray(logprobs, dtype)


def sampled_teacher(rng, t, n=N, bad_id=None):
    """N draws from softmax(t) per token, as distinct ids + counts in U = n slots."""
    p = _refs.softmax(t)
    flat = p.reshape(-1, p.shape[-1])
    counts = np.stack([rng.multinomial(n, row / row.sum()) for row in flat])
    order = np.argsort(counts == 0, axis=-1, kind="stable")[:, :n]  # nonzero first
    ids, cts = order, np.take_along_axis(counts, order, -1)
    if bad_id is not None:  # empty slots may hold any id, even out of range
        ids = np.where(cts == 0, bad_id, ids)
    shape = p.shape[:-1] + (n,)
    return jnp.asarray(ids.reshape(shape), jnp.int32), jnp.asarray(cts.reshape(shape), jnp.int32)


@jax.jit
def sparse_all(s, ids, logprobs, sids, counts):
    return {
        "renormalize": L.sparse_forward_kl(s, ids, logprobs, tail="renormalize"),
        "bucket": L.sparse_forward_kl(s, ids, logprobs, tail="bucket"),
        "sampled": L.sampled_forward_kl(s, sids, counts, num_samples=N),
    }


@jax.jit
def sparse_all_grads(s, ids, logprobs, sids, counts):
    f = lambda a: {k: jnp.sum(v) for k, v in sparse_all(a, ids, logprobs, sids, counts).items()}
    return jax.jacrev(f)(s)


def _check_against_reference(rng, shape, k, dtype):
    s = jnp.asarray(rng.normal(size=shape) * 2.0, dtype)
    t, ids, lp = topk_teacher(rng, shape, k, dtype)
    sids, counts = sampled_teacher(rng, t, bad_id=shape[-1] + 3)
    outs = sparse_all(s, ids, lp, sids, counts)
    for tail in ("renormalize", "bucket"):
        ref = _refs.sparse_fkl(s, ids, lp, tail)
        assert_close(outs[tail], ref, dtype, err_msg=f"{tail} {shape}")
    assert_close(outs["sampled"], _refs.sampled_fkl(s, jnp.where(counts > 0, sids, 0), counts, N),
                 dtype, err_msg=f"sampled {shape}")
    return s, ids, lp, sids, counts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matches_float64_reference(rng, dtype):
    shapes = [((3, 10), 4), ((2, 3, 12), 5)] if dtype == jnp.float32 else [((3, 10), 4)]
    for shape, k in shapes:
        _check_against_reference(rng, shape, k, dtype)


def test_grads_match_float64_reference(rng):
    s, ids, lp, sids, counts = _check_against_reference(rng, (3, 10), 4, jnp.float32)
    g = sparse_all_grads(s, ids, lp, sids, counts)
    q, v = _refs.softmax(s), s.shape[-1]
    p = np.exp(_refs.f64(lp))
    in_ids = np.zeros(q.shape, bool)
    np.put_along_axis(in_ids, np.asarray(ids), True, -1)
    scatter = lambda vals, at: np.stack([np.bincount(i, w, minlength=v)[:v]
                                         for i, w in zip(np.asarray(at), np.asarray(vals))])
    # renormalize: q − p̃ on ids.  bucket: q − p on ids, q − p_r q/q_r outside.
    ref = q - scatter(p / p.sum(-1, keepdims=True), ids)
    assert_close(g["renormalize"], ref, "float32", **GRAD)
    p_r, q_r = 1 - p.sum(-1, keepdims=True), np.where(in_ids, 0, q).sum(-1, keepdims=True)
    ref = np.where(in_ids, q - scatter(p, ids), q - p_r * q / q_r)
    assert_close(g["bucket"], ref, "float32", **GRAD)
    live = np.asarray(counts) > 0
    ref = q - scatter(np.asarray(counts) / N, np.where(live, sids, 0))
    assert_close(g["sampled"], ref, "float32", **GRAD)
    f = lambda a: jnp.stack(list(sparse_all(a, ids, lp, sids, counts).values()))
    check_grads(jax.jit(f), (s,), order=1, modes=("rev",), eps=2e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_all_ids_equals_forward_kl(rng, dtype):
    shape = (4, 9)
    s = jnp.asarray(rng.normal(size=shape) * 2.0, dtype)
    t, ids, lp = topk_teacher(rng, shape, shape[-1], jnp.float32)  # K = V, shuffled
    f = jax.jit(lambda a: (L.sparse_forward_kl(a, ids, lp), L.sparse_forward_kl(
        a, ids, lp, tail="bucket"), L.forward_kl(a, t)))
    renorm, bucket, dense = f(s)
    assert_close(renorm, dense, dtype)
    assert_close(bucket, dense, dtype)
    grads = jax.jit(jax.jacrev(lambda a: [jnp.sum(x) for x in f(a)]))(s)
    for g in grads[:2]:
        assert_close(g, grads[2], "float32", **GRAD)


@jax.jit
def gathered_vs_dense(s, ids, lp, sids, counts):
    z = s.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    at = lambda i: jnp.take_along_axis(z, i, axis=-1)
    fused = {tail: L.sparse_forward_kl_gathered(at(ids), lse, lp, tail=tail)
             for tail in ("renormalize", "bucket")}
    fused["sampled"] = L.sampled_forward_kl_gathered(at(sids), lse, counts, num_samples=N)
    return fused, sparse_all(s, ids, lp, sids, counts)


def test_gathered_helpers_equal_dense_kernels(rng):
    s = jnp.asarray(rng.normal(size=(3, 10)) * 2.0, jnp.float32)
    t, ids, lp = topk_teacher(rng, (3, 10), 4)
    sids, counts = sampled_teacher(rng, t)
    fused, dense = gathered_vs_dense(s, ids, lp, sids, counts)
    for key in dense:  # bucket: log1mexp(Σ q_ids) path vs the exact complement
        assert_close(fused[key], dense[key], "float32", err_msg=key)


@jax.jit
def mean_sampled_grad(s, ids, counts):
    f = lambda a: jnp.mean(L.sampled_forward_kl(
        jnp.broadcast_to(a, (ids.shape[0], a.shape[-1])), ids, counts, num_samples=N))
    return jax.grad(f)(s)


def test_sampled_gradient_is_unbiased_for_full_kd(rng):
    v, reps = 12, 4000
    s = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(v,)) * 1.5, jnp.float32)
    p = _refs.softmax(t)
    ids, counts = sampled_teacher(rng, jnp.broadcast_to(t, (reps, v)), bad_id=v + 5)
    g = np.asarray(mean_sampled_grad(s, ids, counts), np.float64)
    full = np.asarray(jax.grad(lambda a: L.forward_kl(a, t))(s), np.float64)  # q − p
    # Each component of the mean is q_v − (mean of reps·N draws of [x = v]): its standard
    # error is sqrt(p(1−p)/(reps·N)). Five standard errors: a false alarm has p < 1e-5.
    se = np.sqrt(p * (1 - p) / (reps * N))
    np.testing.assert_array_less(np.abs(g - full), 5 * se + 1e-6)
    # The test can fail: the gradient towards a slightly different teacher is rejected.
    t_wrong = t + jnp.asarray(rng.normal(size=(v,)) * 0.3, jnp.float32)
    wrong = np.asarray(jax.grad(lambda a: L.forward_kl(a, t_wrong))(s), np.float64)
    assert np.any(np.abs(g - wrong) > 5 * se + 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_extreme_and_padded_inputs_are_finite(rng, dtype):
    v, pad, k = 12, 3, 4
    s = jnp.asarray(rng.choice([-1e4, 1e4], size=(3, v)) + rng.normal(size=(3, v)), dtype)
    t = jnp.asarray(rng.choice([-1e4, 1e4], size=(3, v)) + rng.normal(size=(3, v)), jnp.float32)
    ids = jnp.asarray(np.argsort(-np.asarray(t), -1)[:, :k], jnp.int32)  # true top-k
    lp = jnp.take_along_axis(jax.nn.log_softmax(t), ids, -1).astype(dtype)
    sids, counts = sampled_teacher(rng, t)
    sp = s.at[:, -pad:].set(-jnp.inf)  # padded vocabulary: the teacher never picks it
    tp = t.at[:, -pad:].set(-jnp.inf)
    pids = jnp.asarray(np.argsort(-np.asarray(tp), -1)[:, : v - pad], jnp.int32)  # all live
    plp = jnp.take_along_axis(jax.nn.log_softmax(tp), pids, -1)
    psids, pcounts = sampled_teacher(rng, tp)
    padded = (sp, pids[:, :k], plp[:, :k].astype(dtype), psids, pcounts)
    for args in ((s, ids, lp, sids, counts), padded):
        for x in (sparse_all(*args), sparse_all_grads(*args)):
            for key, val in x.items():
                assert np.all(np.isfinite(np.asarray(val))), key
    if dtype != jnp.float32:
        return
    # ids covering every live token: the bucket is empty and both tails are forward KL
    f = jax.jit(lambda a: [L.sparse_forward_kl(a, pids, plp, tail=tl)
                           for tl in ("renormalize", "bucket")])
    sp2 = jnp.asarray(rng.normal(size=(3, v)), dtype).at[:, -pad:].set(-jnp.inf)
    for out in f(sp2):
        assert_close(out, _refs.dense("forward_kl", sp2[:, :-pad], tp[:, :-pad]), dtype)
    for g in jax.jit(jax.jacrev(lambda a: [jnp.sum(x) for x in f(a)]))(sp2):
        assert np.all(np.isfinite(np.asarray(g)))


S, IDS, LP, C = (jnp.zeros((2, 6)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)),
                 jnp.ones((2, 3), jnp.int32))
BAD = [
    (lambda: L.sparse_forward_kl(S, IDS, LP[:, :2]), ValueError, r"ids has shape \(2, 3\).*"
     r"logprobs has shape \(2, 2\)"),
    (lambda: L.sparse_forward_kl(S[:1], IDS, LP), ValueError, r"leading.*must match"),
    (lambda: L.sparse_forward_kl(S, LP, LP), TypeError, r"ids must be an integer.*float32"),
    (lambda: L.sparse_forward_kl(S, IDS, C), TypeError, r"logprobs must be a floating.*int32"),
    (lambda: L.sparse_forward_kl(S, IDS, LP, tail="rest"), ValueError,
     r"tail must be one of \['renormalize', 'bucket'\], got 'rest'"),
    (lambda: L.sampled_forward_kl(S, IDS, C, num_samples=0), ValueError,
     r"num_samples must be > 0, got 0"),
    (lambda: L.sampled_forward_kl(S, IDS, C, num_samples=-3), ValueError, r"got -3"),
    (lambda: L.sampled_forward_kl(S, IDS, C, num_samples=2.5), TypeError, r"num_samples.*2.5"),
    (lambda: L.sampled_forward_kl(S, IDS, LP, num_samples=4), TypeError, r"counts.*integer"),
    (lambda: L.sampled_forward_kl(S, IDS, C[:, :1], num_samples=4), ValueError, r"counts"),
    (lambda: L.sampled_forward_kl(S.astype(jnp.int32), IDS, C, num_samples=4), TypeError,
     r"student_logits"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_arguments_raise_at_trace_time(call, exc, match):
    with pytest.raises(exc, match=match):
        jax.jit(call).trace()


def test_unsigned_id_and_count_dtypes(rng):
    # teacher stores keep ids in the smallest unsigned dtype that holds V
    s = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
    t, ids, lp = topk_teacher(rng, (3, 10), 4)
    sids, counts = sampled_teacher(rng, t)
    narrow = (ids.astype(jnp.uint16), lp, sids.astype(jnp.uint8), counts.astype(jnp.uint16))
    wide, small = sparse_all(s, ids, lp, sids, counts), sparse_all(s, *narrow)
    for key in wide:
        np.testing.assert_array_equal(small[key], wide[key], err_msg=key)


def test_out_of_range_id_is_nan_not_clamped(rng):
    s = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
    ids = jnp.asarray([[0, 1], [2, 6]], jnp.int32)
    lp = jnp.log(jnp.asarray([[0.5, 0.2], [0.3, 0.3]], jnp.float32))
    f = jax.jit(functools.partial(L.sparse_forward_kl, tail="renormalize"))
    out = np.asarray(f(s, ids, lp))
    assert np.isfinite(out[0]) and np.isnan(out[1])
