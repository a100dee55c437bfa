"""Forward KL against a teacher known only at some token ids (top-k or sampled).

The student side is always the full-vocabulary softmax q = softmax(student_logits) at
T = 1: stored teacher log-probs are at the store's temperature and are used as-is, so
temper the student logits yourself if the store was written at T ≠ 1.

Two layers:
  * `sparse_forward_kl` / `sampled_forward_kl` take dense student logits `[..., V]`;
  * `sparse_forward_kl_gathered` / `sampled_forward_kl_gathered` take the student's
    logits gathered at the ids plus its full-vocabulary logsumexp. They hold the
    formulas, so a chunked/fused kernel (kdjax.losses.fused) that never materialises
    `[..., V]` computes exactly the same values; `jax.vjp` of them with respect to
    (gathered logits, lse) gives the pieces of the logits gradient:
    dL/dz_v = Σ_k [ids_k = v]·dL/dz_ids_k + softmax(z)_v·dL/dlse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses import _checks
from kdjax.losses._numerics import NEG_INF, kl_terms, log1mexp

Array = jax.Array
TAILS = ("renormalize", "bucket")


def _check_ids_shapes(student_logits, ids, values, values_name: str) -> None:
    _checks.check_floating(student_logits, "student_logits")
    _checks.check_integer(ids, "ids")
    _checks.check_rank_at_least(student_logits, 1, "student_logits")
    _checks.check_rank_at_least(ids, 1, "ids")
    if jnp.shape(ids) != jnp.shape(values):
        raise ValueError(f"ids has shape {jnp.shape(ids)} but {values_name} has shape "
                         f"{jnp.shape(values)}; they must match slot for slot")
    if jnp.shape(ids)[:-1] != jnp.shape(student_logits)[:-1]:
        raise ValueError(
            f"ids has shape {jnp.shape(ids)} but student_logits has shape "
            f"{jnp.shape(student_logits)}: the leading (token) axes must match")


def gather_ids(student_logits: Array, ids: Array) -> Array:
    """f32 `student_logits[..., ids]` `[..., K]`; an id outside [0, V) gives NaN (no wrap)."""
    z = student_logits.astype(jnp.float32)
    v = z.shape[-1]
    valid = (ids >= 0) & (ids < v)
    picked = jnp.take_along_axis(z, jnp.where(valid, ids, 0).astype(jnp.int32), axis=-1)
    return jnp.where(valid, picked, jnp.nan)


def _complement_logsumexp(z: Array, ids: Array) -> Array:
    """log Σ_{v ∉ ids} exp(z_v), exact (no 1 − Σ cancellation); -inf if nothing is left."""
    in_ids = jnp.put_along_axis(jnp.zeros(z.shape, bool), ids.astype(jnp.int32), True,
                                axis=-1, inplace=False)
    rest = ~in_ids & (z != NEG_INF)
    any_rest = jnp.any(rest, axis=-1, keepdims=True)
    # An empty complement would make logsumexp's backward 0/0: sum over the (finite)
    # full row instead and overwrite the result.
    lse = jax.nn.logsumexp(z, axis=-1, where=jnp.where(any_rest, rest, z != NEG_INF))
    return jnp.where(any_rest[..., 0], lse, NEG_INF)


def sparse_forward_kl_gathered(student_logits_at_ids: Array, student_lse: Array,
                               logprobs: Array, *, tail: str = "renormalize",
                               log_q_rest: Array | None = None) -> Array:
    """`sparse_forward_kl` from gathered student logits (the fused kernels' entry point).

    Args:
      student_logits_at_ids: `[..., K]` f32 student logits z at the teacher's ids.
      student_lse: `[...]` f32 logsumexp of the student logits over the full vocabulary,
        so log q_ids = z_ids − lse.
      logprobs: `[..., K]` teacher log-probs at the ids, used as-is (-inf: no mass).
      tail: "renormalize" or "bucket" (see `sparse_forward_kl`).
      log_q_rest: optional `[...]` f32 log of the student's mass outside the ids. By
        default it is log(1 − Σ q_ids) = log1mexp(logsumexp(log q_ids)), accurate until
        Σ q_ids rounds to 1 in f32 (then the tail is treated as empty).

    Returns:
      `[...]` f32.
    """
    _checks.check_choice(tail, "tail", TAILS)
    logq = student_logits_at_ids.astype(jnp.float32) - student_lse.astype(jnp.float32)[..., None]
    logp = logprobs.astype(jnp.float32)
    if tail == "renormalize":
        logp_norm = logp - jax.nn.logsumexp(logp, axis=-1, keepdims=True)
        return jnp.sum(kl_terms(logp_norm, logq), axis=-1)
    known = jnp.sum(kl_terms(logp, logq), axis=-1)
    log_p_rest = log1mexp(jax.nn.logsumexp(logp, axis=-1))
    if log_q_rest is None:
        log_q_rest = log1mexp(jax.nn.logsumexp(logq, axis=-1))
    log_q_rest = log_q_rest.astype(jnp.float32)
    # A tail the student gives exactly no mass is empty (ids cover every finite logit);
    # the teacher's p_r there is rounding of its stored log-probs, not mass.
    log_p_rest = jnp.where(log_q_rest == NEG_INF, NEG_INF, log_p_rest)
    return known + kl_terms(log_p_rest, log_q_rest)


def sparse_forward_kl(student_logits: Array, ids: Array, logprobs: Array, *,
                      tail: str = "renormalize") -> Array:
    """Forward KL to a teacher known at `ids` only (top-k distillation).

    With p the stored teacher probabilities at the K ids and q = softmax(student_logits):
      renormalize: p̃ = p / Σ_ids p;  Σ_ids p̃ (log p̃ − log q_ids).
      bucket:      Σ_ids p (log p − log q_ids) + p_r (log p_r − log q_r),
                   p_r = 1 − Σ_ids p,  q_r = 1 − Σ_ids q (the rest of the vocabulary
                   as one bucket; q_r is computed exactly as the complement's mass).
    q is never renormalized over the ids. With K = V (all ids) both equal `forward_kl`.

    Args:
      student_logits: `[..., V]` float student logits (T = 1; pre-divide to temper).
      ids: `[..., K]` integer token ids in [0, V), distinct within a row (an id out of
        range gives NaN).
      logprobs: `[..., K]` float teacher log-probs at `ids`, as stored; -inf = no mass.
      tail: "renormalize" (default) or "bucket".

    Returns:
      `[...]` f32 per-token divergence.

    Reference: the top-k setting analysed by Anshumann et al. (2025), who show that
    top-k teachers bias the student (hence `sampled_forward_kl`); the bucket tail keeps
    the teacher's leftover mass as one "rest of the vocabulary" class.
    """
    _check_ids_shapes(student_logits, ids, logprobs, "logprobs")
    _checks.check_floating(logprobs, "logprobs")
    _checks.check_choice(tail, "tail", TAILS)
    z = student_logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    rest = _complement_logsumexp(z, ids) - lse if tail == "bucket" else None
    return sparse_forward_kl_gathered(gather_ids(z, ids), lse, logprobs, tail=tail,
                                      log_q_rest=rest)


def sampled_forward_kl_gathered(student_logits_at_ids: Array, student_lse: Array,
                                counts: Array, *, num_samples: int) -> Array:
    """`sampled_forward_kl` from gathered student logits (the fused kernels' entry point).

    Same value, and the same unbiasedness condition (counts summing to N, i.e. no draw
    dropped), as `sampled_forward_kl`: t̂ = counts / N is never renormalized.

    Args:
      student_logits_at_ids: `[..., U]` f32 student logits at the sampled ids.
      student_lse: `[...]` f32 full-vocabulary logsumexp of the student logits.
      counts: `[..., U]` integer draw counts (0: empty slot, ignored whatever its id).
      num_samples: N, the number of draws per token (static int > 0).

    Returns:
      `[...]` f32.
    """
    n = _checks.check_positive_int(num_samples, "num_samples")
    logq = student_logits_at_ids.astype(jnp.float32) - student_lse.astype(jnp.float32)[..., None]
    c = counts.astype(jnp.float32)
    log_t = jnp.where(c > 0, jnp.log(jnp.where(c > 0, c, 1.0)) - jnp.log(float(n)), NEG_INF)
    return jnp.sum(kl_terms(log_t, logq), axis=-1)


def sampled_forward_kl(student_logits: Array, ids: Array, counts: Array, *,
                       num_samples: int) -> Array:
    """Forward KL to the empirical teacher of N sampled tokens (random-sampling KD).

    t̂ = counts / N;  Σ_slots t̂ (log t̂ − log q_ids), slots with count 0 ignored, where
    q = softmax(student_logits).

    Unbiased gradient when no draw can be dropped, so the counts are all N draws (a
    store written with num_slots = U >= N, the default U = N, guarantees it): then
    counts ~ Multinomial(N, p) for the store's teacher p, so E[t̂] = p.
    The value is −H(t̂) − Σ_v t̂_v log q_v; the entropy term has no student gradient and
    the cross-entropy term is linear in t̂, so E[∇ loss] = −Σ_v p_v ∇ log q_v, the
    gradient of forward KL(p‖q) (in the logits: q − t̂, mean q − p). The value is not
    unbiased: E[loss] = KL(p‖q) + H(p) − E[H(t̂)], a student-independent offset ≥ 0.

    Biased when draws were dropped (U < N and more than U distinct ids drawn: the U
    largest counts kept): Σ t̂ = 1 − d with d = dropped / N, the logit gradient is
    (1 − d)·q − t̂, E[t̂_v] ≤ p_v with the shortfall on rare ids, so the student is pulled
    towards the head (and, among equal counts, the smaller ids; kdjax.teacher.signal);
    the expected gradient error has L1 norm ≤ 2·E[d], and a teacher
    store reports the mean of d as `stats.dropped_sample_rate` in its manifest.

    Args:
      student_logits: `[..., V]` float student logits (T = 1).
      ids: `[..., U]` integer ids of the distinct sampled tokens (any id in an empty slot).
      counts: `[..., U]` integer draws per id, summing to `num_samples` per token.
      num_samples: N (static Python int > 0).

    Returns:
      `[...]` f32 per-token value.

    Reference: Anshumann et al. (2025), "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs".
    """
    _check_ids_shapes(student_logits, ids, counts, "counts")
    _checks.check_integer(counts, "counts")
    _checks.check_positive_int(num_samples, "num_samples")
    z = student_logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    return sampled_forward_kl_gathered(gather_ids(z, ids), lse, counts, num_samples=num_samples)
