"""One chunk of the fused loss: logits, divergence, CE and their gradients.

For a chunk of C tokens: raw = h_c @ W (f32 accumulation), z = softcap(raw),
logq = z/T − logsumexp(z/T). With g = Σ_c w_c ∂D_c/∂logq from `_teacher_terms`, the
softmax backward gives ∂/∂z = (g − q · Σ_v g_v) / T, scaled by kd_weight; the hard-label
CE adds ce_weight · w · (softmax(z) − onehot(target)). Then dh_c = dz Wᵀ and dW += h_cᵀ dz.

With 16-bit inputs the matmuls take dz in 16 bits. When both terms are in the gradient,
each term is rounded on its own and the two are stacked into one matmul of 2C rows:
rounding their sum would lose the smaller term whenever it is below the larger one's
rounding step (at α = 0.999 the KD gradient is 1/1000 of the CE gradient, under bf16's
2⁻⁹ relative step). This doubles the backward matmul FLOPs of mixed-α 16-bit runs only.
Every vocabulary reduction goes through `_vocab`, so the same code runs on a
vocab-sharded chunk inside shard_map.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from kdjax import linalg
from kdjax.losses.fused import _teacher_terms, _vocab

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
    """Static description of a fused problem (hashable: a jit/custom_vjp static arg)."""

    divergence: str
    kwargs: tuple[tuple[str, Any], ...]
    form: str  # "dense" | "head" | "sparse" | "sampled" | "none" (CE only)
    vocab_size: int  # the student's global V
    tail: str | None = None
    num_samples: int | None = None
    softcap: float | None = None
    teacher_softcap: float | None = None
    with_ce: bool = False  # targets given: CE is computed (as a metric at least)
    ce_in_grad: bool = False  # ce_weight may be nonzero: CE enters the gradient
    temperature_is_one: bool = False
    vocab_axis: str | None = None
    with_top1: bool = False  # also count tokens whose student argmax is the teacher's

    @property
    def num_parts(self) -> int:
        """Loss parts per sweep: [Σ w·D, Σ w·CE] (+ Σ w·[top-1 agrees])."""
        return 3 if self.with_top1 else 2


def chunk_loss(h, w_mat, chunk, shared, targets, w, temperature, weights, spec: ChunkSpec,
               need_grad: bool):
    """Loss parts of one chunk and, if `need_grad`, the gradients of
    Σ w (kd_weight·D + ce_weight·CE).

    Args:
      h: `[C, H]` student hidden chunk (f32/bf16). w_mat: `[H, V_local]` lm_head (shard).
      chunk / shared: the teacher's per-token arrays (chunk rows) and shared arrays.
      targets: `[C]` int or None. w: `[C]` f32 token weights (0 = masked or padding).
      temperature: f32 scalar. weights: f32 `[2]`, (kd_weight, ce_weight).

    Returns:
      `(parts f32 [spec.num_parts], dh [C, H] f32 | None, dW [H, V_local] f32 | None)`,
      parts = [Σ w·D, Σ w·CE] and, with `spec.with_top1`, Σ w·[argmax z = teacher top-1].
    """
    axis = spec.vocab_axis
    raw = jnp.dot(h, w_mat, preferred_element_type=F32)
    z, dcap = _vocab.softcap(raw, spec.softcap)
    zt = z if spec.temperature_is_one else z / temperature
    lse = _vocab.logsumexp(zt, axis)
    logq = zt - lse[:, None]
    top = None
    if spec.form == "none":  # CE only (teacher=None, fused_sequence_logprobs)
        div, g = jnp.zeros(w.shape, F32), None
    else:
        div, g, top = _teacher_terms.divergence_and_grad(logq, chunk, shared, w, temperature,
                                                        spec, need_grad)
    live = w != 0
    parts = [jnp.sum(jnp.where(live, w * div, 0.0))]
    if spec.with_ce:
        lse1 = lse if spec.temperature_is_one else _vocab.logsumexp(z, axis)
        z_target = _vocab.take(z, targets[:, None], axis)[:, 0]
        valid = (targets >= 0) & (targets < spec.vocab_size)
        ce = jnp.where(valid, lse1 - z_target, jnp.nan)  # out-of-range target: loud NaN
        parts.append(jnp.sum(jnp.where(live, w * ce, 0.0)))
    else:
        parts.append(jnp.zeros((), F32))
    if spec.with_top1:
        agree = (_vocab.argmax(z, axis) == top).astype(F32)
        parts.append(jnp.sum(jnp.where(live, w * agree, 0.0)))
    if not need_grad:
        return jnp.stack(parts), None, None
    terms = []  # the gradient of each term with respect to z, [C, V_local] f32
    if g is not None:
        s = _vocab.psum(jnp.sum(g, axis=-1), axis)
        dz_kd = g - jnp.exp(logq) * s[:, None]
        scale = weights[0] if spec.temperature_is_one else weights[0] / temperature
        terms.append(scale * dz_kd)
    if spec.with_ce and spec.ce_in_grad:
        soft = jnp.exp(z - lse1[:, None]) - _vocab.one_hot(targets, z.shape[-1], axis)
        terms.append((weights[1] * w)[:, None] * soft)
    if not terms:
        terms.append(jnp.zeros_like(z))
    if dcap is not None:
        terms = [t * dcap for t in terms]
    if len(terms) == 2 and jnp.dtype(h.dtype).itemsize < 4:  # round each term on its own
        dz, hs = jnp.concatenate(terms).astype(h.dtype), jnp.concatenate([h, h])
        dh2 = jnp.dot(dz, w_mat.T, preferred_element_type=F32)
        dh = _vocab.psum(dh2[:h.shape[0]] + dh2[h.shape[0]:], axis)
        dw = linalg.weight_grad(hs, dz, preferred_element_type=F32)
        return jnp.stack(parts), dh, dw
    dz = sum(terms[1:], terms[0]).astype(h.dtype)  # 16-bit inputs: 16-bit matmuls, f32 acc.
    dh = _vocab.psum(jnp.dot(dz, w_mat.T, preferred_element_type=F32), axis)
    dw = linalg.weight_grad(h, dz, preferred_element_type=F32)  # fast form on XLA:CPU
    return jnp.stack(parts), dh, dw
