"""Per-chunk divergence of each teacher form, as a function of the student log-probs.

Every form returns `(values [C], g [C, V_local])` where `g = Σ_c w_c ∂values_c/∂logq` is
the gradient with respect to the student's (tempered) log-probs, holding the student
logsumexp fixed; `_chunk.py` adds the softmax part. The formulas are the catalog's:
dense and head teachers call `divergences.pointwise_terms` / `from_logprobs`; the
sparse and sampled teachers use the `sparse_forward_kl` / `sampled_forward_kl`
definitions (`sparse.*_gathered`) on the student log-probs gathered at the teacher's
ids. The bucket tail's student mass q_r is log1mexp(logsumexp(log q_ids)) (the gathered
default), not the dense kernel's exact complement sum: equal until Σ q_ids rounds to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kdjax.losses import divergences, sparse
from kdjax.losses.fused import _vocab

Array = jax.Array
F32 = jnp.float32


def teacher_logprobs(chunk, shared, temperature, spec, v_local: int) -> Array:
    """Teacher log softmax(t/T) `[C, V_local]` for the dense and head forms (no gradient)."""
    if spec.form == "dense":
        t = chunk[0][:, :v_local].astype(F32)
    else:
        t = jnp.dot(chunk[0], shared[0], preferred_element_type=F32)
        t = _vocab.softcap(t, spec.teacher_softcap)[0]
    t = lax.stop_gradient(t)
    if not spec.temperature_is_one:
        t = t / temperature
    return t - _vocab.logsumexp(t, spec.vocab_axis)[:, None]


def divergence_and_grad(logq, chunk, shared, w, temperature, spec, need_grad: bool):
    """`(values [C], g [C, V_local] | None, top [C] int32 | None)` for the teacher form in
    `spec`; `top` (the teacher's most likely id) only when `spec.with_top1`."""
    v_local = logq.shape[-1]
    axis = spec.vocab_axis
    kw = dict(spec.kwargs)
    if spec.form in ("dense", "head"):
        logp = teacher_logprobs(chunk, shared, temperature, spec, v_local)
        if spec.divergence == "adaptive_kl":  # needs the whole row; never vocab-sharded
            fn = lambda lq: divergences.from_logprobs("adaptive_kl", logp, lq, **kw)
        else:
            fn = lambda lq: jnp.sum(
                divergences.pointwise_terms(spec.divergence, logp, lq, **kw), axis=-1)
        top = _vocab.argmax(logp, axis) if spec.with_top1 else None
        return (*_value_and_grad(fn, logq, w, need_grad, axis), top)
    ids, data = chunk
    logq_ids = _vocab.take(logq, ids, axis)
    # L's gathered formulas take (z_ids, lse); passing (log q_ids, 0) is the same thing.
    zero = jnp.zeros(logq_ids.shape[:-1], F32)
    if spec.form == "sparse":
        fn = lambda lq: sparse.sparse_forward_kl_gathered(lq, zero, data, tail=spec.tail)
    else:
        fn = lambda lq: sparse.sampled_forward_kl_gathered(lq, zero, data,
                                                           num_samples=spec.num_samples)
    values, g_ids = _value_and_grad(fn, logq_ids, w, need_grad, None)
    g = None if g_ids is None else _vocab.scatter(g_ids, ids, v_local, axis)
    top = None
    if spec.with_top1:  # the largest stored log-prob / count; ties to the first slot
        pick = jnp.argmax(data, axis=-1)[:, None]
        top = jnp.take_along_axis(ids, pick, axis=-1)[:, 0]
    return values, g, top


def _value_and_grad(fn, x, w, need_grad, axis):
    if not need_grad:
        return _vocab.psum(fn(x), axis), None
    local, vjp = jax.vjp(fn, x)
    (g,) = vjp(w.astype(local.dtype))
    return _vocab.psum(local, axis), g
