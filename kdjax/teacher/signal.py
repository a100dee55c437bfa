"""Teacher logits → the compact signal a teacher store keeps (pure JAX, jit-friendly).

Three modes (docs/stores.md, "Teacher store"):

- `sampled`: random-sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling:
  Accelerating Knowledge Distillation in LLMs"). N tokens are drawn i.i.d. per position
  from p = softmax(logits / T) and kept as the distinct ids with their counts in U slots;
  the student learns from t̂ = counts / N (`kdjax.losses.sampled_forward_kl`).

  Unbiased when no draw can be dropped, which U >= N guarantees (N draws hold at
  most N distinct ids; `PrecomputeConfig.num_slots` defaults to U = N). Proof: the
  counts are then the full draw, counts ~ Multinomial(N, p), so E[t̂_v] = p_v for every
  id v. The loss Σ_v t̂_v (log t̂_v − log q_v) = −H(t̂) − Σ_v t̂_v log q_v: the entropy
  term has no student gradient and the cross-entropy term is linear in t̂, so for a
  student q_θ that does not depend on the draw, E[∇_θ loss] = −Σ_v p_v ∇_θ log q_v =
  ∇_θ KL(p‖q_θ) (in the student logits z: ∇_z loss = q − t̂, mean q − p). The loss
  value itself is not unbiased: E[loss] = KL(p‖q) + H(p) − E[H(t̂)] ≥ KL(p‖q), an
  offset that does not depend on the student. (p is the f32 teacher distribution; the
  draws follow it up to the f32 rounding of the sampling CDF, see `draw`.)

  Biased when U < N and a position draws more than U distinct ids: the U largest counts
  are kept (ties: smaller id) and the other draws dropped, so t̂_v = 0 on the dropped
  ids and Σ_v t̂_v = 1 − d with d = dropped / N. Then E[t̂_v] ≤ p_v for every id, short
  on the rare ids that get dropped, and the expected loss of a free student is minimal
  at q* = E[t̂] / E[Σ t̂], which gives the head (ids rarely dropped) more mass than p
  (about p_v / (1 − E[d])): the bias is towards the head, and among equal counts towards
  smaller token ids (a flat teacher, most ids drawn once: with V = 50, N = 16, U = 4,
  q* gives ids 0–4 2.3x their mass; tests/teacher/test_sampled_unbiased.py). The
  expected logit gradient is off by (p − E[t̂]) − E[d]·q, of L1 norm ≤ 2·E[d]. The
  dropped draws are never lost silently: `dropped` per position, `overflow_rate` and
  `dropped_sample_rate` (the mean of d) in the store's manifest, and `kdjax precompute`
  warns when any draw was dropped.
- `topk`: the K most likely ids of log p (`lax.top_k`) with their log-probabilities and
  the tail mass 1 − Σ_topk p (computed from the tail itself, not by cancellation).
- `dense`: the logits as they are (debugging and small vocabularies).

Randomness is a pure function of (seed, row): `row_keys(seed, rows)` gives one key per
token-store row, so any shard can be recomputed bit-identically by any process.

`chunked_signal` computes the logits from the final hidden states and the LM head a few
positions at a time and the signal of each chunk right away, so a `[chunk, V]` block of
logits stays in cache and the `[B, L, V]` f32 logits never go to memory: on a CPU the
O(V) passes over the logits (max, exp, block sums, top-k) are memory-bound, and chunked
they cost a few percent of the teacher forward instead of ~30% (benchmarks/precompute.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kdjax.catalog import STORE_MODES as MODES
from kdjax.storage.dtypes import id_dtype, smallest_uint

Array = jax.Array

# Bumped whenever the same (seed, row, teacher) gives different stored values (2: draws
# from exp(x − max) block sums, block-wise top-k; 3: f32 logits of 16-bit teachers). Part
# of the store's plan, so a resumed store never mixes shards of two versions (the writer
# refuses a different plan).
SIGNAL_VERSION = 3
__all__ = ["MODES", "SIGNAL_VERSION", "chunked_signal", "compact", "count_dtype",
           "dense_signal", "draw", "id_dtype", "row_keys", "row_uniforms", "sampled_signal",
           "teacher_logprobs", "topk_signal"]

BLOCK = 64  # vocabulary block of the two-level sampling CDF and of the top-k candidate search


def count_dtype(num_samples: int) -> np.dtype:
    """Dtype for sample counts 0 … N."""
    return smallest_uint(num_samples)


def row_keys(seed: int, rows: Array) -> Array:
    """One PRNG key per token-store row: fold_in(key(seed), row). rows: [B] int → keys [B]."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(rows, jnp.uint32))


def teacher_logprobs(logits: Array, temperature: float = 1.0) -> Array:
    """log softmax(logits / T) in f32. logits: [..., V] any float dtype → [..., V] f32."""
    return jax.nn.log_softmax(_scaled(logits, temperature), axis=-1)


def _scaled(logits: Array, temperature: float) -> Array:
    """logits / T in f32."""
    _check_temperature(temperature)
    return logits.astype(jnp.float32) / temperature


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def row_uniforms(keys: Array, length: int, num_samples: int) -> Array:
    """The uniforms behind the draws of each row: keys [B] → [B, length, N] f32 in [0, 1).

    Pinned to the non-partitionable threefry so stored draws do not change with the global
    jax_threefry_partitionable flag (a resumed store must match); per-row keys under vmap
    shard over rows either way, and this lowering compiles faster on CPU.
    """
    with jax.threefry_partitionable(False):
        return jax.vmap(lambda k: jax.random.uniform(k, (length, num_samples), jnp.float32))(
            keys)


def _blocks(x: Array, block: int) -> Array:
    """[..., V] → [..., ceil(V / block), block], the tail padded with -inf (probability 0)."""
    v, lead = x.shape[-1], x.shape[:-1]
    nb = -(-v // block)
    if nb * block != v:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, nb * block - v)], constant_values=-jnp.inf)
    return x.reshape(lead + (nb, block))


def draw(logprobs: Array, key: Array, num_samples: int, *, block: int = BLOCK) -> Array:
    """N i.i.d. draws per position from p = softmax(logprobs), by two-level inverse CDF.

    The vocabulary is cut into blocks of `block` ids; a draw u ~ U(0, Σp) first finds its
    block on the CDF of block sums, then its id on the CDF inside that one block. That is
    O(V + N·(log(V/block) + block)) per position, against O(N·V) for Gumbel-max and a
    full length-V cumsum (3x slower on CPU) for one-level inverse CDF. Zero-probability
    ids are never drawn (`side="right"`: flat stretches of a CDF are skipped).

    Args:
      logprobs: [..., V] f32 log-probabilities, normalized or not (any shift per position).
      key: one PRNG key; the uniforms have shape [..., N] (as `row_uniforms` for [L, V]).
      num_samples: N.
    Returns:
      [..., N] int32 ids.
    """
    with jax.threefry_partitionable(False):
        u = jax.random.uniform(key, logprobs.shape[:-1] + (num_samples,), jnp.float32)
    return _draw(logprobs, u, block)[0]


def _draw(x: Array, u: Array, block: int) -> tuple[Array, Array, Array]:
    """Draws from softmax(x) [..., V] at uniforms u [..., N]: (ids [..., N] int32, the max
    m [..., 1] and Σ exp(x − m) [..., 1]). One pass over V (exp and block sums, fused)
    after the max; the drawn blocks' exp is recomputed from x, not kept."""
    v, n = x.shape[-1], u.shape[-1]
    m = jnp.max(x, -1, keepdims=True)
    xb = _blocks(x, block)
    nb = xb.shape[-2]
    block_mass = jnp.sum(jnp.exp(xb - m[..., None]), -1)
    block_cdf = jnp.cumsum(block_mass, -1)  # [..., nb]
    total = block_cdf[..., -1:]
    u = u * total
    blk = jax.vmap(lambda c, q: jnp.searchsorted(c, q, side="right"))(
        block_cdf.reshape(-1, nb), u.reshape(-1, n)).reshape(u.shape)
    blk = jnp.minimum(blk, nb - 1)
    before = jnp.take_along_axis(block_cdf - block_mass, blk, -1)
    rest = jnp.maximum(u - before, 0.0)  # position of the draw inside its block
    inner = jnp.cumsum(jnp.exp(jnp.take_along_axis(xb, blk[..., None], axis=-2)
                               - m[..., None]), -1)
    j = jnp.minimum(jnp.sum(inner <= rest[..., None], -1), block - 1)
    return jnp.minimum(blk * block + j, v - 1).astype(jnp.int32), m, total


def compact(draws: Array, num_slots: int) -> tuple[Array, Array, Array]:
    """Distinct ids and their counts, the U largest counts kept.

    With U >= N nothing is ever dropped (counts sum to N): counts/N is then an unbiased
    estimate of the distribution the draws came from. With U < N a position with more
    than U distinct ids loses the draws of its smallest counts, which biases counts/N
    towards the head (module docstring); `N − counts.sum(-1)` is the number dropped.

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

    t̂ = counts / N is an unbiased estimate of p = softmax(logits / T), and the sampled
    forward KL's student gradient one of the forward-KL gradient, when no draw can be
    dropped, which `num_slots >= num_samples` guarantees; with fewer slots, where more
    than U distinct ids can be drawn, both are biased towards the head (`dropped` counts
    the draws lost; see the module docstring).

    Args:
      logits: [B, L, V] teacher logits.
      keys: [B] PRNG keys, one per row (`row_keys`).
      num_samples: N, i.i.d. draws per position.
      num_slots: U, (id, count) slots kept per position; U = N keeps every draw.
    Returns:
      ids [B, L, U] (smallest uint for V), counts [B, L, U] (smallest uint for N),
      distinct [B, L] int32, dropped [B, L] int32 (draws lost to the U limit),
      mass [B, L] f32 (teacher mass on the kept ids).
    """
    x = _scaled(logits, temperature)
    return _sampled(x, row_uniforms(keys, x.shape[1], num_samples), num_slots)


def _sampled(x: Array, u: Array, num_slots: int) -> dict[str, Array]:
    """`sampled_signal` of scaled logits x [..., V] at uniforms u [..., N] (unbiased when
    no draw can be dropped: `num_slots` >= N guarantees it)."""
    v, n = x.shape[-1], u.shape[-1]
    draws, m, total = _draw(x, u, BLOCK)
    ids, counts, distinct = compact(draws, num_slots)
    logp = (jnp.take_along_axis(x, ids, axis=-1) - m) - jnp.log(total)
    kept = jnp.where(counts > 0, jnp.exp(logp), 0.0)
    return dict(ids=ids.astype(id_dtype(v)), counts=counts.astype(count_dtype(n)),
                distinct=distinct, dropped=n - counts.sum(-1, dtype=jnp.int32),
                mass=kept.sum(-1))


def topk_signal(logits: Array, *, k: int, temperature: float = 1.0) -> dict[str, Array]:
    """Top-k signal: ids and log-probabilities of the K most likely tokens and the tail.

    Args:
      logits: [..., V] teacher logits; k <= V.
    Returns:
      ids [..., K] (smallest uint for V; the ids of `lax.top_k`, ties to the smaller id),
      logprobs [..., K] f32 (log softmax(logits/T), descending), tail [...] f32 =
      Σ_{v ∉ top-k} p_v (summed over the tail itself, so a tail of 1e-9 is exact, not
      1 − Σp rounding), mass [...] f32 = 1 − tail.
    """
    _check_k(k, logits.shape[-1])
    return _topk(_scaled(logits, temperature), k)


def _check_k(k: int, v: int) -> None:
    if not 1 <= k <= v:
        raise ValueError(f"top-k needs 1 <= k <= vocab size, got k={k} with V={v}")


def _barrier(outputs):
    """An optimization barrier on each output of a `lax.top_k` separately: one barrier
    over the (values, ids) pair consumes the TopK tuple itself, which XLA:CPU's TopK
    decomposer (run inside shard_map bodies) cannot handle (a check failure)."""
    return tuple(lax.optimization_barrier(o) for o in outputs)


def _topk(x: Array, k: int, block: int = BLOCK) -> dict[str, Array]:
    """`topk_signal` of scaled logits x [..., V].

    For V ≥ 2·k·block the top k lie in the k blocks of `block` ids with the largest
    maxima (ties: smaller block): were an id of the top k in another block, each of those
    k blocks would hold an id before it (larger, or equal with a smaller index). So
    `lax.top_k` runs over the block maxima and then over those k blocks in id order (ties
    stay with the smaller id), not over all V ids: XLA:CPU's TopK costs ~2 ns per id and
    one pass of max is far cheaper. Same ids and values as `lax.top_k(x, k)`.
    """
    v = x.shape[-1]
    # The barriers keep XLA from fusing the top-k values into the reductions below; fused,
    # XLA:CPU drops its fast TopK kernel for a full comparator sort (~25x slower).
    if v >= 2 * k * block:
        xb = _blocks(x, block)
        top_blocks = _barrier(lax.top_k(jnp.max(xb, -1), k))[1]
        top_blocks = jnp.sort(top_blocks, -1)  # id order, so ties keep the smaller id
        cand = jnp.take_along_axis(xb, top_blocks[..., None], axis=-2)
        vals, pos = _barrier(lax.top_k(cand.reshape(x.shape[:-1] + (-1,)), k))
        ids = jnp.take_along_axis(top_blocks, pos // block, -1) * block + pos % block
    else:
        vals, ids = _barrier(lax.top_k(x, k))
    # p = exp(x − m) / s with m = the top value. The tail: Σ p below the k-th value, plus
    # the ids tied with it that top_k left out (they equal it exactly). Summing the tail
    # itself keeps a 1e-9 tail exact (1 − Σ_topk p would round to 0), and s = top k + tail
    # (all terms ≥ 0, no cancellation) needs no second pass of exp over V.
    m, kth = vals[..., :1], vals[..., -1:]
    below = jnp.sum(jnp.where(x < kth, jnp.exp(x - m), 0.0), -1)
    tied_out = jnp.sum(x >= kth, -1) - k
    tail = below + tied_out * jnp.exp(kth[..., 0] - m[..., 0])
    s = jnp.sum(jnp.exp(vals - m), -1) + tail
    tail = tail / s
    logprobs = (vals - m) - jnp.log(s)[..., None]
    return dict(ids=ids.astype(id_dtype(v)), logprobs=logprobs, tail=tail, mass=1.0 - tail)


def chunked_signal(hidden: Array, lm_head: Array, mode: str, *, keys: Array | None = None,
                   k: int = 0, num_samples: int = 0, num_slots: int = 0,
                   temperature: float = 1.0, chunk_len: int = 16) -> dict[str, Array]:
    """`sampled_signal` / `topk_signal` of the logits `hidden @ lm_head`, a chunk at a time.

    The logits of `chunk_len` positions of every row (`[B, chunk_len, V]`) are computed
    inside a `lax.map` over chunks of the length axis and reduced to their signal right
    away, so they stay in cache and the `[B, L, V]` logits are never stored; the batch
    axis stays whole (and sharded as it is). The sampled draws use the same uniforms per
    (seed, row) as `sampled_signal`.

    Args:
      hidden: [B, L, H] final hidden states (after the last norm), in the compute dtype.
      lm_head: [H, V] vocabulary projection (`Decoder.lm_head()`) in the compute dtype;
        the logits are its product with `hidden` accumulated into f32 (never rounded to a
        bf16 teacher's compute dtype).
      mode: "sampled" (needs keys [B], num_samples, num_slots) or "topk" (needs k).
      chunk_len: positions per chunk (per row); the step uses
        `kdjax.platform.precompute_chunk_tokens()` tokens per device (256 on CPU: a
        [256, 32k] f32 block of logits is 32 MB).
    Returns:
      the dict of `sampled_signal` / `topk_signal`.
    """
    b, length, h = hidden.shape
    v = lm_head.shape[-1]
    if mode == "sampled":
        extra = (row_uniforms(keys, length, num_samples),)

        def fn(x, u):
            return _sampled(x, u, num_slots)
    elif mode == "topk":
        _check_k(k, v)
        extra = ()

        def fn(x):
            return _topk(x, k)
    else:
        raise ValueError(f"chunked_signal computes the sampled and topk signals, got {mode!r}")
    _check_temperature(temperature)
    c = _chunk_len(length, chunk_len)
    nc = -(-length // c)

    def split(a):  # [B, L, ...] → [chunks, B, c, ...], zero-padded to nc·c positions
        if nc * c != length:
            a = jnp.pad(a, [(0, 0), (0, nc * c - length)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((b, nc, c) + a.shape[2:]), 1, 0)

    def body(args):
        hc, *ex = args
        # the signal runs on `[B·c, V]` rows: XLA:CPU reduces a `[1, c, V]` block (one row
        # per device) over V several times slower than the same data as `[c, V]`
        # f32 logits from the compute-dtype operands: rounded to bf16, a bf16 teacher's
        # logits would be off by up to 1/16 at |logit| in [16, 32), in log-probs and top-k
        logits = jnp.dot(hc.reshape(b * c, h), lm_head, preferred_element_type=jnp.float32)
        sig = fn(_scaled(logits, temperature), *(e.reshape((b * c,) + e.shape[2:])
                                                 for e in ex))
        return jax.tree.map(lambda a: a.reshape((b, c) + a.shape[1:]), sig)

    out = lax.map(body, (split(hidden), *map(split, extra)))

    def merge(a):  # [chunks, B, c, ...] → [B, L, ...]
        a = jnp.moveaxis(a, 0, 1)
        return a.reshape((b, nc * c) + a.shape[3:])[:, :length]

    return jax.tree.map(merge, out)


def _chunk_len(length: int, target: int) -> int:
    """A divisor of `length` in [target / 2, target] if there is one (no padded positions),
    else `target` (the last chunk padded); at most `length`."""
    target = max(1, min(int(target), length))
    for c in range(target, (target + 1) // 2 - 1, -1):
        if length % c == 0:
            return c
    return target


def dense_signal(logits: Array, dtype=jnp.float32) -> dict[str, Array]:
    """Dense signal: the raw logits [..., V] cast to `dtype` (temperature applies at loss time)."""
    return dict(logits=logits.astype(dtype))
