"""Token selection for the sampler: greedy, temperature, top-k, top-p (nucleus; Holtzman
et al. 2020), with per-row keys, and host-side stop strings.

Sampling draws Gumbel noise per (row, token id) from the row's own key and takes
`argmax(logits / T + noise)` over the kept tokens (the Gumbel-max trick), so a row's draw
depends only on its key, its logits and the filter, never on the other rows of the batch
or on which code path found the kept set.

Top-k / top-p run on a bounded candidate set: `lax.top_k` of `CANDIDATES` (or `top_k`,
when larger) logits per row instead of a sort over the vocabulary. The nucleus is exact
whenever it fits in the candidates (always with top-k; with top-p alone, whenever the
candidates hold at least `top_p` of the probability); otherwise the step falls back to a
full sort, which gives the same tokens (the candidates' decisions are shared).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.sharding import current_mesh, logical_to_spec

CANDIDATES = 256  # top-k candidates per row for the top-k / top-p filters


def num_candidates(vocab_size: int, top_k: int | None) -> int:
    """Static size of the candidate set for a vocabulary and an optional top-k."""
    return int(min(vocab_size, max(CANDIDATES, top_k or 0)))


def check_sampling_args(vocab_size: int, temperature: float, top_k: int | None,
                        top_p: float | None) -> None:
    """Raises a ValueError naming the bad sampling argument and its valid range."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got "
                         f"{temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _candidate_keep(cand, top_k, top_p, full_lse):
    """Which of the sorted candidates `cand [B, C]` (scaled logits, descending) survive
    top-k (`top_k` 0 = off) then top-p (`top_p` 1 = off), and whether that decision is
    complete (no token outside the candidates survives)."""
    ranks = jnp.arange(cand.shape[-1])[None, :]
    keep_k = (top_k == 0) | (ranks < top_k)
    # top-k first: the nucleus is taken from the renormalized top-k distribution
    lse = jnp.where(top_k > 0,
                    jax.nn.logsumexp(jnp.where(keep_k, cand, -jnp.inf), axis=-1),
                    full_lse)
    probs = jnp.where(keep_k, jnp.exp(cand - lse[:, None]), 0.0)
    mass = jnp.cumsum(probs, axis=-1)
    keep = keep_k & ((mass - probs) < top_p)  # mass strictly before it < top_p
    complete = (top_k > 0) | (mass[:, -1] >= top_p)
    return keep, complete


def _full_keep(z, cand_keep, complete, top_p):
    """The kept mask over the whole vocabulary in sorted order `[B, V]` (a full sort), for
    rows whose nucleus does not fit in the candidates; the first C sorted positions take
    the candidates' decisions, so both paths agree wherever the candidates suffice."""
    c = cand_keep.shape[-1]
    order = jnp.argsort(-z, axis=-1, stable=True)
    sorted_z = jnp.take_along_axis(z, order, axis=-1)
    probs = jax.nn.softmax(sorted_z, axis=-1)
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) & ~complete[:, None]
    keep = keep.at[:, :c].set(cand_keep)
    return order, sorted_z, keep


def _top_k(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(z, k)` per row; under a mesh each device runs its own rows (XLA's SPMD
    partitioner would all-gather the whole batch for a top_k)."""
    mesh = current_mesh()
    if mesh is None:
        return tuple(jax.lax.top_k(z, k))
    spec = logical_to_spec(("batch", None), mesh=mesh, shape=z.shape)
    return jax.shard_map(lambda x: tuple(jax.lax.top_k(x, k)), mesh=mesh, in_specs=spec,
                         out_specs=(spec, spec))(z)


def argmax_rows(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` `[B]` int32 (the first maximal index) as a max and a
    min-reduction over float ids: XLA:CPU runs argmax's (value, index) reduce several
    times slower over a vocabulary-long row (`benchmarks/generate.py`)."""
    if x.shape[-1] > 2**24:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)  # float ids would not be exact
    top = x.max(axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.float32)
    first = jnp.min(jnp.where(x == top, ids, jnp.inf), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1).astype(jnp.int32)  # a NaN row: the last


def gumbel_noise(keys: jax.Array, vocab_size: int) -> jax.Array:
    """`[B, V]` f32 standard Gumbel noise, row r from `keys[r]` alone."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys)


def select_tokens(logits: jax.Array, keys: jax.Array | None, temperature, top_k, top_p, *,
                  greedy: bool, filtered: bool, candidates: int,
                  with_logprob: bool = False):
    """The next token per row, `[B]` int32.

    Args:
      logits: `[B, V]` f32 raw logits.
      keys: `[B]` PRNG keys, one per row (unused when greedy).
      temperature, top_k, top_p: traced scalars (top_k 0 / top_p 1 = off).
      greedy: argmax (static). filtered: top-k or top-p is on (static).
      candidates: static candidate-set size (`num_candidates`), ≥ top_k.
      with_logprob: also return each chosen token's log-probability under the
        distribution it was drawn from, `log softmax(filter_logits(logits, temperature,
        top_k, top_p))` (0 when greedy: a point mass).
    Returns:
      `tokens [B]` int32, or `(tokens, logprobs [B] f32)` with `with_logprob`.
    """
    if greedy:
        tok = argmax_rows(logits)
        return (tok, jnp.zeros(tok.shape, jnp.float32)) if with_logprob else tok
    z = logits / temperature
    noise = gumbel_noise(keys, z.shape[-1])
    if not filtered:
        tok = argmax_rows(z + noise)
        if not with_logprob:
            return tok
        return tok, _pick(z, tok) - jax.nn.logsumexp(z, axis=-1)
    cand, ids = _top_k(z, candidates)
    keep, complete = _candidate_keep(cand, top_k, top_p, jax.nn.logsumexp(z, axis=-1))

    def draw(kept, values, order):
        """The Gumbel-max draw among the `kept` sorted `values` (vocabulary ids `order`),
        and its log-probability within the kept set."""
        score = jnp.where(kept, values + jnp.take_along_axis(noise, order, axis=-1), -jnp.inf)
        at = jnp.argmax(score, axis=-1)
        lse = jax.nn.logsumexp(jnp.where(kept, values, -jnp.inf), axis=-1)
        return _pick(order, at), _pick(values, at) - lse

    def from_full_sort():
        order, sorted_z, full = _full_keep(z, keep, complete, top_p)
        return draw(full, sorted_z, order)

    tok, lp = jax.lax.cond(jnp.all(complete), lambda: draw(keep, cand, ids), from_full_sort)
    tok = tok.astype(jnp.int32)
    return (tok, lp) if with_logprob else tok


def _pick(x: jax.Array, index: jax.Array) -> jax.Array:
    """`x[r, index[r]]` for `x [B, N]`, `index [B]`."""
    return jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """`logits / temperature` `[B, V]` f32 with the tokens that top-k (exactly k tokens;
    ties broken towards the lower id) and then top-p remove at -inf: the distribution
    `select_tokens` samples from, `softmax(filter_logits(...))` (for tests and callers
    that want the probabilities)."""
    z = jnp.asarray(logits, jnp.float32) / temperature
    top_k, top_p = jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p)
    c = num_candidates(z.shape[-1], int(top_k))
    cand, _ = _top_k(z, c)
    keep, complete = _candidate_keep(cand, top_k, top_p, jax.nn.logsumexp(z, axis=-1))
    order, _, full = _full_keep(z, keep, complete, top_p)
    rows = jnp.arange(z.shape[0])[:, None]
    kept = jnp.zeros(z.shape, bool).at[rows, order].set(full)
    return jnp.where(kept, z, -jnp.inf)


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the earliest occurrence of any stop string (the stop string is
    not kept, as in transformers' and vLLM's outputs), and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def trim_ids_at_stop_strings(ids: Sequence[int], stop_strings: Sequence[str],
                             decode) -> tuple[list[int], bool]:
    """The shortest prefix of `ids` whose decoding (`decode(ids) -> str`) contains a stop
    string, and whether there was one (else all of `ids`). The tokens that complete the
    stop string are kept (a stop string may end inside a token); truncate the decoded
    text with `truncate_at_stop_strings` to drop it. Binary search: a prefix's decoding
    grows with the prefix, so "contains a stop string" is monotone in its length."""
    ids = list(ids)
    stops = [s for s in stop_strings if s]

    def hit(n):
        text = decode(ids[:n])
        return any(s in text for s in stops)

    if not stops or not hit(len(ids)):
        return ids, False
    lo, hi = 1, len(ids)  # hit(hi) is True
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo], True
