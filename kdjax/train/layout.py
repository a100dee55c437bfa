"""Example rows → one training sequence each: prompt, then completion, then padding.

Example rows hold `prompt [N, P]` left-aligned (right-padded) with `prompt_len [N]` and
`completion [N, C]` with `completion_len [N]` (`kdjax.data.examples`; or a rollout's
tokens and lengths). Training on completion y given prompt x needs them contiguous:

    slot:     0 … p−1 | p … p+c−1 | p+c … P+C−1
    tokens:   x       | y         | pad            (segment 1, then segment 0)

The causal shift lives here and nowhere else: `targets[s] = tokens[s + 1]`, and
`loss_mask[s]` is true exactly for s ∈ [p − 1, p + c − 1), i.e. the logit at the last
prompt slot (which predicts y₀) counts, and so does the one predicting the last
completion token (EOS included, whatever the pad id is); nothing after it counts.
Completion token j is predicted at slot p − 1 + j (`completion_slots`), which is how
per-token values move between the `[N, P + C]` sequence and the `[N, C]` completion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def completion_layout(prompt: jax.Array, prompt_len: jax.Array, completion: jax.Array,
                      completion_len: jax.Array, pad_id: int = 0) -> dict[str, jax.Array]:
    """Lays each example out as prompt ‖ completion ‖ padding (see the module docstring).

    Args:
      prompt: `[N, P]` int ids, left-aligned; slots ≥ prompt_len are ignored.
      prompt_len: `[N]` int, in [1, P] (a row with 0 has no slot to predict y₀ from).
      completion: `[N, C]` int ids; slots ≥ completion_len are ignored.
      completion_len: `[N]` int, in [0, C].
      pad_id: id written in padding slots (never a target: its loss_mask is False).

    Returns:
      `{tokens, targets, positions, segment_ids}` `[N, P + C]` int32 and `loss_mask`
      `[N, P + C]` bool, the packed-row batch format the objective reads.
    """
    n, p = prompt.shape
    c = completion.shape[1]
    plen = prompt_len.astype(jnp.int32)[:, None]
    clen = completion_len.astype(jnp.int32)[:, None]
    slots = jnp.arange(p + c, dtype=jnp.int32)[None, :]
    in_prompt = slots < plen
    in_completion = (slots >= plen) & (slots < plen + clen)
    from_prompt = jnp.take_along_axis(prompt.astype(jnp.int32),
                                      jnp.clip(slots, 0, p - 1) * jnp.ones((n, 1), jnp.int32),
                                      axis=1)
    from_completion = jnp.take_along_axis(completion.astype(jnp.int32),
                                          jnp.clip(slots - plen, 0, c - 1), axis=1)
    tokens = jnp.where(in_prompt, from_prompt,
                       jnp.where(in_completion, from_completion, jnp.int32(pad_id)))
    real = in_prompt | in_completion
    targets = jnp.concatenate([tokens[:, 1:], jnp.full((n, 1), pad_id, jnp.int32)], axis=1)
    loss_mask = (slots >= plen - 1) & (slots < plen + clen - 1)
    return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
            "segment_ids": real.astype(jnp.int32), "positions": jnp.where(real, slots, 0)}


def completion_slots(prompt_len: jax.Array, completion_width: int) -> jax.Array:
    """`[N, C]` int32: the sequence slot whose logit predicts completion token j
    (p − 1 + j, clipped into the `[P + C]` row for the slots past the completion)."""
    j = jnp.arange(completion_width, dtype=jnp.int32)[None, :]
    return prompt_len.astype(jnp.int32)[:, None] - 1 + j


def to_completion(values: jax.Array, prompt_len: jax.Array, completion_width: int
                  ) -> jax.Array:
    """Per-slot values `[N, P + C, ...]` → per-completion-token values `[N, C, ...]`
    (value at the slot that predicts each completion token)."""
    idx = completion_slots(prompt_len, completion_width)
    idx = jnp.clip(idx, 0, values.shape[1] - 1)
    idx = idx.reshape(idx.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, idx, axis=1)


def completion_mask(completion_len: jax.Array, completion_width: int) -> jax.Array:
    """`[N, C]` bool: token j is part of the completion (j < completion_len)."""
    j = jnp.arange(completion_width, dtype=jnp.int32)[None, :]
    return j < completion_len.astype(jnp.int32)[:, None]
