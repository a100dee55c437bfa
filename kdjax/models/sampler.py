"""Batched autoregressive generation with a KV cache, compiled once per shape.

Prompts are left-aligned into a cache of `P + max_new_tokens` slots (padding slots get
segment 0 and are never attended), prefilled in one forward, then decoded one token
per step inside a single `lax.while_loop`: every shape is static, so a call compiles
once for its (batch, prompt length, max_new_tokens, sampling mode) and never per step.
Sampling: greedy (`temperature=0`), temperature, top-k, top-p (nucleus; Holtzman et
al. 2020), stopping rows at EOS (later slots hold `pad_token_id`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from .decoder import Decoder


@struct.dataclass
class GenerateOutput:
    """tokens: `[B, max_new_tokens]` int32 generated ids (pad after EOS);
    lengths: `[B]` int32 number of generated tokens including the EOS;
    sequences: `[B, P + max_new_tokens]` prompt (right-padded as given) then tokens."""

    tokens: jax.Array
    lengths: jax.Array
    sequences: jax.Array


def init_cache(config, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache: `layers: {"k", "v"}: [num_layers, B, length, kv_heads, head_dim]`
    (stacked on the layer axis like the blocks' parameters, so the layer scan carries it),
    key `segment_ids [B, length]` (0 = empty) and the next write `index`."""
    dtype = dtype or config.dtype
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    layers = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return {"layers": layers, "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def _filter_logits(logits, temperature, top_k, top_p):
    """Scaled logits `[B, V]` f32 with tokens outside the top-k (`top_k` 0 = off) and then
    outside the top-p nucleus (`top_p` 1 = off) at -inf. All three are traced values,
    so changing them never recompiles; ties at the k-th value are all kept."""
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    kth = jnp.take(sorted_logits, jnp.maximum(top_k, 1) - 1, axis=-1)[:, None]
    logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
    sorted_logits = jnp.where((top_k > 0) & (sorted_logits < kth), -jnp.inf, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep a token if the mass strictly before it is < top_p (always keeps the first)
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _generate(graphdef, state, prompts, lengths, key, temperature, top_k, top_p, eos, pad_id,
              *, max_new_tokens: int, greedy: bool):
    model = nnx.merge(graphdef, state)
    b, p = prompts.shape
    shift = p - lengths  # left-align: row r's prompt ends at slot p - 1
    slots = jnp.arange(p, dtype=jnp.int32)[None, :]
    src = jnp.clip(slots - shift[:, None], 0, p - 1)
    real = slots >= shift[:, None]
    tokens = jnp.where(real, jnp.take_along_axis(prompts, src, axis=1), pad_id)
    positions = jnp.where(real, slots - shift[:, None], 0)
    cache = init_cache(model.config, b, p + max_new_tokens)
    out = model(tokens, segment_ids=real.astype(jnp.int32), positions=positions,
                cache=cache, return_logits=False)
    lm_head = model.lm_head()

    def next_logits(hidden_last):
        return jnp.einsum("bh,hv->bv", hidden_last, lm_head).astype(jnp.float32)

    def cond(carry):
        t, _, _, _, done, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, cache, logits, generated, done, key = carry
        key, sub = jax.random.split(key)
        if greedy:
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            filtered = _filter_logits(logits, temperature, top_k, top_p)
            tok = jax.random.categorical(sub, filtered, axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        generated = generated.at[:, t].set(tok)
        done = done | jnp.isin(tok, eos)
        step = model(tok[:, None], segment_ids=jnp.ones((b, 1), jnp.int32),
                     positions=(lengths + t)[:, None], cache=cache, return_logits=False)
        return t + 1, step.cache, next_logits(step.hidden[:, -1]), generated, done, key

    generated = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    carry = (jnp.int32(0), out.cache, next_logits(out.hidden[:, -1]), generated,
             jnp.zeros((b,), bool), key)
    _, _, _, generated, _, _ = jax.lax.while_loop(cond, body, carry)
    is_eos = jnp.isin(generated, eos)
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return generated, first_eos.astype(jnp.int32)


def generate(model: Decoder, prompts, *, max_new_tokens: int,
             prompt_lengths: Sequence[int] | np.ndarray | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             seed: int | jax.Array = 0) -> GenerateOutput:
    """Generates `max_new_tokens` tokens per row (fewer real ones after EOS).

    Args:
      model: a `Decoder`.
      prompts: `[B, P]` int token ids, right-padded when rows differ in length.
      max_new_tokens: number of decode steps (static; the cache holds P + this).
      prompt_lengths: `[B]` real prompt lengths (default: all P); each must be ≥ 1.
      temperature: 0 = greedy (argmax, equal to transformers' greedy `generate`); > 0
        samples from `softmax(logits / temperature)`, optionally restricted to the
        `top_k` largest logits and/or the `top_p` nucleus.
      eos_token_id: id or ids that end a row (default: the model config's eos, if any).
      pad_token_id: id written after a row ends.
      seed: int or PRNG key for sampling.
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompts.ndim != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be [batch, length>0] token ids, got {prompts.shape}")
    b, p = prompts.shape
    lengths = np.full((b,), p) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > p:
        raise ValueError(f"prompt_lengths must be [{b}] ints in [1, {p}], got {lengths}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={model.config.vocab_size}], got "
                         f"{top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    # -1 never matches a token; one slot keeps the shape (and the compile) the same
    eos = np.atleast_1d(-1 if eos_token_id is None else eos_token_id).astype(np.int32)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    graphdef, state = nnx.split(model)
    tokens, lengths_out = _generate(
        graphdef, state, prompts, jnp.asarray(lengths, jnp.int32), key,
        jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k or 0), jnp.float32(top_p or 1.0),
        jnp.asarray(eos), jnp.int32(pad_token_id),
        max_new_tokens=int(max_new_tokens), greedy=temperature == 0)
    return GenerateOutput(tokens, lengths_out, jnp.concatenate([prompts, tokens], axis=1))
