"""`fused_distill`: chunked student logits + divergence + CE with a custom VJP."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kdjax.losses import _checks
from kdjax.losses.fused import _args
from kdjax.losses.fused._core import Plan, fused_core
from kdjax.losses.fused._scan import auto_chunk_size, run_chunks
from kdjax.losses.fused.teachers import teacher_form
from kdjax.losses.reduce import Weighted

F32 = jnp.float32
GRAD_MODES = ("forward", "recompute")


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """Sweep all chunks on the current device (or inside a caller's shard_map)."""

    def __call__(self, plan, h, w_mat, chunk, shared, targets, w, temperature, weights,
                 need_grad):
        return run_chunks(h, w_mat, chunk, shared, targets, w, temperature, weights,
                          spec=plan.spec, chunk_size=plan.chunk_size, need_grad=need_grad)


def fused_distill(hidden, lm_head, teacher, *, targets=None, mask=None,
                  divergence="forward_kl", temperature=1.0, ce_weight=0.0, kd_weight=1.0,
                  chunk_size=None, logit_softcap=None, with_top1=False, **divergence_kwargs):
    """Distillation loss from the student's hidden states, without `[N, V]` logits.

    Computes, chunk by chunk over tokens, z = softcap(hidden @ lm_head), the divergence
    D(p‖q) with q = softmax(z/T) and p the teacher at temperature T, and the hard-label
    CE = −log softmax(z)[target] (no temperature), with a custom VJP that produces the
    gradients of `hidden` and `lm_head` in the same sweep (Liger-Kernel's fused linear
    cross-entropy, Hsu et al., 2024). At most one chunk's `[C, V]` arrays are alive; the
    lm_head gradient accumulates in f32.

    Args:
      hidden: `[..., H]` f32/bf16 student final hidden states (leading axes = tokens, N).
      lm_head: `[H, V]` student output projection (an embedding table is its transpose).
        The matmuls run in hidden's dtype; the lm_head gradient accumulates in f32 and is
        returned in lm_head's dtype, so pass the f32 master weights to get it unrounded.
      teacher: dense logits `[..., V_t]` (V_t ≥ V: columns ≥ V are masked out of the
        teacher softmax) | `SparseTeacher` | `SampledTeacher` | `TeacherHead` | None (no
        teacher: only the hard-label CE, D = 0; needs targets). The teacher gets no
        gradient.
      targets: `[...]` int hard labels in [0, V), or None. Needed when ce_weight ≠ 0.
      mask: `[...]` bool or float token weights, or None (all tokens count).
      divergence: a name from `kdjax.losses.DIVERGENCES`. Sparse and sampled teachers
        support "forward_kl" (sparse_forward_kl / sampled_forward_kl) only.
      temperature: T > 0 for both distributions. No T² factor (the objective applies it;
        for T²·D + w·CE pass kd_weight=T², ce_weight=w).
      ce_weight: weight of the hard-label CE in the loss.
      kd_weight: weight of the divergence in the loss. Give both weights here rather than
        scaling the loss afterwards: with 16-bit inputs each term's gradient is rounded on
        its own, so a small weight on one term does not lose it in the other's rounding.
      chunk_size: tokens per chunk (a positive int), or None for `auto_chunk_size(N,H,V)`.
      logit_softcap: optional cap c > 0: z = c·tanh(logits/c) (Gemma 2).
      with_top1: also return metrics["top1_agreement"] = Weighted(Σ w·[argmax z = the
        teacher's most likely id], Σ w) (for a top-k/sampled teacher: the id with the
        largest stored log-prob/count). Needs a teacher.
      **divergence_kwargs: the divergence's arguments (beta, alpha, mu, …).

    Returns:
      `(loss, metrics)`: loss = Weighted(Σ w·(kd_weight·D + ce_weight·CE), Σ w),
      differentiable in
      hidden and lm_head; metrics = {"divergence": Weighted(Σ w·D, Σ w), "ce":
      Weighted(Σ w·CE, Σ w or 0 without targets)} for logging (no gradient), plus
      "top1_agreement" when asked.
    """
    return fused_distill_impl(hidden, lm_head, teacher, targets=targets, mask=mask,
                              divergence=divergence, temperature=temperature,
                              ce_weight=ce_weight, kd_weight=kd_weight, chunk_size=chunk_size,
                              logit_softcap=logit_softcap, with_top1=with_top1,
                              **divergence_kwargs)


def prepare(hidden, lm_head, teacher, *, targets, mask, divergence, temperature, ce_weight,
            kd_weight, chunk_size, logit_softcap, with_top1, divergence_kwargs, vocab_axis=None,
            vocab=None):
    """Validated, flattened operands and the static ChunkSpec (shared with `parallel`)."""
    n, hdim, v_local = _args.check_student(hidden, lm_head)
    vocab = v_local if vocab is None else vocab
    lead = hidden.shape[:-1]
    form = teacher_form(teacher)
    _args.check_divergence(divergence, form, divergence_kwargs)
    if form == "none" and (targets is None or with_top1):
        raise ValueError("teacher=None computes only the hard-label CE: pass targets=... "
                         "(and no with_top1, which compares with a teacher)")
    if vocab_axis is not None and divergence == "adaptive_kl":
        raise ValueError("adaptive_kl sorts the whole vocabulary per token and has no "
                         "vocab-parallel form; use the single-device fused_distill, or a "
                         "pointwise divergence (forward_kl, jsd, …) with a sharded lm_head")
    _checks.check_temperature(temperature)
    _args.check_chunk_size(chunk_size)
    cap = _args.check_softcap(logit_softcap)
    chunk, shared, extra = _args.teacher_arrays(teacher, form, lead, vocab,
                                                slice_dense=vocab_axis is not None)
    if targets is not None:
        _checks.check_integer(targets, "targets")
        targets = _args.flat_tokens(targets, lead, "targets").astype(jnp.int32)
    spec = _args.make_spec(divergence=divergence, kwargs=divergence_kwargs, form=form,
                           vocab=vocab, extra=extra, softcap=cap, targets=targets,
                           ce_weight=ce_weight, temperature=temperature, vocab_axis=vocab_axis,
                           with_top1=bool(with_top1))
    c = chunk_size or auto_chunk_size(n, hdim, vocab)
    ops = (hidden.reshape(n, hdim), lm_head, chunk, shared, targets,
           _args.weights(mask, lead, n), jnp.asarray(temperature, F32),
           jnp.stack([jnp.asarray(kd_weight, F32), jnp.asarray(ce_weight, F32)]))
    return spec, c, ops


def fused_distill_impl(hidden, lm_head, teacher, *, grad_mode="forward", run=None,
                       vocab_axis=None, **kwargs):
    """`fused_distill` with the sweep strategy exposed (benchmarks, vocab-parallel form)."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    kw = dict(targets=None, mask=None, divergence="forward_kl", temperature=1.0,
              ce_weight=0.0, kd_weight=1.0, chunk_size=None, logit_softcap=None,
              with_top1=False)
    kw.update({k: kwargs.pop(k) for k in list(kw) if k in kwargs})
    spec, c, ops = prepare(hidden, lm_head, teacher, divergence_kwargs=kwargs,
                           vocab_axis=vocab_axis, **kw)
    plan = Plan(spec=spec, chunk_size=c, grad_mode=grad_mode, run=run or LocalRun())
    total, parts = fused_core(plan, *ops)
    return results(total, parts, ops[5], spec)


def results(total, parts, w, spec):
    count = jnp.sum(w)
    parts = jax.lax.stop_gradient(parts)
    ce_count = count if spec.with_ce else jnp.zeros((), F32)
    metrics = {"divergence": Weighted(parts[0], count), "ce": Weighted(parts[1], ce_count)}
    if spec.with_top1:
        metrics["top1_agreement"] = Weighted(parts[2], count)
    return Weighted(total, count), metrics
