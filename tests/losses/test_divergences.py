"""Dense divergences vs float64 NumPy references, gradients, properties, bad arguments.

Compilation dominates the cost of these tests on CPU, so each test jits ONE function
that evaluates every catalog case and checks the cases one by one (naming the case).
"""

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

GRAD = TOL["grad"]  # tol("grad") is not a dtype name; pass the entries as overrides

CASES = {
    "forward_kl": ("forward_kl", {}),
    "reverse_kl": ("reverse_kl", {}),
    "jsd_0.5": ("jsd", {"beta": 0.5}),
    "jsd_0.1": ("jsd", {"beta": 0.1}),
    "jsd_0": ("jsd", {"beta": 0.0}),
    "jsd_1": ("jsd", {"beta": 1.0}),
    "tvd": ("tvd", {}),
    "skew_fkl": ("skew_forward_kl", {"alpha": 0.1}),
    "skew_rkl": ("skew_reverse_kl", {"alpha": 0.3}),
    "soft_ce": ("soft_cross_entropy", {}),
    "ab_pos": ("alpha_beta_divergence", {"alpha": 0.5, "beta": 0.3}),
    "ab_neg": ("alpha_beta_divergence", {"alpha": 1.5, "beta": -0.4}),
    "akl_0.5": ("adaptive_kl", {"mu": 0.5}),
    "akl_0.9": ("adaptive_kl", {"mu": 0.9}),
}
SMOOTH = [k for k in CASES if not k.startswith("akl")]  # AKL: stop_gradient weights
# q^β with β < 0 overflows at logits of ±1e4: genuinely infinite, not a kernel defect.
EXTREME = [k for k in CASES if k != "ab_neg"]
BF16_EXTREME = ("forward_kl", "reverse_kl", "jsd_0.5", "tvd", "skew_fkl", "akl_0.5")


def call(key, s, t, temperature=1.0):
    name, kw = CASES[key]
    return getattr(L, name)(s, t, temperature=temperature, **kw)


@jax.jit
def all_values(s, t, temperature):
    return {k: call(k, s, t, temperature) for k in CASES}


@functools.partial(jax.jit, static_argnames="keys")
def all_values_and_grads(s, t, keys=tuple(EXTREME)):
    def one(k):
        val, grads = jax.value_and_grad(lambda a, b: jnp.sum(call(k, a, b)), (0, 1))(s, t)
        return call(k, s, t), grads
    return {k: one(k) for k in keys}


def logits(rng, shape, dtype=jnp.float32, scale=2.0):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matches_float64_reference(rng, dtype):
    # bf16 on one shape: only the rounding of the inputs differs (the reference sees it).
    shapes = [(7,), (2, 3, 5)] if dtype == jnp.float32 else [(3, 11)]
    for shape in shapes:
        for temperature in (1.0, 2.5):
            s, t = logits(rng, shape, dtype), logits(rng, shape, dtype)
            outs = all_values(s, t, temperature)
            for key, out in outs.items():
                name, kw = CASES[key]
                assert out.dtype == jnp.float32 and out.shape == shape[:-1], key
                ref = _refs.dense(name, s, t, temperature, **kw)
                assert_close(out, ref, dtype, err_msg=f"{key} shape={shape} T={temperature}")


def test_check_grads_all_smooth_divergences(rng):
    # One check_grads over the vector of all smooth divergences (one compile, not 12):
    # its random cotangent mixes every entry, so a wrong VJP in any one of them shows.
    s, t = logits(rng, (2, 6), scale=1.0), logits(rng, (2, 6), scale=1.0)
    w = jnp.asarray(rng.uniform(0.5, 1.5, size=(2,)), jnp.float32)
    f = jax.jit(lambda a, b: jnp.stack([jnp.sum(call(k, a, b) * w) for k in SMOOTH]))
    check_grads(f, (s, t), order=1, modes=("rev",), eps=2e-3)


def _ref_grad(name, s, t, temperature=1.0):
    """d/ds of the per-token value (float64): closed forms for the KL family."""
    p, q = _refs.softmax(t, temperature), _refs.softmax(s, temperature)
    if name == "forward_kl":
        return (q - p) / temperature
    lq, lp = np.log(q), np.log(p)
    rkl = (q * (lq - lp)).sum(-1, keepdims=True)
    return q * (lq - lp - rkl) / temperature


@jax.jit
def kl_grads(s, t, temperature):
    return [jax.grad(lambda a, fn=fn: jnp.sum(fn(a, t, temperature=temperature)))(s)
            for fn in (L.forward_kl, L.reverse_kl)]


def test_kl_grads_match_float64_reference(rng):
    for temperature in (1.0, 2.0):
        s, t = logits(rng, (3, 9)), logits(rng, (3, 9))
        for name, g in zip(("forward_kl", "reverse_kl"), kl_grads(s, t, temperature)):
            assert_close(g, _ref_grad(name, s, t, temperature), "float32", **GRAD, err_msg=name)


def test_zero_on_equal_and_nonnegative(rng):
    s, t = logits(rng, (4, 13)), logits(rng, (4, 13))
    diff, same = all_values(s, t, 1.0), all_values(t, t, 1.0)
    for key in CASES:
        assert np.all(np.asarray(diff[key]) >= -1e-6), key
        if key == "soft_ce":  # H(p), not a divergence: at q = p it is the entropy
            p = _refs.softmax(t)
            np.testing.assert_allclose(same[key], -(p * np.log(p)).sum(-1), rtol=1e-5)
        else:
            np.testing.assert_allclose(same[key], 0.0, atol=2e-6, err_msg=key)


@jax.jit
def jsd_sweep(s, t):
    out = {b: L.jsd(s, t, beta=b) for b in (0.0, 1e-6, 0.5, 1.0 - 1e-6, 1.0)}
    grads = {b: jax.grad(lambda a, b=b: jnp.sum(L.jsd(a, t, beta=b)))(s) for b in (1e-6, 1 - 1e-6)}
    return out, grads, L.forward_kl(s, t), L.reverse_kl(s, t)


def test_jsd_ends_are_exact_kls_and_interior_tends_to_zero(rng):
    s, t = logits(rng, (5, 17)), logits(rng, (5, 17))
    out, grads, fkl, rkl = jsd_sweep(s, t)
    np.testing.assert_array_equal(out[0.0], fkl)  # β = 0 is exactly forward KL
    np.testing.assert_array_equal(out[1.0], rkl)  # β = 1 is exactly reverse KL
    assert np.all(np.asarray(fkl) > 0.05) and np.all(np.asarray(rkl) > 0.05)
    for beta in (1e-6, 1.0 - 1e-6):  # the documented discontinuity, at both ends
        assert np.all(np.asarray(out[beta]) < 1e-4 * np.asarray(fkl + rkl)), beta
        assert np.max(np.abs(np.asarray(grads[beta]))) < 1e-4, beta
    assert_close(out[0.5], _refs.dense("jsd", s, t, beta=0.5))


def test_skew_and_adaptive_ends(rng):
    s, t = logits(rng, (3, 8)), logits(rng, (3, 8))
    f = jax.jit(lambda a, b: (L.skew_forward_kl(a, b, alpha=0.0), L.forward_kl(a, b),
                              L.skew_reverse_kl(a, b, alpha=0.0), L.reverse_kl(a, b),
                              L.skew_forward_kl(a, b, alpha=1.0), L.adaptive_kl(a, b, mu=0.0),
                              L.adaptive_kl(a, b, mu=1e-6)))
    sf, fkl, sr, rkl, one, akl0, akl_top = f(s, t)
    np.testing.assert_array_equal(sf, fkl)
    np.testing.assert_array_equal(sr, rkl)
    np.testing.assert_array_equal(one, 0.0)
    # μ = 0: empty head, all weight on reverse KL; μ tiny: the head is the top token only.
    assert_close(akl0, _refs.dense("reverse_kl", s, t))
    assert_close(akl_top, _refs.dense("adaptive_kl", s, t, mu=1e-6))
    assert not np.allclose(akl_top, rkl)


def test_adaptive_kl_gradient(rng):
    # Weights under stop_gradient: the gradient is the fixed-weight mix of the two KL
    # gradients, with the weights of the float64 head/tail gaps.
    s, t = logits(rng, (3, 8)), logits(rng, (3, 8))
    p, q = _refs.softmax(t), _refs.softmax(s)
    fkl, rkl = _refs.kl(p, q), _refs.kl(q, p)
    w = ((_refs.akl(p, q, 0.5) - rkl) / (fkl - rkl))[:, None]
    ref = w * _ref_grad("forward_kl", s, t) + (1 - w) * _ref_grad("reverse_kl", s, t)
    g = jax.jit(jax.grad(lambda a: jnp.sum(L.adaptive_kl(a, t, mu=0.5))))(s)
    assert_close(g, ref, "float32", **GRAD)
    assert not np.allclose(np.asarray(g), _ref_grad("forward_kl", s, t), atol=1e-3)


LIMITS = [  # (alpha, beta) on a limit line, and the divergence it must equal (if any)
    (1.0, 0.0, "forward_kl"),
    (0.0, 1.0, "reverse_kl"),
    (0.7, 0.0, None),
    (0.0, 0.6, None),
    (0.5, -0.5, None),
    (-0.8, 0.8, None),
    (0.0, 0.0, None),
]


@jax.jit
def ab_limits(s, t):
    def one(a, b):
        f = lambda x: jnp.sum(L.alpha_beta_divergence(x, t, alpha=a, beta=b))
        return L.alpha_beta_divergence(s, t, alpha=a, beta=b), jax.grad(f)(s)
    return [one(a, b) for a, b, _ in LIMITS]


def test_alpha_beta_limits_match_general_formula_near_limit(rng):
    s, t = logits(rng, (3, 9), scale=1.0), logits(rng, (3, 9), scale=1.0)
    p, q = _refs.softmax(t), _refs.softmax(s)
    d = 1e-5  # the general formula in float64, just off the limit, from both sides
    for (alpha, beta, same_as), (out, g) in zip(LIMITS, ab_limits(s, t)):
        for sign in (1.0, -1.0):
            near = _refs.ab_general(p, q, alpha + sign * d, beta + sign * 0.7 * d)
            np.testing.assert_allclose(out, near, rtol=2e-4, err_msg=f"{alpha}, {beta}")
        if same_as:
            assert_close(out, _refs.dense(same_as, s, t))
        assert np.all(np.isfinite(np.asarray(g)))


def test_cross_entropy(rng):
    ce = jax.jit(L.cross_entropy)
    for shape in [(7,), (2, 3, 5)]:
        s = logits(rng, shape)
        tg = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]), jnp.int32)
        assert_close(ce(s, tg), _refs.cross_entropy(s, tg))
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(L.cross_entropy(a, b))))(s, tg)
    ref = _refs.softmax(s) - np.eye(shape[-1])[np.asarray(tg)]
    assert_close(g, ref, "float32", **GRAD)
    bad = np.asarray(ce(s, tg.at[0, 0].set(shape[-1])))
    assert np.isnan(bad[0, 0]) and np.isfinite(bad[1]).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_extreme_logits_and_padded_vocab_are_finite(rng, dtype):
    v, pad = 12, 4
    big = lambda: rng.choice([-1e4, 1e4], size=(3, v)) + rng.normal(size=(3, v))
    s, t = jnp.asarray(big(), dtype), jnp.asarray(big(), dtype)
    sp = logits(rng, (3, v), dtype).at[:, -pad:].set(-jnp.inf)
    tp = logits(rng, (3, v), dtype).at[:, -pad:].set(-jnp.inf)
    for a, b, padded in ((s, t, False), (sp, tp, True)):
        keys = tuple(EXTREME) if dtype == jnp.float32 else BF16_EXTREME
        for key, (val, (gs, gt)) in all_values_and_grads(a, b, keys=keys).items():
            for x in (val, gs, gt):
                assert np.all(np.isfinite(np.asarray(x))), (key, padded)
            if padded:  # padding changes nothing: the sliced value, zero gradient there
                name, kw = CASES[key]
                ref = _refs.dense(name, a[:, :-pad], b[:, :-pad], **kw)
                assert_close(val, ref, dtype, err_msg=key)
                np.testing.assert_array_equal(np.asarray(gs)[:, -pad:], 0.0, err_msg=key)


# Divergences that stay finite when the teacher alone has -inf logits (p = 0, q > 0),
# e.g. a teacher restricted to a sub-vocabulary; the reverse-KL family is then infinite.
TEACHER_ZERO = ("forward_kl", "jsd_0.5", "jsd_0.1", "jsd_0", "skew_fkl", "skew_rkl", "tvd",
                "soft_ce", "ab_pos")


def test_teacher_only_inf_entries(rng):
    s = logits(rng, (3, 9))
    t = logits(rng, (3, 9)).at[:, 6:].set(-jnp.inf)
    for key, (val, (gs, gt)) in all_values_and_grads(s, t, keys=TEACHER_ZERO).items():
        for x in (val, gs, gt):
            assert np.all(np.isfinite(np.asarray(x))), key
        name, kw = CASES[key]
        assert_close(val, _refs.dense(name, s, t, **kw), err_msg=key)
    limit = jax.jit(lambda a, b: L.alpha_beta_divergence(a, b, alpha=1.0, beta=0.0))
    assert_close(limit(s, t), _refs.dense("forward_kl", s, t))


def test_nan_input_propagates(rng):
    s, t = logits(rng, (4, 13)), logits(rng, (4, 13))  # a shape compiled above
    out = np.asarray(all_values(s.at[0, 1].set(jnp.nan), t, 1.0)["forward_kl"])
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all()


BAD = [
    (lambda s, t: L.forward_kl(s, t[..., :-1]), ValueError, r"teacher_logits.*\(3, 4\).*vocab"),
    (lambda s, t: L.forward_kl(s, t[:2]), ValueError, r"student_logits has shape \(3, 5\)"),
    (lambda s, t: L.jsd(s, t, beta=1.5), ValueError, r"beta must lie in \[0, 1\], got 1.5"),
    (lambda s, t: L.jsd(s, t, beta=-0.1), ValueError, r"beta.*got -0.1"),
    (lambda s, t: L.skew_forward_kl(s, t, alpha=2.0), ValueError, r"alpha.*got 2.0"),
    (lambda s, t: L.adaptive_kl(s, t, mu=1.5), ValueError, r"mu.*got 1.5"),
    (lambda s, t: L.reverse_kl(s, t, temperature=0.0), ValueError, r"temperature must be > 0"),
    (lambda s, t: L.tvd(s, t, temperature=-1), ValueError, r"temperature.*got -1"),
    (lambda s, t: L.tvd(s, t, temperature=np.ones(2)), ValueError, r"temperature.*scalar"),
    (lambda s, t: L.forward_kl(s.astype(jnp.int32), t), TypeError, r"student_logits.*int32"),
    (lambda s, t: L.forward_kl(s, t.astype(jnp.int32)), TypeError, r"teacher_logits.*int32"),
    (lambda s, t: L.divergence("kl", s, t), ValueError, r"unknown divergence 'kl'"),
    (lambda s, t: L.divergence("forward_kl", s, t, beta=0.5), TypeError,
     r"'forward_kl' got unexpected argument\(s\) \['beta'\]"),
    (lambda s, t: L.divergence("jsd", s, t, alpha=0.5), TypeError, r"it takes \['beta'\]"),
    (lambda s, t: L.cross_entropy(s, jnp.zeros(3)), TypeError, r"targets.*integer.*float32"),
    (lambda s, t: L.cross_entropy(s, jnp.zeros(4, int)), ValueError, r"targets has shape \(4,\)"),
    (lambda s, t: L.alpha_beta_divergence(s, t, alpha=np.array([1.0]), beta=0.0), ValueError,
     r"alpha must be a scalar"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_arguments_raise_at_trace_time(rng, call, exc, match):
    s, t = logits(rng, (3, 5)), logits(rng, (3, 5))
    with pytest.raises(exc, match=match):
        jax.jit(call).trace(s, t)  # fails while tracing, before anything is compiled


def test_traced_hyperparameters_are_allowed(rng):
    s, t = logits(rng, (2, 6)), logits(rng, (2, 6))
    f = jax.jit(lambda a, b, beta, temp: L.jsd(a, b, beta=beta, temperature=temp))
    for beta in (0.3, 0.0, 1.0):  # a traced β keeps the exact-KL ends of a static one
        assert_close(f(s, t, beta, 1.5), _refs.dense("jsd", s, t, 1.5, beta=beta))
