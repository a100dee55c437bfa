"""`fused_sequence_logprobs`: per-sequence target log-probs from hidden states, on one
device or over a mesh (`mesh=`: sequences split over the batch axes, vocabulary over one).

The ranking losses (DPO, SimPO, RRHF, PRO) combine per-sequence log-probs nonlinearly,
so each token's log-prob gets its own cotangent. The custom VJP therefore recomputes
each chunk's logits in the backward pass (2·N·H·V forward + 6·N·H·V backward FLOPs)
and reuses the fused CE sweep of `_scan.run_chunks` with token weights −g_t, since
Σ_t g_t ∂ log q_t[y_t] = ∂ Σ_t (−g_t) CE_t. Over a mesh both sweeps run in shard_map on
each device's own tokens (the custom VJP stays outside it); the lm_head gradient is
psum'd over the batch axes once.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kdjax.losses import _checks
from kdjax.losses.fused import _args, _vocab
from kdjax.losses.fused._chunk import ChunkSpec
from kdjax.losses.fused._scan import auto_chunk_size, run_chunks
from kdjax.losses.fused.parallel import Axes, axis_names, axis_size, check_mesh_split

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Cfg:
    vocab_size: int
    chunk_size: int
    softcap: float | None
    mesh: Mesh | None = None
    data_axis: Axes = None
    vocab_axis: str | None = None

    def sharded(self, fn, in_specs, out_specs):
        """fn itself without a mesh; else fn in shard_map over the mesh."""
        if self.mesh is None:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)


def _chunk_logprobs(h, w_mat, targets, cfg: _Cfg):
    axis = cfg.vocab_axis
    z, _ = _vocab.softcap(jnp.dot(h, w_mat, preferred_element_type=F32), cfg.softcap)
    lse = _vocab.logsumexp(z, axis)
    picked = _vocab.take(z, targets[:, None], axis)[:, 0] - lse
    valid = (targets >= 0) & (targets < cfg.vocab_size)
    return jnp.where(valid, picked, jnp.nan)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def token_logprobs(cfg: _Cfg, h, w_mat, targets):
    """log softmax(softcap(h @ W))[target] per token, `[N, H]`, `[H, V]`, `[N]` → `[N]` f32."""
    def local(h, w_mat, targets):
        n = h.shape[0]
        c = min(cfg.chunk_size, n)

        def step(out, i):
            start = jnp.minimum(i * c, n - c)  # the last chunk overlaps: same rows, values
            sl = lambda x: lax.dynamic_slice_in_dim(x, start, c)
            lp = _chunk_logprobs(sl(h), w_mat, sl(targets), cfg)
            return lax.dynamic_update_slice_in_dim(out, lp, start, axis=0), None

        out, _ = lax.scan(step, jnp.zeros((n,), F32), jnp.arange(-(-n // c)))
        return out

    d, v = cfg.data_axis, cfg.vocab_axis
    return cfg.sharded(local, (P(d, None), P(None, v), P(d)), P(d))(
        h, w_mat.astype(h.dtype), targets)


def _fwd(cfg, h, w_mat, targets):
    return token_logprobs(cfg, h, w_mat, targets), (h, w_mat, targets)


def _bwd(cfg, res, g):
    h, w_mat, targets = res
    d, v = cfg.data_axis, cfg.vocab_axis
    spec = ChunkSpec(divergence="forward_kl", kwargs=(), form="none",
                     vocab_size=cfg.vocab_size, softcap=cfg.softcap, with_ce=True,
                     ce_in_grad=True, temperature_is_one=True, vocab_axis=v)

    def local(h, w_mat, targets, w):
        one, weights = jnp.ones((), F32), jnp.array([0.0, 1.0], F32)
        _, dh, dw = run_chunks(h, w_mat, (), (), targets, w, one, weights, spec=spec,
                               chunk_size=cfg.chunk_size, need_grad=True)
        return dh, (dw if d is None else lax.psum(dw, axis_names(d)))

    dh, dw = cfg.sharded(local, (P(d, None), P(None, v), P(d), P(d)),
                         (P(d, None), P(None, v)))(h, w_mat.astype(h.dtype), targets,
                                                   -g.astype(F32))
    return dh.astype(h.dtype), dw.astype(w_mat.dtype), None


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
    n, hdim, v = _args.check_student(hidden, lm_head)
    _checks.check_rank_at_least(hidden, 2, "hidden")
    _checks.check_integer(targets, "targets")
    _args.check_chunk_size(chunk_size)
    lead = hidden.shape[:-1]
    y = _args.flat_tokens(targets, lead, "targets")
    m = _args.weights(mask, lead, n).reshape(lead)
    dp, tp = 1, 1
    if mesh is not None:
        dp = check_mesh_split(mesh, n, hdim, v, data_axis=data_axis, vocab_axis=vocab_axis)
        tp = axis_size(mesh, vocab_axis, "vocab_axis")
    elif data_axis is not None or vocab_axis is not None:
        raise ValueError("data_axis / vocab_axis need mesh=...")
    cfg = _Cfg(vocab_size=v, chunk_size=chunk_size or auto_chunk_size(n // dp, hdim, v // tp),
               softcap=_args.check_softcap(logit_softcap), mesh=mesh, data_axis=data_axis,
               vocab_axis=vocab_axis)
    lp = token_logprobs(cfg, hidden.reshape(n, hdim), lm_head, y.astype(jnp.int32))
    lp = lp.reshape(lead)
    total = jnp.sum(jnp.where(m != 0, m * jnp.where(m != 0, lp, 0.0), 0.0), axis=-1)
    if not average:
        return total
    count = jnp.sum(m, axis=-1)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)
