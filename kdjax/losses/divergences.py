"""Dense token-level divergences between a teacher p and a student q.

Every kernel takes student and teacher logits of the same shape `[..., V]`, forms
p = softmax(teacher / T) and q = softmax(student / T) in f32, and returns the
per-token divergence `[...]` in f32. No reduction, weighting or T² scaling happens
here (see `kdjax.losses.reduce` and the objective).

Padded vocabulary: entries that are -inf in both logits contribute exactly 0 with
zero gradient. Each row must keep one finite entry, and the teacher must put no mass
where the student logit is -inf (the reverse-direction divergences need the mirror
condition), or the divergence is genuinely infinite. A NaN input propagates (it is
never masked away as if it were padding).

Most divergences are a sum over the vocabulary of a pointwise term of (log p, log q);
those terms are registered in `POINTWISE` so that the fused and vocab-parallel kernels
reuse exactly these formulas on chunks and shards. `adaptive_kl` needs a sort over the
whole vocabulary and is registered in `FROM_LOGPROBS` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kdjax.losses import _checks
from kdjax.losses._numerics import kl_terms, log_softmax, mixture_log, safe_exp

Array = jax.Array
Terms = Callable[..., Array]


# ---------------------------------------------------------------- pointwise terms
# Each takes f32 log-probs (logp, logq) `[..., V]` and returns `[..., V]` terms whose
# sum over V is the divergence. Entries -inf on both sides are handled by the caller.


def _forward_kl_terms(logp, logq):
    return kl_terms(logp, logq)


def _reverse_kl_terms(logp, logq):
    return kl_terms(logq, logp)


def _jsd_terms(logp, logq, *, beta=0.5):
    b = _checks.check_unit_interval(beta, "beta")
    if b == 0.0:
        return kl_terms(logp, logq)
    if b == 1.0:
        return kl_terms(logq, logp)
    logm = mixture_log(logp, logq, beta)
    mixed = beta * kl_terms(logp, logm) + (1.0 - beta) * kl_terms(logq, logm)
    if b is None:  # traced β (a schedule): the same ends as a static β, selected at run time
        return jnp.where(beta == 0.0, kl_terms(logp, logq),
                         jnp.where(beta == 1.0, kl_terms(logq, logp), mixed))
    return mixed


def _tvd_terms(logp, logq):
    return 0.5 * jnp.abs(safe_exp(logp) - safe_exp(logq))


def _skew_terms(log_a, log_b, alpha):
    """Pointwise terms of KL(a ‖ α·a + (1−α)·b); α = 0 is KL(a ‖ b), α = 1 is 0."""
    al = _checks.check_unit_interval(alpha, "alpha")
    if al == 0.0:
        return kl_terms(log_a, log_b)
    if al == 1.0:
        return jnp.zeros_like(log_a)
    return kl_terms(log_a, mixture_log(log_a, log_b, alpha))


def _skew_forward_kl_terms(logp, logq, *, alpha=0.1):
    return _skew_terms(logp, logq, alpha)


def _skew_reverse_kl_terms(logp, logq, *, alpha=0.1):
    return _skew_terms(logq, logp, alpha)


def _soft_cross_entropy_terms(logp, logq):
    live = jnp.isfinite(logp)
    lq = jnp.where(live, logq, 0.0)
    return jnp.where(live, -safe_exp(logp) * lq, 0.0)


def _alpha_beta_terms(logp, logq, *, alpha, beta):
    a = _checks.concrete_float(alpha, "alpha")
    b = _checks.concrete_float(beta, "beta")
    if a is None or b is None:
        raise TypeError("alpha_beta_divergence needs concrete (non-traced) alpha and beta, got "
                        f"alpha={alpha!r}, beta={beta!r}; pass Python floats")
    # p^x = exp(x log p); the limit branches follow Cichocki et al. (2011), eq. (4),
    # which ABKD (Wang et al., ICML 2025) uses.
    if a != 0.0 and b != 0.0 and a + b != 0.0:
        s = a + b
        cross = safe_exp(a * logp + b * logq)
        return -(cross - a / s * safe_exp(s * logp) - b / s * safe_exp(s * logq)) / (a * b)
    # kl_terms gives p^α (log p^α − log q^α) with 0·log 0 = 0 where p = 0 (α > 0).
    if a != 0.0 and b == 0.0:
        pa, qa = safe_exp(a * logp), safe_exp(a * logq)
        return (kl_terms(a * logp, a * logq) - pa + qa) / (a * a)
    if a == 0.0 and b != 0.0:
        pb, qb = safe_exp(b * logp), safe_exp(b * logq)
        return (kl_terms(b * logq, b * logp) - qb + pb) / (b * b)
    if a != 0.0:  # a = -b != 0
        log_ratio = a * (logq - logp)
        return (log_ratio + jnp.exp(-log_ratio) - 1.0) / (a * a)
    return 0.5 * jnp.square(logp - logq)  # a = b = 0


POINTWISE: dict[str, Terms] = {
    "forward_kl": _forward_kl_terms,
    "reverse_kl": _reverse_kl_terms,
    "jsd": _jsd_terms,
    "tvd": _tvd_terms,
    "skew_forward_kl": _skew_forward_kl_terms,
    "skew_reverse_kl": _skew_reverse_kl_terms,
    "soft_cross_entropy": _soft_cross_entropy_terms,
    "alpha_beta_divergence": _alpha_beta_terms,
}


def pointwise_terms(name: str, logp: Array, logq: Array, **kwargs) -> Array:
    """The `[..., V]` terms of divergence `name`; padded (-inf, -inf) entries give 0."""
    try:
        fn = POINTWISE[name]
    except KeyError:
        raise ValueError(
            f"divergence {name!r} has no pointwise form; choose one of {sorted(POINTWISE)}"
        ) from None
    pad = (logp == -jnp.inf) & (logq == -jnp.inf)
    terms = fn(jnp.where(pad, 0.0, logp), jnp.where(pad, 0.0, logq), **kwargs)
    return jnp.where(pad, 0.0, terms)


def _adaptive_kl_from_logprobs(logp, logq, *, mu=0.5):
    _checks.check_unit_interval(mu, "mu")
    p, q = safe_exp(logp), safe_exp(logq)
    order = jnp.argsort(-p, axis=-1, stable=True)
    p_sorted = jnp.take_along_axis(p, order, axis=-1)
    gap = jnp.abs(p_sorted - jnp.take_along_axis(q, order, axis=-1))
    # Exclusive cumsum (not cumsum − p, which rounds): the teacher mass before each token.
    cum = jnp.cumsum(p_sorted, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    in_head = mass_before < mu  # smallest prefix whose mass reaches mu
    g_head = jax.lax.stop_gradient(jnp.sum(jnp.where(in_head, gap, 0.0), axis=-1))
    g_tail = jax.lax.stop_gradient(jnp.sum(jnp.where(in_head, 0.0, gap), axis=-1))
    total = g_head + g_tail
    # p == q makes both weights 0/0; both divergences are 0 then, so any weights do.
    w_head = jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
    fkl = jnp.sum(pointwise_terms("forward_kl", logp, logq), axis=-1)
    rkl = jnp.sum(pointwise_terms("reverse_kl", logp, logq), axis=-1)
    return w_head * fkl + (1.0 - w_head) * rkl


def _check_kwargs(name: str, fn: Terms, kwargs: dict) -> None:
    """A misspelt or foreign hyper-parameter is an error that lists the valid ones."""
    params = inspect.signature(fn).parameters
    allowed = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"divergence {name!r} got unexpected argument(s) {unknown}; it takes "
                        f"{allowed or 'no hyper-parameters'}")


def from_logprobs(name: str, logp: Array, logq: Array, **kwargs) -> Array:
    """Per-token divergence `name` from f32 log-probs `[..., V]` → `[...]`."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {list(DIVERGENCES)}")
    _check_kwargs(name, POINTWISE.get(name, _adaptive_kl_from_logprobs), kwargs)
    if name == "adaptive_kl":
        return _adaptive_kl_from_logprobs(logp, logq, **kwargs)
    return jnp.sum(pointwise_terms(name, logp, logq, **kwargs), axis=-1)


DIVERGENCES = (*POINTWISE, "adaptive_kl")


def divergence(name: str, student_logits: Array, teacher_logits: Array, *,
               temperature=1.0, **kwargs) -> Array:
    """Per-token divergence `name` between dense logits; the catalog functions call this."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {list(DIVERGENCES)}")
    _checks.check_floating(student_logits, "student_logits")
    _checks.check_floating(teacher_logits, "teacher_logits")
    _checks.check_rank_at_least(student_logits, 1, "student_logits")
    _checks.check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    _checks.check_temperature(temperature)
    logq = log_softmax(student_logits, temperature)
    logp = log_softmax(teacher_logits, temperature)
    return from_logprobs(name, logp, logq, **kwargs)


# ---------------------------------------------------------------- public kernels


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature=1.0) -> Array:
    """Forward KL(p‖q) = Σ_v p_v (log p_v − log q_v) per token (Hinton et al., 2015).

    Args:
      student_logits: `[..., V]` float (f32/bf16/f16) student logits.
      teacher_logits: `[..., V]` float teacher logits, same shape.
      temperature: T > 0; p = softmax(teacher/T), q = softmax(student/T). No T² here.

    Returns:
      `[...]` f32 per-token divergence.
    """
    return divergence("forward_kl", student_logits, teacher_logits, temperature=temperature)


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature=1.0) -> Array:
    """Reverse KL(q‖p) = Σ_v q_v (log q_v − log p_v) per token (MiniLLM, Gu et al., 2024).

    Shapes and temperature as in `forward_kl`. Mode-seeking: the student concentrates on
    the teacher's modes instead of covering all of its mass.
    """
    return divergence("reverse_kl", student_logits, teacher_logits, temperature=temperature)


def jsd(student_logits: Array, teacher_logits: Array, *, beta=0.5, temperature=1.0) -> Array:
    """Generalized Jensen–Shannon divergence JSD(β) of GKD (Agarwal et al., 2024).

    M = β p + (1−β) q (built in log space); JSD(β) = β KL(p‖M) + (1−β) KL(q‖M).

    The ends are special-cased as in GKD/TRL: β = 0 returns exactly `forward_kl` and
    β = 1 exactly `reverse_kl`. Note the discontinuity: for 0 < β < 1 the mixture
    formula itself tends to 0 as β → 0 or β → 1 (M collapses onto q or p), so β = 1e-6
    gives a near-zero loss (and near-zero gradient) while β = 0 gives full forward KL.
    Choose β = 0 or 1 explicitly for the KL ends; never anneal β into them.

    Args:
      student_logits, teacher_logits: `[..., V]` float logits of the same shape.
      beta: in [0, 1]; a Python float (checked at trace time) or a traced scalar
        (the ends are then selected at run time, with the same values).
      temperature: T > 0.

    Returns:
      `[...]` f32.
    """
    return divergence("jsd", student_logits, teacher_logits, temperature=temperature, beta=beta)


def tvd(student_logits: Array, teacher_logits: Array, *, temperature=1.0) -> Array:
    """Total variation distance ½ Σ_v |p_v − q_v| per token, in [0, 1]."""
    return divergence("tvd", student_logits, teacher_logits, temperature=temperature)


def skew_forward_kl(student_logits: Array, teacher_logits: Array, *, alpha=0.1,
                    temperature=1.0) -> Array:
    """Skew KL(p ‖ α p + (1−α) q) per token (DistiLLM SKL, Ko et al., 2024).

    α ∈ [0, 1] (static): α = 0 is `forward_kl`, α = 1 is identically 0.
    """
    return divergence("skew_forward_kl", student_logits, teacher_logits,
                      temperature=temperature, alpha=alpha)


def skew_reverse_kl(student_logits: Array, teacher_logits: Array, *, alpha=0.1,
                    temperature=1.0) -> Array:
    """Skew reverse KL(q ‖ α q + (1−α) p) per token (DistiLLM SRKL, Ko et al., 2024).

    α ∈ [0, 1] (static): α = 0 is `reverse_kl`, α = 1 is identically 0.
    """
    return divergence("skew_reverse_kl", student_logits, teacher_logits,
                      temperature=temperature, alpha=alpha)


def adaptive_kl(student_logits: Array, teacher_logits: Array, *, mu=0.5,
                temperature=1.0) -> Array:
    """Adaptive KL (AKL, Wu et al., 2024): (g_h·FKL + g_t·RKL) / (g_h + g_t).

    The head is the smallest prefix of the teacher-sorted vocabulary (descending p, ties
    by index) whose mass reaches μ (docs/losses.md, "Dense divergences"); g_h and g_t are
    Σ|p − q| over head and tail. The weights are under stop_gradient. When p = q both
    gaps are 0 and the value is 0. Note: the authors' code (`get_ratio` in LLM_KD_AKL)
    puts the token whose cumulative mass crosses μ in the tail (head = {cumsum ≤ μ} ∪
    {top-1}); here it is in the head, so the two differ by that one token's gap.

    Args:
      student_logits, teacher_logits: `[..., V]` float logits of the same shape.
      mu: head mass threshold in [0, 1].
      temperature: T > 0.
    """
    return divergence("adaptive_kl", student_logits, teacher_logits,
                      temperature=temperature, mu=mu)


def alpha_beta_divergence(student_logits: Array, teacher_logits: Array, *, alpha, beta,
                          temperature=1.0) -> Array:
    """AB-divergence of ABKD (Wang et al., ICML 2025; Cichocki et al., 2011).

    For α, β, α+β ≠ 0:
      D = −1/(αβ) Σ_v (p^α q^β − α/(α+β) p^(α+β) − β/(α+β) q^(α+β)).
    The limit cases are the continuous extensions of Cichocki et al. (2011), eq. (4):
      β = 0:       1/α² Σ (p^α log(p^α/q^α) − p^α + q^α)    (α=1: forward KL)
      α = 0:       1/β² Σ (q^β log(q^β/p^β) − q^β + p^β)    (β=1: reverse KL)
      α = −β ≠ 0:  1/α² Σ (log(q^α/p^α) + (q^α/p^α)^(−1) − 1)
      α = β = 0:   ½ Σ (log p − log q)²
    α and β must be concrete Python floats.
    """
    return divergence("alpha_beta_divergence", student_logits, teacher_logits,
                      temperature=temperature, alpha=alpha, beta=beta)


def soft_cross_entropy(student_logits: Array, teacher_logits: Array, *,
                       temperature=1.0) -> Array:
    """Soft-target cross-entropy −Σ_v p_v log q_v = H(p) + KL(p‖q) per token."""
    return divergence("soft_cross_entropy", student_logits, teacher_logits,
                      temperature=temperature)


def cross_entropy(student_logits: Array, targets: Array) -> Array:
    """Hard-label cross-entropy −log softmax(student)[target] per token.

    Args:
      student_logits: `[..., V]` float logits.
      targets: `[...]` integer ids in [0, V). Targets are pre-shifted by the data
        pipeline; mask ignored positions with the reducer, do not use -100.

    Returns:
      `[...]` f32. An out-of-range target yields NaN (never a silently clamped value).
    """
    _checks.check_floating(student_logits, "student_logits")
    _checks.check_integer(targets, "targets")
    _checks.check_rank_at_least(student_logits, 1, "student_logits")
    if jnp.shape(targets) != jnp.shape(student_logits)[:-1]:
        raise ValueError(
            f"targets has shape {jnp.shape(targets)}, expected the logits' leading shape "
            f"{jnp.shape(student_logits)[:-1]} (student_logits: {jnp.shape(student_logits)})"
        )
    logq = log_softmax(student_logits)
    v = logq.shape[-1]
    picked = jnp.take_along_axis(logq, jnp.clip(targets, 0, v - 1)[..., None], axis=-1)[..., 0]
    valid = (targets >= 0) & (targets < v)
    return jnp.where(valid, -picked, jnp.nan)
