"""`fused_sequence_logprobs`: per-sequence target log-probs from hidden states, on one
device or over a mesh (`mesh=`: sequences split over the batch axes, vocabulary over one).

The ranking losses (DPO, SimPO, RRHF, PRO) combine per-sequence log-probs nonlinearly,
so each token's log-prob gets its own cotangent. The custom VJP therefore recomputes
each chunk's logits in the backward pass (2·N·H·V forward + 6·N·H·V backward FLOPs)
and reuses the fused CE sweep of `kernel.sweep` with token weights −g_t, since
Σ_t g_t ∂ log q_t[y_t] = ∂ Σ_t (−g_t) CE_t. Over a mesh both sweeps run in shard_map on
each device's own tokens (the custom VJP stays outside it); the lm_head gradient is
psum'd over the batch axes once.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kdjax.losses import _checks
from kdjax.losses.fused import vocab
from kdjax.losses.fused.distill import check_chunk_size, check_student, token_weights_of
from kdjax.losses.fused.kernel import (
    Axes,
    ChunkRows,
    LossSpec,
    MeshAxes,
    auto_chunk_size,
    sweep,
)
from kdjax.losses.fused.parallel import axis_size, check_mesh_split
from kdjax.losses.fused.teachers import NoTeacher

F32 = jnp.float32


def _chunk_logprobs(spec: LossSpec, hidden, lm_head, targets):
    axis = spec.vocab_axis
    raw = jnp.dot(hidden, lm_head, preferred_element_type=F32)
    z, _ = vocab.softcap(raw, spec.logit_softcap)
    lse = vocab.logsumexp(z, axis)
    picked = vocab.take(z, targets[:, None], axis)[:, 0] - lse
    valid = (targets >= 0) & (targets < spec.vocab_size)
    return jnp.where(valid, picked, jnp.nan)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def token_logprobs(spec: LossSpec, mesh_axes: MeshAxes | None, hidden, lm_head, targets):
    """log softmax(softcap(h @ W))[target] per token, `[N, H]`, `[H, V]`, `[N]` → `[N]` f32.
    `spec` is the CE-only sweep's (`spec.vocab_axis` = `mesh_axes.vocab_axis`)."""
    def local(hidden, lm_head, targets):
        n = hidden.shape[0]
        chunks = ChunkRows(n, min(spec.chunk_size, n))
        hidden_rows = chunks.carry(hidden)

        def step(out, i):
            lp = _chunk_logprobs(spec, chunks.take(hidden_rows, i), lm_head,
                                 chunks.take(targets, i))
            # The last chunk overlaps the one before: the same rows get the same values.
            return lax.dynamic_update_slice_in_dim(out, lp, chunks.start(i), axis=0), None

        out, _ = lax.scan(step, jnp.zeros((n,), F32), jnp.arange(chunks.num_chunks))
        return out

    args = (hidden, lm_head.astype(hidden.dtype), targets)
    if mesh_axes is None:
        return local(*args)
    d, v = mesh_axes.data_axis, mesh_axes.vocab_axis
    return mesh_axes.shard_map(local, (P(d, None), P(None, v), P(d)), P(d))(*args)


def _fwd(spec, mesh_axes, hidden, lm_head, targets):
    return token_logprobs(spec, mesh_axes, hidden, lm_head, targets), (hidden, lm_head, targets)


def _bwd(spec, mesh_axes, res, g):
    hidden, lm_head, targets = res
    one, term_weights = jnp.ones((), F32), jnp.array([0.0, 1.0], F32)
    _, dh, dw = sweep(spec, hidden, lm_head, NoTeacher(), targets, -g.astype(F32), one,
                      term_weights, need_grad=True, mesh_axes=mesh_axes)
    return dh.astype(hidden.dtype), dw.astype(lm_head.dtype), None


token_logprobs.defvjp(_fwd, _bwd)


def fused_sequence_logprobs(hidden, lm_head, targets, mask=None, *, average=False,
                            chunk_size=None, logit_softcap=None, mesh: Mesh | None = None,
                            data_axis: Axes = None, vocab_axis: str | None = None):
    """`sequence_logprobs(hidden @ lm_head, targets, mask)` without the `[..., L, V]` logits.

    Σ_t mask_t · log softmax(z_t)[targets_t] (÷ Σ_t mask_t if `average`), z = hidden @
    lm_head (soft-capped if asked), computed chunk by chunk over tokens; the gradients
    of hidden and lm_head (f32-accumulated) recompute each chunk's logits.

    Args:
      hidden: `[..., L, H]` f32/bf16 final hidden states (pre-shifted like the logits).
      lm_head: `[H, V]`.
      targets: `[..., L]` int ids; masked positions may hold anything.
      mask: `[..., L]` bool/float weights or None (all ones).
      average: divide by Σ mask (SimPO's length-normalised log-prob; 0 if empty).
      chunk_size: tokens per chunk, or None (auto from N, H, V).
      logit_softcap: optional cap c: z = c·tanh(logits/c).
      mesh, data_axis, vocab_axis: with a mesh, the tokens (hidden's flattened leading
        axes, sequences whole) are split over `data_axis` and the vocabulary over
        `vocab_axis` (or None); each device sweeps only its own tokens. Equal values.

    Returns:
      `[...]` f32; an out-of-range target at an unmasked position gives NaN.
    """
    n, hdim, v = check_student(hidden, lm_head)
    _checks.check_rank_at_least(hidden, 2, "hidden")
    _checks.check_integer(targets, "targets")
    check_chunk_size(chunk_size)
    lead = hidden.shape[:-1]
    y = _checks.flat_tokens(targets, lead, "targets")
    m = token_weights_of(mask, lead, n).reshape(lead)
    dp, tp, mesh_axes = 1, 1, None
    if mesh is not None:
        dp = check_mesh_split(mesh, n, hdim, v, data_axis=data_axis, vocab_axis=vocab_axis)
        tp = axis_size(mesh, vocab_axis, "vocab_axis")
        mesh_axes = MeshAxes(mesh=mesh, data_axis=data_axis, vocab_axis=vocab_axis)
    elif data_axis is not None or vocab_axis is not None:
        raise ValueError("data_axis / vocab_axis need mesh=...")
    spec = LossSpec(  # the CE-only sweep of the backward pass, whose chunk also serves here
        divergence="forward_kl", divergence_kwargs=(), vocab_size=v,
        chunk_size=chunk_size or auto_chunk_size(n // dp, hdim, v // tp),
        logit_softcap=_checks.positive_float_or_none(logit_softcap, "logit_softcap"),
        with_ce=True, ce_in_grad=True, temperature_is_one=True, vocab_axis=vocab_axis)
    lp = token_logprobs(spec, mesh_axes, hidden.reshape(n, hdim), lm_head, y.astype(jnp.int32))
    lp = lp.reshape(lead)
    total = jnp.sum(jnp.where(m != 0, m * jnp.where(m != 0, lp, 0.0), 0.0), axis=-1)
    if not average:
        return total
    count = jnp.sum(m, axis=-1)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
