"""Grouped-query causal self-attention with RoPE, optional q/k RMSNorm (Qwen3), packed-row
masking and a functional KV cache for the sampler."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import platform
from kdjax.sharding import constrain

from . import fused_attention
from .layers import Dense, RMSNorm, apply_rope, rows

MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so fully masked (padding) rows stay finite


def attention_mask(q_segments: jax.Array, k_segments: jax.Array, q_slots: jax.Array,
                   k_slots: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Boolean `[B, Lq, Lk]`: key k is visible to query q when both are in the same
    non-padding segment (`segment_ids` 0 = padding), k is not after q (slot order), and,
    with a sliding window w, `q_slot - k_slot < w` (transformers' sliding_window_overlay).

    Args:
      q_segments: `[B, Lq]` int; k_segments: `[B, Lk]` int; q_slots: `[Lq]` int;
      k_slots: `[Lk]` int (row indices, or KV-cache slots when decoding).
    """
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (k_segments[:, None, :] != 0)
    delta = q_slots[:, None] - k_slots[None, :]
    visible = delta >= 0
    if sliding_window is not None:
        visible &= delta < sliding_window
    return same & visible[None]


class Attention(nnx.Module):
    """`o(softmax(q kᵀ/√d + mask) v)` with `num_heads // num_kv_heads` query heads per
    key/value head (Ainslie et al. 2023); query head h uses kv head `h // groups`, as
    transformers' `repeat_kv` does."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        b = cfg.attention_bias
        self.q = Dense("blh,hnd->blnd", (h, n, d), ("embed", "heads", "head_dim"),
                       bias_shape=(n, d) if b else None, bias_axes=("heads", "head_dim"), **kw)
        self.k = Dense("blh,hnd->blnd", (h, k, d), ("embed", "kv_heads", "head_dim"),
                       bias_shape=(k, d) if b else None, bias_axes=("kv_heads", "head_dim"),
                       **kw)
        self.v = Dense("blh,hnd->blnd", (h, k, d), ("embed", "kv_heads", "head_dim"),
                       bias_shape=(k, d) if b else None, bias_axes=("kv_heads", "head_dim"),
                       **kw)
        self.o = Dense("blnd,ndh->blh", (n, d, h), ("heads", "head_dim", "embed"),
                       bias_shape=(h,) if cfg.attention_out_bias else None,
                       bias_axes=("embed",), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        else:
            self.q_norm = self.k_norm = None
        self.num_kv_heads, self.head_dim, self.dtype = k, d, cfg.dtype
        self.sliding_window = cfg.sliding_window

    def __call__(self, x, cos, sin, mask, *, segment_ids=None, impl="xla", cache=None,
                 cache_index=None, return_scores=False, head_major_cache=False):
        """Args:
          x: `[B, L, H]`; cos, sin: `[B, L, head_dim]` f32; mask: `[B, L, L]` bool for
            the "xla" kernel, else unused (may be None); with a cache, see `cache`.
          segment_ids: `[B, L]` int (0 = padding), what the fused kernels mask by.
          impl: "xla" | "cudnn" | "splash", from `fused_attention.resolve`; scores and a
            cache always take "xla".
          cache: None or `{"k", "v"}: [B, S, kv_heads, head_dim]`, the keys/values of
            earlier tokens; then `mask` is `(cache_mask [B, L, S], self_mask [B, L, L])`
            (which cache slots, and which of the new tokens, each query sees) and the
            cache is only read: the new tokens' keys/values are returned for the caller to
            write at `cache_index` (one in-place write of all layers, rather than a new
            copy of the cache per layer and step).
          head_major_cache: the cache is one layer's `[B, kv_heads, S, head_dim]`: the
            layout the attention matmuls read without a transposed copy of it per step.
            The new keys/values are then written into it here, and the updated cache is
            returned in place of `new`.
        Returns:
          `(out [B, L, H], scores [B, heads, L, Lk] f32 | None, new {"k", "v"}: [B, L,
          kv_heads, head_dim] | None)` (head-major cache: the updated cache instead of
          `new`). Scores are the masked pre-softmax logits `q·k/√d` (masked keys = float32
          min; with a cache, over the cache slots with the new tokens written at
          `cache_index`).
        """
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:
            new = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
            cache_mask, self_mask = mask
            if head_major_cache:  # write, then read the updated cache: in place
                return self._attend_head_major_cache(q, new, cache, cache_mask, self_mask,
                                                     cache_index, return_scores)
            if not return_scores:
                out = attend_cached(q, cache["k"], cache["v"], new["k"], new["v"], cache_mask,
                                    self_mask, self.num_kv_heads, self.dtype)
                return self.o(out), None, new
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], new["k"], start)
            v = jax.lax.dynamic_update_slice(cache["v"], new["v"], start)
            mask = jax.lax.dynamic_update_slice(cache_mask, self_mask, (0, 0, cache_index))
            out, scores = attend(q, k, v, mask, self.num_kv_heads, self.dtype, True)
            return self.o(out), scores, new
        if return_scores or impl == "xla":
            # without a cache the mask is causal in row order, so later key blocks can be
            # skipped (the XLA kernel on CPU; accelerators run their fused kernels)
            blocks = (causal_query_blocks(x.shape[1])
                      if not return_scores and platform.causal_query_blocks_enabled() else 1)
            out, scores = attend(q, k, v, mask, self.num_kv_heads, self.dtype,
                                 return_scores, query_blocks=blocks)
        else:
            kernel = {"cudnn": fused_attention.cudnn_attention,
                      "splash": fused_attention.splash_attention}[impl]
            out = kernel(q, k.astype(q.dtype), v.astype(q.dtype), segment_ids,
                         self.sliding_window)
            out, scores = constrain(out, ("batch", "length", "heads", "head_dim")), None
        return self.o(out), scores, None

    def _attend_head_major_cache(self, q, new, cache, cache_mask, self_mask, index,
                                 return_scores):
        """Attention over a per-layer head-major cache `{"k", "v"}: [B, kv, S, d]`: the
        new keys/values are written at slot `index` first and the updated cache is read,
        so the write happens in place (a loop-carried cache that is read and then written
        in one step gets copied by XLA). Returns `(out, scores | None, updated cache)`."""
        start = (0, 0, index, 0)
        layer = {name: jax.lax.dynamic_update_slice(cache[name],
                                                    new[name].transpose(0, 2, 1, 3), start)
                 for name in ("k", "v")}
        mask = jax.lax.dynamic_update_slice(cache_mask, self_mask, (0, 0, index))
        out, logits = _attend_kv_major(q, layer["k"], layer["v"], mask, self.num_kv_heads,
                                       self.dtype)
        b, lq, n, _ = q.shape
        scores = logits.reshape(b, n, lq, -1) if return_scores else None
        return self.o(out), scores, layer


def causal_query_blocks(length: int, block: int = 128, max_blocks: int = 8) -> int:
    """How many query blocks `attend` should use for a causal self-attention of `length`
    rows: blocks of ≥ `block` rows (smaller matmuls lose more than they skip), at most
    `max_blocks` (each block is its own unrolled matmul), dividing `length`."""
    n = min(max_blocks, length // block)
    while n > 1 and length % n:
        n -= 1
    return max(n, 1)


def attend(q, k, v, mask, num_kv_heads: int, dtype, return_scores: bool = False,
           query_blocks: int = 1):
    """`softmax(q kᵀ/√d + mask) v` for grouped query heads: the XLA reference kernel.

    Args:
      q: `[B, Lq, heads, d]`; k, v: `[B, Lk, kv_heads, d]`; mask: `[B, Lq, Lk]` bool.
      query_blocks: > 1 only for causal self-attention (Lq = Lk, key j > query i always
        masked): query block i attends to keys `[0, (i+1)·Lq/n)` only, skipping the
        fully masked upper blocks (up to ~half the attention FLOPs). Same values,
        except on fully masked (padding) query rows, whose output is arbitrary anyway.
    Returns:
      `(out [B, Lq, heads, d] in dtype, scores [B, heads, Lq, Lk] f32 | None)`.
    """
    if query_blocks > 1:
        lq = q.shape[1]
        if return_scores or lq != k.shape[1] or lq % query_blocks:
            raise ValueError(f"query_blocks={query_blocks} needs causal self-attention with "
                             f"Lq = Lk divisible by it and no scores (Lq={lq}, "
                             f"Lk={k.shape[1]}, return_scores={return_scores})")
        bq = lq // query_blocks
        outs = [attend(q[:, i * bq:(i + 1) * bq], k[:, :(i + 1) * bq], v[:, :(i + 1) * bq],
                       mask[:, i * bq:(i + 1) * bq, :(i + 1) * bq], num_kv_heads, dtype)[0]
                for i in range(query_blocks)]
        out = jnp.concatenate(outs, axis=1)
        return constrain(out, ("batch", "length", "heads", "head_dim")), None
    form = _attend_head_major if platform.attention_head_major() else _attend_grouped
    out, logits = form(q, k, v, mask, num_kv_heads, dtype)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    b, lq, n, _ = q.shape
    scores = logits.reshape(b, n, lq, k.shape[1]) if return_scores else None
    return out, scores


def attend_cached(q, k_cache, v_cache, k_new, v_new, cache_mask, self_mask,
                  num_kv_heads: int, dtype):
    """`softmax(q [k_cache; k_new]ᵀ/√d + mask) [v_cache; v_new]` without concatenating:
    the softmax is taken jointly over the two score blocks, so the cache is only read
    (by the two matmuls) and never copied.

    Args:
      q: `[B, L, heads, d]`; k_cache, v_cache: `[B, S, kv_heads, d]`; k_new, v_new:
        `[B, L, kv_heads, d]`; cache_mask: `[B, L, S]` bool; self_mask: `[B, L, L]` bool.
    Returns:
      `out [B, L, heads, d]` in dtype.
    """
    b, lq, n, d = q.shape
    kv = num_kv_heads
    qg = q.reshape(b, lq, kv, n // kv, d)
    scale = 1.0 / jnp.sqrt(jnp.float32(d))
    def scores(k, mask):
        s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(q.dtype),
                       preferred_element_type=jnp.float32) * scale
        return jnp.where(mask[:, None, None], s, MASKED)

    s_cache, s_new = scores(k_cache, cache_mask), scores(k_new, self_mask)
    top = jnp.maximum(s_cache.max(axis=-1, keepdims=True), s_new.max(axis=-1, keepdims=True))
    p_cache, p_new = jnp.exp(s_cache - top), jnp.exp(s_new - top)
    norm = p_cache.sum(axis=-1, keepdims=True) + p_new.sum(axis=-1, keepdims=True)
    out = (jnp.einsum("bkgqs,bskd->bqkgd", (p_cache / norm).astype(dtype), v_cache.astype(dtype))
           + jnp.einsum("bkgqs,bskd->bqkgd", (p_new / norm).astype(dtype), v_new.astype(dtype)))
    return constrain(out.reshape(b, lq, n, d), ("batch", "length", "heads", "head_dim"))


def _attend_grouped(q, k, v, mask, kv: int, dtype):
    """The plain form: heads stay their own axes (`[B, L, kv, g, d]`), so a head axis split
    over `tensor` stays split. Returns `(out [B, Lq, heads, d], logits [B, kv, g, Lq, Lk]
    f32)`."""
    b, lq, n, d = q.shape
    qg = q.reshape(b, lq, kv, n // kv, d)  # query head h uses kv head h // g
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    logits = jnp.where(mask[:, None, None], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(dtype))
    return out.reshape(b, lq, n, d), logits


def _attend_head_major(q, k, v, mask, kv: int, dtype):
    """The CPU-fast form (`platform.attention_head_major`): each kv head's queries folded
    into `[B, kv, g·Lq, d]` rows, one plain batched matmul, softmax on a 2-D row view.
    Same values and return shapes as `_attend_grouped`."""
    b, lq, n, d = q.shape
    lk, g = k.shape[1], n // kv
    qg = q.reshape(b, lq, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * lq, d)
    logits = jnp.einsum("bkqd,bskd->bkqs", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    logits = jnp.where(mask[:, None, None], logits.reshape(b, kv, g, lq, lk), MASKED)
    probs = jax.nn.softmax(rows(logits), axis=-1).astype(dtype).reshape(b, kv, g * lq, lk)
    out = jnp.einsum("bkqs,bskd->bkqd", probs, v.astype(dtype)).reshape(b, kv, g, lq, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, n, d), logits


def _attend_kv_major(q, k, v, mask, kv: int, dtype):
    """Attention over a head-major cache, k, v `[B, kv, S, d]`: each kv head's queries
    folded into `[B, kv, g·Lq, d]` rows, so both matmuls are plain batched matmuls over
    (B, kv head) that read the cache as it lies; the softmax keeps the head axes (a
    2-D row view would merge the tensor-split head axis). Returns `(out [B, Lq, heads,
    d], logits [B, kv, g, Lq, S] f32)`."""
    b, lq, n, d = q.shape
    s, g = k.shape[2], n // kv
    qg = q.reshape(b, lq, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * lq, d)
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    logits = jnp.where(mask[:, None, None], logits.reshape(b, kv, g, lq, s), MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype).reshape(b, kv, g * lq, s)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(dtype)).reshape(b, kv, g, lq, d)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, lq, n, d)
    return constrain(out, ("batch", "length", "heads", "head_dim")), logits
