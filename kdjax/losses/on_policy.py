"""On-policy distillation objectives on sampled completions: RKL reward and MiniLLM.

Every input is per token, `[..., C]` over completion positions (the causal shift is
done by the caller: position t holds the log-prob of the sampled token y_t given x, y<t):
`logq` = log q_θ(y_t|·) of the student being trained (with gradient), `logq_old` = the
sampler's log q_old(y_t|·), `logp` = the teacher's log p(y_t|·). `mask` is True on real
completion tokens (EOS included, also when pad == eos) and False on padding, on either
side of the row; values at masked positions may be anything (NaN included) and are
never read. Rewards, advantages and importance weights are under stop_gradient; the
losses return `Weighted(sum, count)` with count = Σ mask, so the trainer divides once by
the completion-token count of the whole step (all micro-batches, all hosts).

Discounting counts positions *within the completion* (valid tokens only), so left or
right padding cannot shift it (the absolute-position bug of trl #6626), and padding
never reaches a valid token's advantage or its length normaliser (trl #7024).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kdjax.losses import _checks
from kdjax.losses.reduce import Weighted, masked_sum_count

Array = jax.Array


def _tokens(arrays: dict[str, Array], mask) -> tuple[list[Array], Array]:
    """Checks the per-token arrays share `mask`'s shape; returns them in ≥ f32 and the
    mask as bool."""
    _checks.check_rank_at_least(mask, 1, "mask")
    shape = jnp.shape(mask)
    out = []
    for name, a in arrays.items():
        _checks.check_floating(a, name)
        if jnp.shape(a) != shape:
            raise ValueError(f"{name} has shape {jnp.shape(a)} but mask has shape {shape}; "
                             "every per-token input must be [..., C] like the mask")
        out.append(jnp.asarray(a))
    dtype = jnp.promote_types(jnp.result_type(*out), jnp.float32)
    return [a.astype(dtype) for a in out], jnp.asarray(mask).astype(bool)


def _gamma(gamma) -> None:
    g = _checks.check_unit_interval(gamma, "gamma")
    if g is None:
        raise TypeError("gamma must be a static Python float in [0, 1], got a traced value")


def _clip_eps(clip_eps) -> float | None:
    if clip_eps is None:
        return None
    eps = _checks.concrete_float(clip_eps, "clip_eps")
    if eps is None or not eps > 0.0:
        raise ValueError(f"clip_eps must be a Python float > 0 (PPO uses 0.2) or None for "
                         f"no clipping, got {clip_eps!r}")
    return eps


def _reverse_returns(rewards: Array, valid: Array, gamma: float) -> Array:
    """g_t = r_t + γ·g_(next valid) from the right; a masked position passes the next
    valid token's return through unchanged (so it holds 'the return from here on').

    The linear recurrence g_t = a_t·g_{t+1} + b_t (a = γ, b = r on valid tokens; a = 1,
    b = 0 on masked ones) runs as an associative scan of affine maps: O(C) work and
    O(log C) depth, no [C, C] matrix, no C-step sequential loop on an accelerator.
    """
    a = jnp.where(valid, jnp.asarray(gamma, rewards.dtype), jnp.ones((), rewards.dtype))
    b = jnp.where(valid, rewards, jnp.zeros((), rewards.dtype))

    def compose(later, earlier):  # reverse scan: earlier ∘ later, g ↦ a_e·(a_l·g + b_l) + b_e
        a_l, b_l = later
        a_e, b_e = earlier
        return a_e * a_l, b_e + a_e * b_l

    _, g = lax.associative_scan(compose, (a, b), reverse=True, axis=b.ndim - 1)
    return g


def discounted_returns(rewards: Array, mask: Array, *, gamma) -> Array:
    """A_t = Σ_{t' ≥ t, valid} γ^(k(t, t')) r_t', k = number of valid tokens in (t, t'].

    Args:
      rewards: `[..., C]` float per-token rewards; masked positions may hold anything.
      mask: `[..., C]` bool, True on the row's completion tokens.
      gamma: static discount in [0, 1] (0: A_t = r_t; 1: the reward-to-go).

    Returns:
      `[..., C]` (≥ f32) returns on valid tokens, 0 on masked ones, under stop_gradient
      (an advantage is a constant of the policy-gradient loss).
    """
    _gamma(gamma)
    (r,), valid = _tokens({"rewards": rewards}, mask)
    g = _reverse_returns(lax.stop_gradient(r), valid, gamma)
    return jnp.where(valid, g, jnp.zeros((), g.dtype))


def length_normalized_returns(rewards: Array, mask: Array, *, gamma,
                              include_current: bool = False) -> Array:
    """MiniLLM's length-normalised long-term reward (Gu et al. 2024, §2.2).

    Default (the paper): R^Norm_{t+1} = Σ_{t' > t} γ^(t'−t−1) r_t' / n_t with n_t the
    number of valid tokens after t, i.e. the mean of the *future* rewards; the current
    token's reward r_t is left out because the exact single-step term covers it (the
    paper's "single-step decomposition"; its 1/(T−t−1) counts the same tokens, with t
    0-based). 0 where n_t = 0 (the last token).

    `include_current=True` is the released code instead (microsoft/LMOps,
    minillm/minillm/losses.py, `_get_advantages_and_returns`: `last_rw = rw_delta +
    gamma * last_rw` from the right, divided by `lens = mask - cumsum(mask) + sum(mask)`):
    Σ_{t' ≥ t} γ^(t'−t) r_t' / (valid tokens from t on). That code also adds the exact
    single-step term, so r_t enters twice (sampled, ÷ length, and exact); it then whitens
    the advantages over the batch, padding included, which this function does not do.
    Both divide the discounted sum by a plain token count (trl's MiniLLMTrainer divides
    by the discounted count Σ γ^(t'−t) instead), so a constant reward c gives
    c·(1 − γ^n)/((1 − γ)·n), and c at γ = 1.

    Args:
      rewards: `[..., C]` float r_t = log p(y_t|·) − log q_old(y_t|·); masked positions
        may hold anything.
      mask: `[..., C]` bool, True on the row's completion tokens.
      gamma: static discount in [0, 1].
      include_current: sum from t (LMOps code) instead of t + 1 (paper).

    Returns:
      `[..., C]` (≥ f32) normalised returns on valid tokens, 0 on masked ones, under
      stop_gradient.
    """
    _gamma(gamma)
    (r,), valid = _tokens({"rewards": rewards}, mask)
    g = _reverse_returns(lax.stop_gradient(r), valid, gamma)
    n = lax.cumsum(valid.astype(g.dtype), axis=g.ndim - 1, reverse=True)
    if not include_current:
        # g at t+1 is the return of the next valid token (masked positions pass it on)
        g = jnp.concatenate([g[..., 1:], jnp.zeros_like(g[..., :1])], axis=-1)
        n = n - valid.astype(g.dtype)
    keep = valid & (n > 0)
    return jnp.where(keep, g / jnp.where(keep, n, 1.0), jnp.zeros((), g.dtype))


def _surrogate_loss(logq, logq_old, advantages, valid, clip_eps, weights) -> Weighted:
    """Σ_valid −min(ρ'A, clip(ρ', 1−ε, 1+ε)A), ρ' = exp(log q_θ − log q_old)·w; count Σ mask."""
    zero = jnp.zeros((), logq.dtype)
    log_ratio = jnp.where(valid, logq - lax.stop_gradient(logq_old), zero)  # no NaN grads
    ratio = jnp.exp(log_ratio)
    if weights is not None:
        ratio = ratio * jnp.where(valid, lax.stop_gradient(weights), 1.0).astype(ratio.dtype)
    surrogate = ratio * advantages
    if clip_eps is not None:
        clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
        surrogate = jnp.where(surrogate <= clipped, surrogate, clipped)
    return masked_sum_count(-surrogate, valid)


def rkl_reward_loss(logq: Array, logq_old: Array, logp: Array, mask: Array, *,
                    gamma=0.0, clip_eps=None) -> Weighted:
    """On-policy reverse KL as a per-token reward (policy gradient).

    r_t = log p(y_t|·) − log q_old(y_t|·); A_t = Σ_{t' ≥ t} γ^(t'−t) r_t' (`discounted_returns`,
    stop_gradient); ρ_t = exp(log q_θ − log q_old); per token −A_t·ρ_t, or with `clip_eps`
    the PPO form −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t). At γ = 1 and q_old = q_θ, the
    expected gradient over y ~ q_θ is ∇ KL(q_θ(y|x) ‖ p(y|x)) of whole sequences (summed
    tokens; causality drops the rewards before t); γ = 0 keeps only r_t, a biased but
    lower-variance estimate.

    Args:
      logq: `[..., C]` float log q_θ of the sampled tokens, with gradient.
      logq_old: `[..., C]` the sampler's log-probs (stop_gradient'ed here).
      logp: `[..., C]` the teacher's log-probs (stop_gradient'ed here).
      mask: `[..., C]` bool, True on completion tokens (EOS included).
      gamma: static discount in [0, 1].
      clip_eps: PPO clip ε > 0, or None.

    Returns:
      `Weighted(sum over valid tokens, count = Σ mask)`, f32.
    """
    _gamma(gamma)
    eps = _clip_eps(clip_eps)
    (lq, lq_old, lp), valid = _tokens({"logq": logq, "logq_old": logq_old, "logp": logp}, mask)
    adv = discounted_returns(lp - lq_old, valid, gamma=gamma)
    return _surrogate_loss(lq, lq_old, adv, valid, eps, None)


def minillm_policy_loss(logq: Array, logq_old: Array, logp: Array, mask: Array, *,
                        gamma=1.0, clip_eps=0.2, weights: Array | None = None,
                        include_current: bool = False) -> Weighted:
    """MiniLLM's long-term (policy-gradient) term, PPO-clipped (Gu et al. 2024, §2.2).

    r_t = log p − log q_old; A_t = `length_normalized_returns(r, gamma=γ)` (the mean of
    the rewards after t by default), stop_gradient; ρ'_t = exp(log q_θ − log q_old)·w_t;
    per token −min(ρ'_t A_t, clip(ρ'_t, 1−ε, 1+ε) A_t), the clip applied to the weighted
    ratio as in LMOps `_pg_loss` (`ratio = ratio * w`, then `torch.clamp`).

    The single-step term is not here: the trainer computes S_t = KL(q_θ(·|y<t) ‖
    p(·|y<t)) through the fused kernel (`reverse_kl`, with gradient) and the step loss is
    (Σ_t w_t·S_t + this loss's sum) / N, N = completion tokens of the whole step; the
    paper weights both terms by w_t (LMOps weights only this one). Reusing one rollout
    for several updates keeps `logq_old`, `logp` and `weights` fixed while `logq` moves.

    Args:
      logq: `[..., C]` float log q_θ of the sampled tokens, with gradient.
      logq_old: `[..., C]` the student's log-probs when sampling (stop_gradient'ed).
      logp: `[..., C]` the teacher's log-probs (stop_gradient'ed).
      mask: `[..., C]` bool, True on completion tokens (EOS included).
      gamma: static discount in [0, 1].
      clip_eps: PPO clip ε > 0, or None.
      weights: optional `[..., C]` importance weights of teacher-mixed sampling
        (`mixture_importance_weights`), stop_gradient'ed; None = on-policy (1).
      include_current: advantages from t (LMOps code) instead of t + 1 (paper).

    Returns:
      `Weighted(sum over valid tokens, count = Σ mask)`, f32.
    """
    _gamma(gamma)
    eps = _clip_eps(clip_eps)
    arrays = {"logq": logq, "logq_old": logq_old, "logp": logp}
    if weights is not None:
        arrays["weights"] = weights
    (lq, lq_old, lp, *w), valid = _tokens(arrays, mask)
    adv = length_normalized_returns(lp - lq_old, valid, gamma=gamma,
                                    include_current=include_current)
    return _surrogate_loss(lq, lq_old, adv, valid, eps, w[0] if w else None)


def _log_mixture_weights(logq, logp, alpha, mask) -> tuple[Array, Array]:
    _checks.check_unit_interval(alpha, "alpha")
    (lq, lp), valid = _tokens({"logq": logq, "logp": logp}, mask)
    lq, lp = lax.stop_gradient(lq), lax.stop_gradient(lp)
    alpha = jnp.asarray(alpha, lq.dtype)
    # log q − log(α p + (1−α) q) = −log(α·p/q + (1−α)), never forming p or q
    delta = jnp.where(valid, lp - lq, 0.0)
    log_w = -jnp.logaddexp(jnp.log(alpha) + delta, jnp.log1p(-alpha))
    return jnp.where(valid, log_w, jnp.zeros((), lq.dtype)), valid


def mixture_importance_weights(logq: Array, logp: Array, alpha, mask: Array) -> Array:
    """Per-token w_t = q(y_t|·) / (α·p(y_t|·) + (1−α)·q(y_t|·)), in log space.

    Tokens sampled from the teacher-mixed policy α·p + (1−α)·q (MiniLLM) reweighted to
    the student. MiniLLM uses this single-step weight in place of the exact prefix
    product (`prefix_importance_weights`) to cut variance; it is exact for the first
    token and E_mix[w_t | y<t] = 1 at every t, but a per-token weight on its own is
    biased for later tokens (the prefix was also drawn from the mixture).

    Args:
      logq: `[..., C]` float log-probs of the sampled tokens under the sampling student.
      logp: `[..., C]` the teacher's log-probs of the same tokens.
      alpha: teacher share in [0, 1] (0: w = 1; 1: w = q/p).
      mask: `[..., C]` bool, True on completion tokens.

    Returns:
      `[..., C]` (≥ f32) weights under stop_gradient; 1 on masked positions.
    """
    log_w, _ = _log_mixture_weights(logq, logp, alpha, mask)
    return jnp.exp(log_w)


def prefix_importance_weights(logq: Array, logp: Array, alpha, mask: Array) -> Array:
    """Exact per-token weights W_t = Π_{t' ≤ t, valid} w_t' = q(y≤t|x) / mix(y≤t|x).

    The paper's w_t (before its single-step approximation): E_mix[W_t·f(y≤t)] =
    E_q[f(y≤t)] for any f of the prefix. Same arguments as `mixture_importance_weights`.

    Returns:
      `[..., C]` (≥ f32) weights under stop_gradient; the running product carries over
      masked positions. exp of a sum of logs: large for long rows, hence MiniLLM's
      per-token approximation.
    """
    log_w, _ = _log_mixture_weights(logq, logp, alpha, mask)
    return jnp.exp(jnp.cumsum(log_w, axis=-1))


def sequence_importance_weights(logq: Array, logp: Array, alpha, mask: Array) -> Array:
    """Exact sequence weight W = Π_{valid t} w_t = q(y|x) / mix(y|x), one per row.

    E_{y~mix}[W(y)·f(y)] = E_{y~q}[f(y)] for any f of the whole completion. Same
    arguments as `mixture_importance_weights`.

    Returns:
      `[...]` (≥ f32) weights under stop_gradient.
    """
    log_w, _ = _log_mixture_weights(logq, logp, alpha, mask)
    return jnp.exp(jnp.sum(log_w, axis=-1))
