"""Teacher logits → the compact signal a teacher store keeps (pure JAX, jit-friendly).

Three modes (see DESIGN.md, "Teacher-signal store"):

- `sampled`: random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling:
  Accelerating Knowledge Distillation in LLMs"). N tokens are drawn i.i.d. per position
  from p = softmax(logits / T) and kept as the distinct ids with their counts in U slots.
  E[counts / N] = p exactly, so the sampled forward KL has an unbiased gradient. If a
  position draws more than U distinct ids, the U largest counts are kept (ties: smaller
  id) and the dropped draws are reported, never silently lost.
- `topk`: the K most likely ids of log p (`lax.top_k`) with their log-probabilities and
  the tail mass 1 − Σ_topk p (computed from the tail itself, not by cancellation).
- `dense`: the logits as they are (debugging and small vocabularies).

Randomness is a pure function of (seed, row): `row_keys(seed, rows)` gives one key per
token-store row, so any shard can be recomputed bit-identically by any process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kdjax.storage.dtypes import id_dtype, smallest_uint

Array = jax.Array

MODES = ("sampled", "topk", "dense")
__all__ = ["MODES", "compact", "count_dtype", "dense_signal", "draw", "id_dtype", "row_keys",
           "sampled_signal", "teacher_logprobs", "topk_signal"]


def count_dtype(num_samples: int) -> np.dtype:
    """Dtype for sample counts 0 … N."""
    return smallest_uint(num_samples)


def row_keys(seed: int, rows: Array) -> Array:
    """One PRNG key per token-store row: fold_in(key(seed), row). rows: [B] int → keys [B]."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.uint32))


def teacher_logprobs(logits: Array, temperature: float = 1.0) -> Array:
    """log softmax(logits / T) in f32. logits: [..., V] any float dtype → [..., V] f32."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def draw(logprobs: Array, key: Array, num_samples: int, *, block: int = 64) -> Array:
    """N i.i.d. draws per position from p = exp(logprobs), by two-level inverse CDF.

    The vocabulary is cut into blocks of `block` ids; a draw u ~ U(0, Σp) first finds its
    block on the CDF of block sums, then its id on the CDF inside that one block. That is
    O(V + N·(log(V/block) + block)) per position, against O(N·V) for Gumbel-max and a
    full length-V cumsum (3x slower on CPU) for one-level inverse CDF. Zero-probability
    ids are never drawn (`side="right"`: flat stretches of a CDF are skipped).

    Args:
      logprobs: [..., V] f32 normalized log-probabilities.
      key: one PRNG key; the uniforms have shape [..., N].
      num_samples: N.
    Returns:
      [..., N] int32 ids.
    """
    v, lead = logprobs.shape[-1], logprobs.shape[:-1]
    nb = -(-v // block)
    pad = [(0, 0)] * len(lead) + [(0, nb * block - v)]
    blocks = jnp.pad(jnp.exp(logprobs), pad).reshape(lead + (nb, block))
    block_mass = blocks.sum(-1)
    block_cdf = jnp.cumsum(block_mass, -1)  # [..., nb]
    # Pinned so stored draws do not change with the global jax_threefry_partitionable flag
    # (a resumed store must match); per-row keys under vmap shard over rows either way,
    # and the non-partitionable lowering compiles ~2.5x faster on CPU.
    with jax.threefry_partitionable(False):
        u = jax.random.uniform(key, lead + (num_samples,), jnp.float32)
    u = u * block_cdf[..., -1:]  # the f32 total is 1 only up to rounding
    blk = jax.vmap(lambda c, q: jnp.searchsorted(c, q, side="right"))(
        block_cdf.reshape(-1, nb), u.reshape(-1, num_samples)).reshape(u.shape)
    blk = jnp.minimum(blk, nb - 1)
    before = jnp.take_along_axis(block_cdf - block_mass, blk, -1)
    rest = jnp.maximum(u - before, 0.0)  # position of the draw inside its block
    inner = jnp.cumsum(jnp.take_along_axis(blocks, blk[..., None], axis=-2), -1)
    j = jnp.minimum(jnp.sum(inner <= rest[..., None], -1), block - 1)
    return jnp.minimum(blk * block + j, v - 1).astype(jnp.int32)


def compact(draws: Array, num_slots: int) -> tuple[Array, Array, Array]:
    """Distinct ids and their counts, the U largest counts kept.

    Args:
      draws: [..., N] int ids.
      num_slots: U, the number of (id, count) slots kept per position.
    Returns:
      ids [..., U] int32 (0 in empty slots), counts [..., U] int32 (0 in empty slots,
      largest first, ties by smaller id), distinct [...] int32 (distinct ids drawn,
      before truncation to U).
    """
    n = draws.shape[-1]
    s = jnp.sort(draws, axis=-1)
    first = jnp.concatenate([jnp.ones_like(s[..., :1], bool), s[..., 1:] != s[..., :-1]], -1)
    idx = lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
    # a run's length = index of the next run start - own index (reverse cummin)
    starts = jnp.where(first, idx, n)
    after = jnp.concatenate([starts[..., 1:], jnp.full_like(starts[..., :1], n)], -1)
    run = jnp.where(first, lax.cummin(after, axis=s.ndim - 1, reverse=True) - idx, 0)
    k = min(num_slots, n)
    counts, pos = lax.top_k(run, k)  # stable: equal counts keep the smaller id first
    ids = jnp.where(counts > 0, jnp.take_along_axis(s, pos, axis=-1), 0)
    if num_slots > n:
        pad = [(0, 0)] * (s.ndim - 1) + [(0, num_slots - n)]
        ids, counts = jnp.pad(ids, pad), jnp.pad(counts, pad)
    return ids.astype(jnp.int32), counts.astype(jnp.int32), first.sum(-1, dtype=jnp.int32)


def sampled_signal(logits: Array, keys: Array, *, num_samples: int, num_slots: int,
                   temperature: float = 1.0) -> dict[str, Array]:
    """Random-sampling KD signal for a batch of rows.

    Args:
      logits: [B, L, V] teacher logits.
      keys: [B] PRNG keys, one per row (`row_keys`).
    Returns:
      ids [B, L, U] (smallest uint for V), counts [B, L, U] (smallest uint for N),
      distinct [B, L] int32, dropped [B, L] int32 (draws lost to the U limit),
      mass [B, L] f32 (teacher mass on the kept ids).
    """
    v = logits.shape[-1]
    logp = teacher_logprobs(logits, temperature)
    draws = jax.vmap(lambda lp, k: draw(lp, k, num_samples))(logp, keys)
    ids, counts, distinct = compact(draws, num_slots)
    kept = jnp.where(counts > 0, jnp.exp(jnp.take_along_axis(logp, ids, axis=-1)), 0.0)
    return dict(ids=ids.astype(id_dtype(v)), counts=counts.astype(count_dtype(num_samples)),
                distinct=distinct, dropped=num_samples - counts.sum(-1, dtype=jnp.int32),
                mass=kept.sum(-1))


def topk_signal(logits: Array, *, k: int, temperature: float = 1.0) -> dict[str, Array]:
    """Top-k signal: ids and log-probabilities of the K most likely tokens and the tail.

    Args:
      logits: [..., V] teacher logits; k <= V.
    Returns:
      ids [..., K] (smallest uint for V), logprobs [..., K] f32 (log softmax(logits/T),
      descending), tail [...] f32 = Σ_{v ∉ top-k} p_v (a logsumexp over the tail, so a
      tail of 1e-9 is exact, not 1 − Σp rounding), mass [...] f32 = 1 − tail.
    """
    v = logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"top-k needs 1 <= k <= vocab size, got k={k} with V={v}")
    logp = teacher_logprobs(logits, temperature)
    # The barrier keeps XLA from fusing the top-k values into the tail reduction below;
    # fused, XLA:CPU drops its fast TopK kernel for a full comparator sort (~25x slower).
    vals, ids = lax.optimization_barrier(lax.top_k(logp, k))
    # Σ p below the k-th value, plus the ids tied with it that top_k left out (they equal
    # it exactly). Summing the tail itself keeps a 1e-9 tail exact (1 − Σ_topk p would
    # round to 0) and is one fused pass, unlike a scatter that masks the top-k ids.
    kth = vals[..., -1:]
    below = jnp.sum(jnp.where(logp < kth, jnp.exp(logp), 0.0), -1)
    tied_out = jnp.sum(logp >= kth, -1) - k
    tail = below + tied_out * jnp.exp(kth[..., 0])
    return dict(ids=ids.astype(id_dtype(v)), logprobs=vals, tail=tail, mass=1.0 - tail)


def dense_signal(logits: Array, dtype=jnp.float32) -> dict[str, Array]:
    """Dense signal: the raw logits [..., V] cast to `dtype` (temperature applies at loss time)."""
    return dict(logits=logits.astype(dtype))
