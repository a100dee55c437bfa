"""`fused_distill`: chunked student logits + divergence + CE with a custom VJP.

`grad_mode="forward"` (default, Liger-Kernel style): the forward pass computes the loss
and the gradients of `hidden` and `lm_head` in one sweep over the chunks, keeping only
`d_hidden [N, H]` and the f32 `dW [H, V]` as residuals; the backward pass scales them by the
incoming cotangent. The matmuls cost 6·N·H·V FLOPs in all.
`grad_mode="recompute"`: the forward pass computes only the loss (2·N·H·V) and the
backward pass sweeps again with gradients (6·N·H·V); residuals are just the inputs.
Both return the gradient of the loss `Σ w (kd_weight·D + ce_weight·CE)`; the separate D
and CE sums are returned for logging only (no gradient). `term_weights` is the f32 pair
`[kd_weight, ce_weight]`. The same custom VJP serves the sharded form (`parallel.py`):
its sweep runs in shard_map, and the VJP stays outside (no autodiff through collectives).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from kdjax.losses import _checks
from kdjax.losses.divergences import DIVERGENCES
from kdjax.losses.fused.kernel import LossSpec, MeshAxes, auto_chunk_size, sweep
from kdjax.losses.fused.teachers import NoTeacher, as_teacher
from kdjax.losses.reduce import Weighted

F32 = jnp.float32
GRAD_MODES = ("forward", "recompute")


def fused_distill(hidden, lm_head, teacher, *, targets=None, mask=None,
                  divergence="forward_kl", temperature=1.0, ce_weight=0.0, kd_weight=1.0,
                  chunk_size=None, logit_softcap=None, with_top1=False, grad_mode="forward",
                  **divergence_kwargs):
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
      teacher: dense logits `[..., V_t]` or `DenseTeacher` (V_t ≥ V: columns ≥ V are
        masked out of the teacher softmax) | `SparseTeacher` | `SampledTeacher` |
        `TeacherHead` | None (no teacher: only the hard-label CE, D = 0; needs targets).
        The teacher gets no gradient.
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
      grad_mode: "forward" (gradients computed in the forward sweep, 6·N·H·V FLOPs) or
        "recompute" (a loss-only forward sweep, the backward sweeps again: 8·N·H·V FLOPs,
        no `[N, H]`/`[H, V]` residuals); see the module docstring.
      **divergence_kwargs: the divergence's arguments (beta, alpha, mu, …).

    Returns:
      `(loss, metrics)`: loss = Weighted(Σ w·(kd_weight·D + ce_weight·CE), Σ w),
      differentiable in hidden and lm_head; metrics = {"divergence": Weighted(Σ w·D,
      Σ w), "ce": Weighted(Σ w·CE, Σ w or 0 without targets)} for logging (no gradient),
      plus "top1_agreement" when asked.
    """
    return fused_distill_over(
        None, hidden, lm_head, teacher, targets=targets, mask=mask, divergence=divergence,
        temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
        chunk_size=chunk_size, logit_softcap=logit_softcap, with_top1=with_top1,
        grad_mode=grad_mode, divergence_kwargs=divergence_kwargs)


def fused_distill_over(mesh_axes: MeshAxes | None, hidden, lm_head, teacher, *, targets, mask,
                       divergence, temperature, ce_weight, kd_weight, chunk_size,
                       logit_softcap, with_top1, grad_mode, divergence_kwargs: dict):
    """`fused_distill` on this device (`mesh_axes=None`) or over a mesh (the caller,
    `parallel.py`, has checked the mesh split)."""
    n, hdim, vocab_size = check_student(hidden, lm_head)
    # Each device sweeps its own tokens and vocabulary columns: [N/dp, H] and [H, V/tp].
    vocab_axis, n_local, v_local = None, n, vocab_size
    if mesh_axes is not None:
        vocab_axis = mesh_axes.vocab_axis
        n_local //= mesh_axes.size(mesh_axes.data_axis)
        v_local //= mesh_axes.size(vocab_axis)
    teacher = as_teacher(teacher)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {list(DIVERGENCES)}")
    teacher.check_divergence(divergence, divergence_kwargs)
    if isinstance(teacher, NoTeacher) and (targets is None or with_top1):
        raise ValueError("teacher=None computes only the hard-label CE: pass targets=... "
                         "(and no with_top1, which compares with a teacher)")
    if vocab_axis is not None and divergence == "adaptive_kl":
        raise ValueError("adaptive_kl sorts the whole vocabulary per token and has no "
                         "vocab-parallel form; use the single-device fused_distill, or a "
                         "pointwise divergence (forward_kl, jsd, …) with a sharded lm_head")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    _checks.check_temperature(temperature)
    check_chunk_size(chunk_size)
    cap = _checks.positive_float_or_none(logit_softcap, "logit_softcap")
    lead = hidden.shape[:-1]
    teacher = teacher.flatten(lead, vocab_size, sharded_vocab=vocab_axis is not None)
    if targets is not None:
        _checks.check_integer(targets, "targets")
        targets = _checks.flat_tokens(targets, lead, "targets").astype(jnp.int32)
    ce_w = _checks.concrete_float(ce_weight, "ce_weight")
    if targets is None and (ce_w is None or ce_w != 0.0):
        raise ValueError(f"ce_weight={ce_weight!r} needs targets (the hard labels, [N] int); "
                         "pass targets=... or ce_weight=0.0")
    spec = LossSpec(
        divergence=divergence, divergence_kwargs=tuple(sorted(divergence_kwargs.items())),
        vocab_size=vocab_size,
        chunk_size=chunk_size or auto_chunk_size(n_local, hdim, v_local),
        logit_softcap=cap, with_ce=targets is not None,
        ce_in_grad=targets is not None and ce_w != 0.0,
        temperature_is_one=_checks.concrete_float(temperature, "temperature") == 1.0,
        vocab_axis=vocab_axis, with_top1=bool(with_top1))
    token_weights = token_weights_of(mask, lead, n)
    term_weights = jnp.stack([jnp.asarray(kd_weight, F32), jnp.asarray(ce_weight, F32)])
    total, parts = _fused_loss(spec, grad_mode, mesh_axes, hidden.reshape(n, hdim), lm_head,
                               teacher, targets, token_weights,
                               jnp.asarray(temperature, F32), term_weights)
    count = jnp.sum(token_weights)
    parts = jax.lax.stop_gradient(parts)
    metrics = {"divergence": Weighted(parts[0], count),
               "ce": Weighted(parts[1], count if spec.with_ce else jnp.zeros((), F32))}
    if spec.with_top1:
        metrics["top1_agreement"] = Weighted(parts[2], count)
    return Weighted(total, count), metrics


# ------------------------------------------------------------------ the custom VJP


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_loss(spec: LossSpec, grad_mode: str, mesh_axes: MeshAxes | None, hidden, lm_head,
                teacher, targets, token_weights, temperature, term_weights):
    """`(total, parts)`: total = kd_weight·parts[0] + ce_weight·parts[1] (only total has
    a gradient; the CE term only when `spec.ce_in_grad`)."""
    parts, _, _ = sweep(spec, hidden, lm_head, teacher, targets, token_weights, temperature,
                        term_weights, need_grad=False, mesh_axes=mesh_axes)
    return _total(spec, parts, term_weights), parts


def _total(spec, parts, term_weights):
    total = term_weights[0] * parts[0]
    if spec.ce_in_grad:
        total = total + term_weights[1] * parts[1]
    return total


def _fwd(spec, grad_mode, mesh_axes, *args):
    need_grad = grad_mode == "forward"
    parts, d_hidden, d_lm_head = sweep(spec, *args, need_grad=need_grad, mesh_axes=mesh_axes)
    return (_total(spec, parts, args[-1]), parts), (d_hidden, d_lm_head, args)


def _bwd(spec, grad_mode, mesh_axes, res, cotangents):
    g, _ = cotangents  # the parts are for logging; see the module docstring
    d_hidden, d_lm_head, args = res
    hidden, lm_head = args[0], args[1]
    if d_hidden is None:  # grad_mode="recompute"
        _, d_hidden, d_lm_head = sweep(spec, *args, need_grad=True, mesh_axes=mesh_axes)
    g = g.astype(F32)
    d_hidden = (g * d_hidden.astype(F32)).astype(hidden.dtype)
    d_lm_head = (g * d_lm_head).astype(lm_head.dtype)
    # None = zero cotangent, never materialized (a dense teacher is [N, V]); the teacher
    # is under stop_gradient and the rest are integer or weight arguments.
    return (d_hidden, d_lm_head, *(None for _ in args[2:]))


_fused_loss.defvjp(_fwd, _bwd)


# ------------------------------------------------------------------ argument checks


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None (automatic), "
                         f"got {chunk_size!r}")


def check_student(hidden, lm_head) -> tuple[int, int, int]:
    """(N, H, V) after flattening hidden's leading axes."""
    _checks.check_floating(hidden, "hidden")
    _checks.check_floating(lm_head, "lm_head")
    _checks.check_rank_at_least(hidden, 2, "hidden")
    if jnp.ndim(lm_head) != 2:
        raise ValueError(f"lm_head must be [H, V], got shape {jnp.shape(lm_head)}")
    h, v = lm_head.shape
    if hidden.shape[-1] != h:
        raise ValueError(f"hidden has feature size {hidden.shape[-1]} (shape {hidden.shape}) "
                         f"but lm_head is [H={h}, V={v}]; pass lm_head as [H, V] "
                         "(transpose an embedding table [V, H])")
    n = 1
    for d in hidden.shape[:-1]:
        n *= d
    if n == 0:
        raise ValueError(f"hidden has no tokens (shape {hidden.shape}); skip the loss for an "
                         "empty batch instead")
    return n, h, v


def token_weights_of(mask, lead, n):
    """Token weights `[N]` f32 from a bool/float mask of hidden's leading shape."""
    if mask is None:
        return jnp.ones((n,), F32)
    return _checks.flat_tokens(jnp.asarray(mask), lead, "mask").astype(F32)
