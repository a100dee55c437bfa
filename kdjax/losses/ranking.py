"""Sequence log-probabilities and preference / ranking losses.

Per pair (dpo, ipo, simpo, margin_mse) or per group of K candidates (rrhf, pro,
listwise_kl); f32 inside; no reduction (see `kdjax.losses.reduce`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses import _checks
from kdjax.losses._numerics import log_softmax
from kdjax.losses.divergences import from_logprobs

Array = jax.Array


def sequence_logprobs(logits: Array, targets: Array, mask: Array | None = None, *,
                      average: bool = False) -> Array:
    """Σ_t mask_t · log softmax(logits_t)[targets_t], or its mask-weighted mean.

    Args:
      logits: `[..., L, V]` float logits (pre-shifted: `logits[..., t, :]` scores
        `targets[..., t]`).
      targets: `[..., L]` integer ids; masked positions may hold anything (e.g. -100).
      mask: `[..., L]` bool or float weights; None = all ones.
      average: divide by Σ_t mask_t (SimPO's length-normalised log-prob); 0 if empty.

    Returns:
      `[...]` f32. An out-of-range target at an unmasked position gives NaN.
    """
    _checks.check_floating(logits, "logits")
    _checks.check_integer(targets, "targets")
    _checks.check_rank_at_least(logits, 2, "logits")
    if jnp.shape(targets) != jnp.shape(logits)[:-1]:
        raise ValueError(f"targets has shape {jnp.shape(targets)}, expected the logits' leading "
                         f"shape {jnp.shape(logits)[:-1]} (logits: {jnp.shape(logits)})")
    if mask is None:
        mask = jnp.ones(jnp.shape(targets), jnp.float32)
    elif jnp.shape(mask) != jnp.shape(targets):
        raise ValueError(f"mask has shape {jnp.shape(mask)} but targets has shape "
                         f"{jnp.shape(targets)}; they must match")
    m = jnp.asarray(mask).astype(jnp.float32)
    logq = log_softmax(logits)
    v = logq.shape[-1]
    valid = (targets >= 0) & (targets < v)
    safe = jnp.where(valid, targets, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(logq, safe[..., None], axis=-1)[..., 0]
    picked = jnp.where(valid, picked, jnp.nan)
    total = jnp.sum(jnp.where(m != 0, m * jnp.where(m != 0, picked, 0.0), 0.0), axis=-1)
    if not average:
        return total
    count = jnp.sum(m, axis=-1)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def _pair_args(names: tuple[str, ...], arrays: tuple[Array, ...]) -> list[Array]:
    for name, a in zip(names, arrays):
        _checks.check_floating(a, name)
    for name, a in zip(names[1:], arrays[1:]):
        _checks.check_same_shape(arrays[0], a, names[0], name, axis_name="last")
    return [jnp.asarray(a).astype(jnp.float32) for a in arrays]


def _dpo_margin(pc, pr, rc, rr) -> Array:
    names = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")
    pc, pr, rc, rr = _pair_args(names, (pc, pr, rc, rr))
    return (pc - pr) - (rc - rr)


def dpo(policy_chosen: Array, policy_rejected: Array, reference_chosen: Array,
        reference_rejected: Array, *, beta=0.1, label_smoothing=0.0) -> Array:
    """Direct Preference Optimization loss per pair (Rafailov et al., 2023).

    Δ = (pc − pr) − (rc − rr);  −(1−ε) log σ(βΔ) − ε log σ(−βΔ)  (ε: conservative DPO).

    Args:
      policy_chosen, policy_rejected, reference_chosen, reference_rejected: `[...]`
        float sequence log-probs (`sequence_logprobs`), all the same shape.
      beta: β > 0.
      label_smoothing: ε in [0, 0.5], the assumed probability of a flipped label.

    Returns:
      `[...]` f32.
    """
    _checks.check_positive(beta, "beta")
    eps = _checks.concrete_float(label_smoothing, "label_smoothing")
    if eps is not None and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {eps} (it is the "
                         "probability that a preference label is flipped)")
    z = beta * _dpo_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * (
        jax.nn.log_sigmoid(-z))


def ipo(policy_chosen: Array, policy_rejected: Array, reference_chosen: Array,
        reference_rejected: Array, *, beta=0.1) -> Array:
    """Identity Preference Optimization loss per pair (Azar et al., 2024): (Δ − 1/(2β))².

    Δ as in `dpo`; β > 0 is the regularisation strength (τ in the paper).
    """
    _checks.check_positive(beta, "beta")
    delta = _dpo_margin(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return jnp.square(delta - 1.0 / (2.0 * beta))


def simpo(chosen_avg_logps: Array, rejected_avg_logps: Array, *, beta=2.0, gamma=0.5) -> Array:
    """SimPO loss per pair (Meng et al., 2024): −log σ(β(c_avg − r_avg) − γ).

    Args:
      chosen_avg_logps, rejected_avg_logps: `[...]` float length-averaged sequence
        log-probs (`sequence_logprobs(..., average=True)`), same shape.
      beta: β > 0; gamma: target reward margin γ (any real).
    """
    _checks.check_positive(beta, "beta")
    _checks.concrete_float(gamma, "gamma")
    c, r = _pair_args(("chosen_avg_logps", "rejected_avg_logps"),
                      (chosen_avg_logps, rejected_avg_logps))
    return -jax.nn.log_sigmoid(beta * (c - r) - gamma)


def _candidates(logps, scores, where) -> tuple[Array, Array, Array]:
    _checks.check_floating(logps, "logps")
    _checks.check_rank_at_least(logps, 1, "logps")
    _checks.check_same_shape(logps, scores, "logps", "scores", axis_name="candidates")
    if not jnp.issubdtype(jnp.result_type(scores), jnp.number):
        raise TypeError(f"scores must be a numeric array, got dtype {jnp.result_type(scores)}")
    if where is None:
        valid = jnp.ones(jnp.shape(logps), bool)
    else:
        if jnp.shape(where) != jnp.shape(logps):
            raise ValueError(f"where has shape {jnp.shape(where)} but logps has shape "
                             f"{jnp.shape(logps)}; they must match")
        valid = jnp.asarray(where).astype(bool)
    lp = jnp.where(valid, jnp.asarray(logps).astype(jnp.float32), 0.0)
    return lp, jnp.asarray(scores).astype(jnp.float32), valid


def rrhf(logps: Array, scores: Array, *, where: Array | None = None) -> Array:
    """RRHF ranking loss per group (Yuan et al., 2023).

    Σ over pairs (i, j) with score_i < score_j of max(0, logp_i − logp_j): a worse-scored
    candidate may not be more likely than a better one.

    Args:
      logps: `[..., K]` float (length-normalised) sequence log-probs of K candidates.
      scores: `[..., K]` reward scores; equal scores form no pair.
      where: optional `[..., K]` bool; False candidates are left out of every pair.

    Returns:
      `[...]` f32.
    """
    lp, s, valid = _candidates(logps, scores, where)
    pair = (s[..., :, None] < s[..., None, :]) & valid[..., :, None] & valid[..., None, :]
    gap = jax.nn.relu(lp[..., :, None] - lp[..., None, :])
    return jnp.sum(jnp.where(pair, gap, 0.0), axis=(-2, -1))


def pro(logps: Array, scores: Array, *, where: Array | None = None) -> Array:
    """Preference Ranking Optimization loss per group (Song et al., 2024): Plackett–Luce.

    π orders the valid candidates by score, descending, ties by index;
      −Σ_{k<K} (logp_πk − logsumexp_{i≥k} logp_πi)  over the valid candidates.

    Args:
      logps: `[..., K]` float sequence log-probs; scores: `[..., K]` rewards.
      where: optional `[..., K]` bool; False candidates are left out of the ranking.

    Returns:
      `[...]` f32 (0 for a group with fewer than two valid candidates).
    """
    lp, s, valid = _candidates(logps, scores, where)
    k = lp.shape[-1]
    by_score = jnp.argsort(-s, axis=-1, stable=True)
    # Valid candidates first (stable, so the score order and index ties survive).
    order = jnp.take_along_axis(
        by_score, jnp.argsort(~jnp.take_along_axis(valid, by_score, -1), axis=-1, stable=True), -1)
    lp = jnp.take_along_axis(lp, order, axis=-1)
    valid = jnp.take_along_axis(valid, order, axis=-1)
    idx = jnp.arange(k)
    suffix = (idx[None, :] >= idx[:, None]).reshape((1,) * (lp.ndim - 1) + (k, k))
    # Row k sums over valid i ≥ k; it always keeps i = k so no row is empty (finite VJP).
    diag = jnp.eye(k, dtype=bool).reshape(suffix.shape)
    within = suffix & (valid[..., None, :] | diag)
    lp_rows = jnp.broadcast_to(lp[..., None, :], within.shape)
    lse = jax.nn.logsumexp(lp_rows, axis=-1, where=within)
    return -jnp.sum(jnp.where(valid, lp - lse, 0.0), axis=-1)


def listwise_kl(student_scores: Array, teacher_scores: Array, *, temperature=1.0) -> Array:
    """ListNet-style ranking distillation: KL(softmax(t/T) ‖ softmax(s/T)) over candidates.

    Args:
      student_scores, teacher_scores: `[..., K]` float scores of the same K candidates.
      temperature: T > 0.

    Returns:
      `[...]` f32. Reference: Cao et al. (2007), ListNet.
    """
    _checks.check_floating(student_scores, "student_scores")
    _checks.check_floating(teacher_scores, "teacher_scores")
    _checks.check_rank_at_least(student_scores, 1, "student_scores")
    _checks.check_same_shape(student_scores, teacher_scores, "student_scores",
                             "teacher_scores", axis_name="candidates")
    _checks.check_temperature(temperature)
    return from_logprobs("forward_kl", log_softmax(teacher_scores, temperature),
                         log_softmax(student_scores, temperature))


def margin_mse(student_pos: Array, student_neg: Array, teacher_pos: Array,
               teacher_neg: Array) -> Array:
    """Margin-MSE ((s_pos − s_neg) − (t_pos − t_neg))² per pair (Hofstätter et al., 2020).

    All four arguments are `[...]` float relevance scores of the same shape.
    """
    names = ("student_pos", "student_neg", "teacher_pos", "teacher_neg")
    sp, sn, tp, tn = _pair_args(names, (student_pos, student_neg, teacher_pos, teacher_neg))
    return jnp.square((sp - sn) - (tp - tn))
