"""On-policy objectives (kdjax.losses.on_policy): exact enumeration of every completion of
a tiny autoregressive policy, and float64 NumPy references on random per-token inputs."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import on_policy as op
from tests.tolerances import assert_close

V, EOS, LENGTH = 4, 0, 3  # vocabulary, end token (also the pad id: pad == eos), max length
GAMMAS = (0.0, 0.5, 0.9, 1.0)


# ---------------------------------------------------------------- exact enumeration


def _enumerate():
    """Every completion of length ≤ LENGTH ending at EOS (or cut at LENGTH), padded with
    EOS; per position the index of its prefix in a table of live prefixes."""
    prefixes = {(): 0}
    for n in range(1, LENGTH):
        for pre in itertools.product(range(1, V), repeat=n):
            prefixes[pre] = len(prefixes)
    seqs = []
    for n in range(1, LENGTH + 1):
        for body in itertools.product(range(1, V), repeat=n - 1):
            seqs.append(body + (EOS,))
        if n == LENGTH:
            seqs += list(itertools.product(range(1, V), repeat=n))
    tokens = np.full((len(seqs), LENGTH), EOS)
    prefix = np.zeros((len(seqs), LENGTH), np.int64)
    mask = np.zeros((len(seqs), LENGTH), bool)
    for s, y in enumerate(seqs):
        tokens[s, :len(y)], mask[s, :len(y)] = y, True
        prefix[s, :len(y)] = [prefixes[tuple(y[:t])] for t in range(len(y))]
    return len(prefixes), tokens, prefix, mask


@pytest.fixture(scope="module")
def world():
    n_prefix, tokens, prefix, mask = _enumerate()
    rng = np.random.default_rng(16)
    return dict(theta=rng.normal(size=(n_prefix, V)) * 1.5,
                teacher=rng.normal(size=(n_prefix, V)) * 1.5,
                tokens=tokens, prefix=prefix, mask=mask)


def _token_logprobs(table, w):
    """log π(y_t | y<t) per position, NaN on padding (the losses must never read it)."""
    lp = jax.nn.log_softmax(table, axis=-1)[w["prefix"], w["tokens"]]
    return jnp.where(w["mask"], lp, jnp.nan)


def _seq_logprob(lp, mask):
    return jnp.sum(jnp.where(mask, lp, 0.0), axis=-1)


def _expected_grad(w, loss_fn):
    """Σ_y q(y)·∇θ loss(y), q(y) held fixed: the exact expected policy gradient."""
    def objective(theta):
        lq, lp = _token_logprobs(theta, w), _token_logprobs(w["teacher"], w)
        per_row = jax.vmap(lambda a, b, m: loss_fn(a, a, b, m).sum)(lq, lp, w["mask"])
        q_seq = jax.lax.stop_gradient(jnp.exp(_seq_logprob(lq, w["mask"])))
        return jnp.sum(q_seq * per_row)
    return jax.grad(objective)(jnp.asarray(w["theta"]))


def _sequence_kl_grad(w):
    def kl(theta):
        lq, lp = _token_logprobs(theta, w), _token_logprobs(w["teacher"], w)
        sq, sp = _seq_logprob(lq, w["mask"]), _seq_logprob(lp, w["mask"])
        return jnp.sum(jnp.exp(sq) * (sq - sp))
    return jax.grad(kl)(jnp.asarray(w["theta"]))


def test_enumeration_is_a_distribution(world):
    with jax.enable_x64(True):
        lq = _token_logprobs(jnp.asarray(world["theta"]), world)
        total = jnp.sum(jnp.exp(_seq_logprob(lq, world["mask"])))
    assert abs(float(total) - 1.0) < 1e-12
    assert world["mask"].sum(1).min() == 1 and not world["mask"].all()  # variable lengths


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_rkl_reward_gamma_one_is_sequence_kl_gradient(world, clip_eps):
    with jax.enable_x64(True):
        want = _sequence_kl_grad(world)
        got = _expected_grad(world, lambda *a: op.rkl_reward_loss(*a, gamma=1.0,
                                                                  clip_eps=clip_eps))
        myopic = _expected_grad(world, lambda *a: op.rkl_reward_loss(*a, gamma=0.0))
    assert np.abs(np.asarray(want)).max() > 1e-2
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    # γ = 0 drops the future rewards: a different (biased) gradient, so the check can fail
    assert np.abs(np.asarray(myopic) - np.asarray(want)).max() > 1e-2


def test_mixture_weights_by_enumeration(world):
    alpha, rng = 0.3, np.random.default_rng(7)
    with jax.enable_x64(True):
        theta = jnp.asarray(world["theta"])
        lq, lp, m = _token_logprobs(theta, world), _token_logprobs(world["teacher"], world), \
            world["mask"]
        q = jnp.exp(_seq_logprob(lq, m))
        mix_tok = jnp.log(alpha * jnp.exp(lp) + (1 - alpha) * jnp.exp(lq))
        mix = jnp.exp(_seq_logprob(mix_tok, m))  # token-by-token sampling from α·p + (1−α)·q
        f = rng.normal(size=len(q))
        g = rng.normal(size=(world["theta"].shape[0], V))[world["prefix"], world["tokens"]]
        g = np.where(m, g, 0.0)  # g_t: a function of the prefix y≤t only
        seq_w = op.sequence_importance_weights(lq, lp, alpha, m)
        pre_w = op.prefix_importance_weights(lq, lp, alpha, m)
        tok_w = op.mixture_importance_weights(lq, lp, alpha, m)
        e_q_g = jnp.sum(q[:, None] * g, axis=0)
        e_mix = lambda wt: jnp.sum(mix[:, None] * wt * g, axis=0)  # noqa: E731
        assert abs(float(jnp.sum(mix)) - 1.0) < 1e-12
        assert_close(jnp.sum(mix * seq_w * f), jnp.sum(q * f), rtol=1e-12, atol=1e-12)
        assert_close(e_mix(pre_w), e_q_g, rtol=1e-12, atol=1e-12)
        tok = e_mix(tok_w)
        # MiniLLM's per-token weight: exact at the first token and given the prefix
        # (E_mix[w_t | y<t] = 1), biased for later tokens whose prefix came from the mixture
        assert_close(tok[0], e_q_g[0], rtol=1e-12, atol=1e-12)
        alive = m.astype(np.float64)
        assert_close(jnp.sum(mix[:, None] * tok_w * alive, 0), jnp.sum(mix[:, None] * alive, 0),
                     rtol=1e-12, atol=1e-12)
        bias = np.abs(np.asarray(tok - e_q_g))[1:]
    assert bias.max() > 1e-3, bias


# ---------------------------------------------------------------- NumPy references


def _segments(rng, batch, width):
    """Per row a contiguous valid segment (length ≥ 1) at a random offset."""
    mask = np.zeros((batch, width), bool)
    for b in range(batch):
        n = rng.integers(1, width + 1)
        start = rng.integers(0, width - n + 1)
        mask[b, start:start + n] = True
    return mask


def ref_returns(r, mask, gamma, *, normalize=False, include_current=True):
    out = np.zeros(r.shape)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(mask[b])
        vals = np.asarray(r[b, idx], np.float64)
        for j, t in enumerate(idx):
            rest = vals[j:] if include_current else vals[j + 1:]
            total = sum(gamma ** k * x for k, x in enumerate(rest))
            out[b, t] = total / len(rest) if normalize and len(rest) else total
    return out


def _garbage(x, mask):
    return np.where(mask, x, np.array([np.nan, 1e30, -np.inf])[np.arange(x.size) % 3]
                    .reshape(x.shape))


@pytest.fixture(scope="module")
def jitted():
    return dict(
        returns=jax.jit(op.discounted_returns, static_argnames="gamma"),
        norm=jax.jit(op.length_normalized_returns,
                     static_argnames=("gamma", "include_current")),
    )


@pytest.mark.parametrize("gamma", GAMMAS)
def test_discounted_returns_match_numpy_and_ignore_padding_side(rng, jitted, gamma):
    r, mask = rng.normal(size=(6, 9)), _segments(rng, 6, 9)
    got = jitted["returns"](_garbage(r, mask), mask, gamma=gamma)
    assert_close(got, ref_returns(r, mask, gamma))
    assert np.all(np.asarray(got)[~mask] == 0)
    # holes inside a row are skipped: the distance counts valid tokens only
    holes = rng.random((6, 9)) < 0.6
    assert_close(jitted["returns"](_garbage(r, holes), holes, gamma=gamma),
                 ref_returns(r, holes, gamma))
    # the same rows packed to the left vs to the right: the same values on valid tokens
    n = mask.sum(1)
    right = np.arange(9)[None] < n[:, None]
    left = np.arange(9)[None] >= 9 - n[:, None]
    vals = np.where(mask, r, 0.0)
    pack = lambda dst: np.where(dst, 0.0, np.nan).astype(np.float64)  # noqa: E731
    r_right, r_left = pack(right), pack(left)
    r_right[right], r_left[left] = vals[mask], vals[mask]
    a = np.asarray(jitted["returns"](r_right, right, gamma=gamma))[right]
    b = np.asarray(jitted["returns"](r_left, left, gamma=gamma))[left]
    assert_close(a, b)  # equal up to the scan tree's f32 rounding


@pytest.mark.parametrize("include_current", [False, True])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_length_normalized_returns_match_numpy(rng, jitted, gamma, include_current):
    r, mask = rng.normal(size=(6, 9)), _segments(rng, 6, 9)
    got = jitted["norm"](_garbage(r, mask), mask, gamma=gamma, include_current=include_current)
    assert_close(got, ref_returns(r, mask, gamma, normalize=True,
                                  include_current=include_current))


@pytest.mark.parametrize("include_current", [False, True])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_length_normalized_constant_reward_closed_form(jitted, gamma, include_current):
    """r ≡ c: the j-th of L completion tokens averages n = L−1−j (or L−j) future rewards,
    A = c·Σ_{k<n} γ^k / n = c·(1 − γ^n)/((1 − γ)·n), c at γ = 1, 0 when n = 0."""
    c, width = -0.7, 8
    for length, offset in [(5, 0), (5, 3), (1, 2), (8, 0)]:  # right-, left-, one-token, full
        mask = np.zeros((1, width), bool)
        mask[0, offset:offset + length] = True
        r = _garbage(np.full((1, width), c), mask)
        got = np.asarray(jitted["norm"](r, mask, gamma=gamma, include_current=include_current))
        j = np.arange(length)
        n = length - j - (0 if include_current else 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            geo = n.astype(float) if gamma == 1.0 else (1 - gamma ** n) / (1 - gamma)
            want = np.where(n > 0, c * geo / np.maximum(n, 1), 0.0)
        assert_close(got[0, offset:offset + length], want)
        assert np.all(got[0, ~mask[0]] == 0)


def test_advantages_carry_no_gradient(rng, jitted):
    lq, lp, mask = rng.normal(size=(3, 6)), rng.normal(size=(3, 6)), _segments(rng, 3, 6)
    g = jax.jit(jax.grad(lambda x: jnp.sum(op.length_normalized_returns(lp - x, mask,
                                                                      gamma=0.9))))(lq)
    assert np.all(np.asarray(g) == 0)
    # on-policy call (logq_old is logq itself): only the ratio carries gradient, −A·ρ = −A
    adv = ref_returns(lp - lq, mask, 0.9, normalize=True, include_current=False)
    g = jax.jit(jax.grad(lambda x: op.minillm_policy_loss(x, x, lp, mask, gamma=0.9).sum))(lq)
    assert_close(g, np.where(mask, -adv, 0.0), "grad")


# ---------------------------------------------------------------- PPO clip


def ref_ppo(lq, lq_old, adv, mask, eps, w=1.0):
    ratio = np.exp(lq - lq_old) * w
    unclipped, clipped = ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv
    inside = (ratio >= 1 - eps) & (ratio <= 1 + eps)
    loss = np.sum(np.where(mask, -np.minimum(unclipped, clipped), 0.0))
    grad = np.where(mask & ((unclipped <= clipped) | inside), -unclipped, 0.0)
    return loss, grad, (unclipped > clipped) & mask


@pytest.fixture(scope="module")
def ppo_grads():
    def value_and_grads(fn, lq, lq_old, lp, mask, **kw):
        def f(a, b, c):
            out = fn(a, b, c, mask, **kw)
            return out.sum, out.count
        (total, count), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
            lq, lq_old, lp)
        return total, count, grads
    return value_and_grads


@pytest.mark.parametrize("which", ["rkl_reward", "minillm", "minillm_weighted"])
def test_ppo_clip_values_and_gradients(rng, ppo_grads, which):
    shape, eps, gamma = (5, 12), 0.2, 0.9
    mask = _segments(rng, *shape)
    lq_old = rng.normal(size=shape) - 2.0
    lq = lq_old + rng.uniform(-0.6, 0.6, size=shape)  # ratios on both sides of [0.8, 1.2]
    lp = lq_old + rng.normal(size=shape)
    w = rng.uniform(0.5, 1.5, size=shape) if which == "minillm_weighted" else None
    if which == "rkl_reward":
        fn, kw = op.rkl_reward_loss, dict(gamma=gamma, clip_eps=eps)
        adv = ref_returns(lp - lq_old, mask, gamma)
    else:
        fn, kw = op.minillm_policy_loss, dict(gamma=gamma, clip_eps=eps, weights=w)
        adv = ref_returns(lp - lq_old, mask, gamma, normalize=True, include_current=False)
    args = [_garbage(x, mask) for x in (lq, lq_old, lp)]
    total, count, (g_lq, g_old, g_lp) = ppo_grads(fn, *args, mask, **kw)
    want, want_grad, active = ref_ppo(lq, lq_old, adv, mask, eps, 1.0 if w is None else w)
    assert (active & (adv > 0)).any() and (active & (adv < 0)).any()  # both clip sides hit
    assert_close(total, want)
    assert float(count) == mask.sum()
    assert_close(g_lq, want_grad, "grad")
    assert np.all(np.asarray(g_old) == 0) and np.all(np.asarray(g_lp) == 0)  # no sampling grad


def test_jit_vmap_and_leading_axes(rng):
    lq, lp, mask = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5)), \
        _segments(rng, 6, 5).reshape(2, 3, 5)
    eager = op.rkl_reward_loss(lq, lq - 0.1, lp, mask, gamma=0.5, clip_eps=0.2)
    jitted = jax.jit(op.rkl_reward_loss, static_argnames=("gamma", "clip_eps"))(
        lq, lq - 0.1, lp, mask, gamma=0.5, clip_eps=0.2)
    rows = jax.jit(jax.vmap(lambda a, b, m: op.rkl_reward_loss(a, a - 0.1, b, m, gamma=0.5,
                                                               clip_eps=0.2).sum))(lq, lp, mask)
    assert_close(jitted.sum, eager.sum)
    assert_close(jnp.sum(rows), eager.sum)
    assert float(eager.count) == mask.sum()


def test_mixture_weights_values_and_extremes(rng):
    lq, lp, mask = -rng.uniform(0.1, 5, size=(4, 6)), -rng.uniform(0.1, 5, size=(4, 6)), \
        _segments(rng, 4, 6)
    q, p = np.exp(lq), np.exp(lp)
    for alpha in (0.0, 0.2, 1.0):
        got = op.mixture_importance_weights(_garbage(lq, mask), _garbage(lp, mask), alpha, mask)
        assert_close(got, np.where(mask, q / (alpha * p + (1 - alpha) * q), 1.0))
        logw = np.log(q / (alpha * p + (1 - alpha) * q))
        assert_close(op.sequence_importance_weights(lq, lp, alpha, mask),
                     np.exp(np.where(mask, logw, 0).sum(1)))
    # log-probs far below exp's range: still finite, and w ≤ 1/(1−α) since mix ≥ (1−α)·q
    far = op.mixture_importance_weights(np.array([[-1e4, -200.0, -3.0]]),
                                        np.array([[-3.0, -1e4, -200.0]]), 0.4,
                                        np.ones((1, 3), bool))
    assert_close(far, [[np.exp(-1e4 + 3.0) / 0.4, 1 / 0.6, 1 / 0.6]], atol=1e-12)


# ---------------------------------------------------------------- bad arguments


def test_bad_arguments_raise_with_the_value():
    x, m = np.zeros((2, 3)) - 1.0, np.ones((2, 3), bool)
    cases = [
        (lambda: op.discounted_returns(x, m, gamma=1.5), "1.5"),
        (lambda: op.length_normalized_returns(x, m, gamma=-0.1), "-0.1"),
        (lambda: op.rkl_reward_loss(x, x, x, m, clip_eps=0.0), "0.0"),
        (lambda: op.minillm_policy_loss(x, x, x, m, clip_eps=-0.2), "-0.2"),
        (lambda: op.minillm_policy_loss(x, x, x, m, gamma=2.0), "2.0"),
        (lambda: op.mixture_importance_weights(x, x, 1.2, m), "1.2"),
        (lambda: op.sequence_importance_weights(x, x, -0.5, m), "-0.5"),
        (lambda: op.rkl_reward_loss(x, x, x[:, :2], m), "(2, 2)"),
        (lambda: op.minillm_policy_loss(x, x, x, m, weights=x[:1]), "(1, 3)"),
    ]
    for call, value in cases:
        with pytest.raises(ValueError, match=value.replace("(", r"\(").replace(")", r"\)")):
            call()
    with pytest.raises(TypeError, match="logq"):
        op.rkl_reward_loss(np.zeros((2, 3), np.int32), x, x, m)
