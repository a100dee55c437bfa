"""Intermediate-representation losses: hidden states and attention maps.

Per token (hidden) or per query (attention); f32 inside; no reduction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.losses import _checks
from kdjax.losses._numerics import NEG_INF
from kdjax.losses.divergences import from_logprobs

Array = jax.Array


def _project(hs: Array, ht: Array, projection: Array | None) -> tuple[Array, Array]:
    _checks.check_floating(hs, "student_hidden")
    _checks.check_floating(ht, "teacher_hidden")
    _checks.check_rank_at_least(hs, 1, "student_hidden")
    _checks.check_rank_at_least(ht, 1, "teacher_hidden")
    if jnp.shape(hs)[:-1] != jnp.shape(ht)[:-1]:
        raise ValueError(f"student_hidden has shape {jnp.shape(hs)} but teacher_hidden has "
                         f"shape {jnp.shape(ht)}: the leading (token) axes must match")
    x = hs.astype(jnp.float32)
    if projection is None:
        if hs.shape[-1] != ht.shape[-1]:
            raise ValueError(
                f"student_hidden width {hs.shape[-1]} differs from teacher_hidden width "
                f"{ht.shape[-1]}: pass projection of shape [{hs.shape[-1]}, {ht.shape[-1]}]")
        return x, ht.astype(jnp.float32)
    _checks.check_floating(projection, "projection")
    if jnp.shape(projection) != (hs.shape[-1], ht.shape[-1]):
        raise ValueError(f"projection has shape {jnp.shape(projection)}, expected "
                         f"[H_s, H_t] = [{hs.shape[-1]}, {ht.shape[-1]}]")
    # HIGHEST: the kernels promise f32 arithmetic; default TPU/GPU matmul precision is not.
    x = jnp.matmul(x, projection.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return x, ht.astype(jnp.float32)


def hidden_mse(student_hidden: Array, teacher_hidden: Array,
               projection: Array | None = None) -> Array:
    """Mean squared error over features, mean_h ((hs·P)_h − ht_h)², per token.

    Args:
      student_hidden: `[..., H_s]` float student hidden states.
      teacher_hidden: `[..., H_t]` float teacher hidden states (same leading shape).
      projection: optional `[H_s, H_t]` float matrix P (learned, e.g. FitNets); required
        when H_s ≠ H_t, identity when None.

    Returns:
      `[...]` f32.

    Reference: Romero et al. (2015), FitNets; TinyBERT (Jiao et al., 2020).
    """
    x, y = _project(student_hidden, teacher_hidden, projection)
    return jnp.mean(jnp.square(x - y), axis=-1)


def _safe_norm(x: Array, eps: float) -> Array:
    """max(‖x‖, eps) with a finite gradient at x = 0."""
    sq = jnp.sum(jnp.square(x), axis=-1)
    small = sq <= eps * eps
    return jnp.where(small, eps, jnp.sqrt(jnp.where(small, 1.0, sq)))


def hidden_cosine(student_hidden: Array, teacher_hidden: Array,
                  projection: Array | None = None, *, eps: float = 1e-8) -> Array:
    """Cosine distance 1 − cos(hs·P, ht) per token, in [0, 2].

    cos(a, b) = a·b / (max(‖a‖, eps) · max(‖b‖, eps)), so a zero vector gives 1, finite.

    Args:
      student_hidden: `[..., H_s]` float; teacher_hidden: `[..., H_t]` float.
      projection: optional `[H_s, H_t]` float; required when H_s ≠ H_t.
      eps: norm floor.

    Returns:
      `[...]` f32.

    Reference: DistilBERT's cosine embedding loss (Sanh et al., 2019).
    """
    x, y = _project(student_hidden, teacher_hidden, projection)
    dot = jnp.sum(x * y, axis=-1)
    return 1.0 - dot / (_safe_norm(x, eps) * _safe_norm(y, eps))


def attention_kl(student_scores: Array, teacher_scores: Array, *,
                 key_mask: Array | None = None) -> Array:
    """KL(softmax(t) ‖ softmax(s)) over keys, averaged over heads, per query (MiniLM).

    Args:
      student_scores: `[..., heads, queries, keys]` float pre-softmax attention scores
        (-inf or a large negative value where attention is masked).
      teacher_scores: same shape (the same number of heads: average or select heads
        beforehand if the models differ).
      key_mask: optional bool, broadcastable to the scores' shape; False removes a key
        from both distributions (e.g. `[B, 1, 1, L]` padding or `[L, L]` causal).

    Returns:
      `[..., queries]` f32. A query with no live key (fully masked padding row)
      gives 0 with zero gradient.

    Reference: Wang et al. (2020), MiniLM, self-attention distribution transfer.
    """
    _checks.check_floating(student_scores, "student_scores")
    _checks.check_floating(teacher_scores, "teacher_scores")
    _checks.check_rank_at_least(student_scores, 3, "student_scores")
    _checks.check_same_shape(student_scores, teacher_scores, "student_scores",
                             "teacher_scores", axis_name="keys")
    s = student_scores.astype(jnp.float32)
    t = teacher_scores.astype(jnp.float32)
    live = (s != NEG_INF) | (t != NEG_INF)
    if key_mask is not None:
        if not jnp.issubdtype(jnp.result_type(key_mask), jnp.bool_):
            raise TypeError(f"key_mask must be a bool array, got dtype {jnp.result_type(key_mask)}")
        try:
            shape = jnp.broadcast_shapes(jnp.shape(key_mask), s.shape)
        except ValueError:
            shape = None
        if shape != s.shape:
            raise ValueError(f"key_mask of shape {jnp.shape(key_mask)} does not broadcast to "
                             f"the scores' shape {s.shape}")
        live = live & jnp.broadcast_to(key_mask, s.shape)
    row_live = jnp.any(live, axis=-1, keepdims=True)
    # Dead rows are replaced by zeros so that their log-softmax (and its VJP) is finite.
    s = jnp.where(row_live, jnp.where(live, s, NEG_INF), 0.0)
    t = jnp.where(row_live, jnp.where(live, t, NEG_INF), 0.0)
    logq = jax.nn.log_softmax(s, axis=-1)
    logp = jax.nn.log_softmax(t, axis=-1)
    per_query = jnp.where(row_live[..., 0], from_logprobs("forward_kl", logp, logq), 0.0)
    return jnp.mean(per_query, axis=-2)  # over heads: [..., heads, queries] → [..., queries]
