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

CANDIDATES = 256  # top-k candidates per row for the top-k / top-p filters


def num_candidates(vocab_size: int, top_k: int | None) -> int:
    """Static size of the candidate set for a vocabulary and an optional top-k."""
    return int(min(vocab_size, max(CANDIDATES, top_k or 0)))


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


def gumbel_noise(keys: jax.Array, vocab_size: int) -> jax.Array:
    """`[B, V]` f32 standard Gumbel noise, row r from `keys[r]` alone."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), jnp.float32))(keys)


def select_tokens(logits: jax.Array, keys: jax.Array | None, temperature, top_k, top_p, *,
                  greedy: bool, filtered: bool, candidates: int) -> jax.Array:
    """The next token per row, `[B]` int32.

    Args:
      logits: `[B, V]` f32 raw logits.
      keys: `[B]` PRNG keys, one per row (unused when greedy).
      temperature, top_k, top_p: traced scalars (top_k 0 / top_p 1 = off).
      greedy: argmax (static). filtered: top-k or top-p is on (static).
      candidates: static candidate-set size (`num_candidates`), ≥ top_k.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / temperature
    noise = gumbel_noise(keys, z.shape[-1])
    if not filtered:
        return jnp.argmax(z + noise, axis=-1).astype(jnp.int32)
    cand, ids = jax.lax.top_k(z, candidates)
    keep, complete = _candidate_keep(cand, top_k, top_p, jax.nn.logsumexp(z, axis=-1))

    def from_candidates():
        score = jnp.where(keep, cand + jnp.take_along_axis(noise, ids, axis=-1), -jnp.inf)
        return jnp.take_along_axis(ids, jnp.argmax(score, axis=-1)[:, None], axis=-1)[:, 0]

    def from_full_sort():
        order, sorted_z, full = _full_keep(z, keep, complete, top_p)
        score = jnp.where(full, sorted_z + jnp.take_along_axis(noise, order, axis=-1),
                          -jnp.inf)
        return jnp.take_along_axis(order, jnp.argmax(score, axis=-1)[:, None], axis=-1)[:, 0]

    tok = jax.lax.cond(jnp.all(complete), from_candidates, from_full_sort)
    return tok.astype(jnp.int32)


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """`logits / temperature` `[B, V]` f32 with the tokens that top-k (exactly k tokens;
    ties broken towards the lower id) and then top-p remove at -inf: the distribution
    `select_tokens` samples from, `softmax(filter_logits(...))` (for tests and callers
    that want the probabilities)."""
    z = jnp.asarray(logits, jnp.float32) / temperature
    top_k, top_p = jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p)
    c = num_candidates(z.shape[-1], int(top_k))
    cand, _ = jax.lax.top_k(z, c)
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
