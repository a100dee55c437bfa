"""`Decoder`: the Llama/Mistral/Qwen decoder-only transformer in Flax NNX.

Pre-norm residual blocks `x + attn(norm(x))`, `x + mlp(norm(x))`, a final RMSNorm and
an (optionally tied) vocabulary projection. One forward can return the logits, the
final hidden states (for the fused loss), and chosen layers' hidden states and
attention scores (for hidden-state / attention distillation) without a second pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kdjax.sharding import constrain, state_shardings

from . import fused_attention
from .attention import attention_mask
from .blocks import Block, run_blocks, stacked_blocks
from .config import DecoderConfig
from .layers import RMSNorm, embed_lookup, param, project, rope_cos_sin, rope_inv_freq

__all__ = ["Block", "Decoder", "DecoderOutput", "init_decoder", "positions_from_segments",
           "weight_decay_mask", "with_config"]
_ACT = ("batch", "length", "embed")


@struct.dataclass
class DecoderOutput:
    """What a forward returns (a pytree, so it can leave jit).

    Attributes:
      logits: `[B, L, V]` in the compute dtype, or None when `return_logits=False`.
      hidden: `[B, L, H]` final hidden states, after the last norm (`logits = hidden @
        lm_head()`).
      hidden_states: `{i: [B, L, H]}` for each requested i: the residual stream after
        `i` blocks (0 = embeddings), and for `i = num_layers` the final normed `hidden`,
        so `hidden_states[i]` equals transformers' `output_hidden_states[i]` for all i.
      attention_scores: `{i: [B, heads, L, Lk] f32}` masked pre-softmax scores of block i
        (0-based); `softmax` of them is transformers' `output_attentions[i]`.
      cache: the updated KV cache when one was passed, else None.
    """

    logits: jax.Array | None
    hidden: jax.Array
    hidden_states: dict[int, jax.Array]
    attention_scores: dict[int, jax.Array]
    cache: Any = None


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """`[B, L]` int32 position of each token within its segment (0 at each segment start)."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts = jnp.where(segment_ids != prev, idx, 0)
    return idx - jax.lax.cummax(starts, axis=1)


class Decoder(nnx.Module):
    """Decoder-only LM. `Decoder(config, rngs=nnx.Rngs(seed))`; see `__call__`."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           cfg.param_dtype)
        self.layers = stacked_blocks(cfg, rngs)  # params [num_layers, ...], axis "layers"
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype,
                            dtype=cfg.dtype, rngs=rngs)
        self.unembed = (None if cfg.tie_word_embeddings else
                        param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                              cfg.param_dtype))

    def lm_head(self, dtype=None) -> jax.Array:
        """`[H, V]` vocabulary projection (tied: `embedding.T`) in `dtype`, by default the
        compute dtype. The fused losses take it in the parameter dtype: they cast it for
        the matmuls themselves and return its gradient unrounded."""
        w = self.embed[...].T if self.unembed is None else self.unembed[...]
        return w.astype(dtype or self.config.dtype)

    def unstacked_blocks(self) -> tuple[Block, ...]:
        """The `num_layers` blocks as separate `Block`s, each holding its own copy of its
        layer's parameters, for `__call__(blocks=...)`."""
        graphdef, state = nnx.split(self.layers)
        return tuple(nnx.merge(graphdef, jax.tree.map(lambda t, i=i: t[i], state))
                     for i in range(self.config.num_layers))

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, return_logits: bool = True,
                 hidden_layers: Sequence[int] = (), attention_layers: Sequence[int] = (),
                 cache: dict | None = None,
                 blocks: Sequence[Block] | None = None) -> DecoderOutput:
        """Forward.

        Args:
          tokens: `[B, L]` int token ids.
          segment_ids: `[B, L]` int, tokens attend only within their segment (packed
            rows); 0 marks padding. None = one segment per row.
          positions: `[B, L]` int RoPE positions; None = index within each segment.
          return_logits: compute `[B, L, V]` logits (False: only `hidden`, for fused losses).
          hidden_layers: residual-stream indices in `[0, num_layers]` (negatives count
            from the end) to return in `hidden_states`.
          attention_layers: block indices in `[0, num_layers)` whose scores to return.
          cache: sampler KV cache (see `kdjax.models.sampler.init_cache`); tokens are
            written at `cache["index"]` and attend over all cache slots.
          blocks: run these blocks (`unstacked_blocks()`) one after the other instead of
            scanning the stacked layers; with a cache, `cache["layers"]` is then a tuple
            of per-layer `{"k", "v"}: [B, kv_heads, S, head_dim]` (see
            `kdjax.models.rollout.unstack_cache`). A decode loop on CPU makes them once,
            before the loop: a scanned layer's weights and cache are copied out of their
            stacks on every step there, and the head-major cache needs no transposed copy.
        """
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        hidden_layers = normalize_indices(hidden_layers, cfg.num_layers + 1, "hidden_layers")
        attention_layers = normalize_indices(attention_layers, cfg.num_layers, "attention_layers")
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segment_ids)
        q_slots = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        index, k_segments, mask = None, segment_ids, None
        if cache is not None:
            # the cache is read-only in the layers: the cache mask sees the slots before
            # `index`, the self mask the new tokens; the new keys/values come back stacked
            # and are written once below
            index = cache["index"]
            k_slots = jnp.arange(cache["segment_ids"].shape[1], dtype=jnp.int32)
            cache_mask = attention_mask(segment_ids, cache["segment_ids"], q_slots + index,
                                        k_slots, cfg.sliding_window)
            mask = (cache_mask & (k_slots < index)[None, None, :],
                    attention_mask(segment_ids, segment_ids, q_slots, q_slots,
                                   cfg.sliding_window))
            k_segments = jax.lax.dynamic_update_slice(cache["segment_ids"],
                                                      segment_ids.astype(jnp.int32), (0, index))
        impl = "xla" if cache is not None else fused_attention.resolve(cfg.attention_impl,
                                                                      tokens.shape[1])
        if cache is None and (impl == "xla" or attention_layers):
            # the fused kernels mask by segment ids
            mask = attention_mask(segment_ids, k_segments, q_slots, q_slots, cfg.sliding_window)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta,
                                                         cfg.rope_scaling))
        x = constrain(embed_lookup(self.embed[...], tokens, cfg.dtype), _ACT)
        if blocks is not None:
            x, hidden_states, scores, layers = run_unstacked(
                blocks, x, cos, sin, mask, segment_ids, impl=impl,
                hidden_layers=hidden_layers, attention_layers=attention_layers,
                cache=None if cache is None else cache["layers"], cache_index=index)
        else:
            x, hidden_states, scores, layer_cache = run_blocks(
                self.layers, cfg, x, cos, sin, mask, segment_ids, impl=impl,
                hidden_layers=hidden_layers, attention_layers=attention_layers,
                cache=None if cache is None else cache["layers"], cache_index=index)
        hidden = self.norm(x)
        if cfg.num_layers in hidden_layers:  # transformers' last entry is after the norm
            hidden_states[cfg.num_layers] = hidden
        logits = None
        if return_logits:
            logits = project("blh,hv->blv", hidden, self.lm_head())
            logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = None
        if cache is not None:
            if blocks is None:
                start = (0, 0, index, 0, 0)
                layers = {name: jax.lax.dynamic_update_slice(cache["layers"][name],
                                                             layer_cache[name], start)
                          for name in ("k", "v")}
            new_cache = {"layers": layers, "segment_ids": k_segments,
                         "index": index + tokens.shape[1]}
        return DecoderOutput(logits, hidden, hidden_states, scores, new_cache)


def run_unstacked(blocks: Sequence[Block], x, cos, sin, mask, segment_ids, *, impl: str,
                  hidden_layers=frozenset(), attention_layers=frozenset(), cache=None,
                  cache_index=None):
    """`run_blocks` for separate blocks, in a Python loop (the program grows with depth):
    the same values. With a cache (a tuple of per-layer head-major `{"k", "v"}`), each
    layer writes its new keys/values into its own cache, in place. Returns `(x, {i:
    [B, L, H]}, {i: scores}, updated per-layer caches | None)`."""
    hidden, scores, caches = {}, {}, []
    for i, block in enumerate(blocks):
        if i in hidden_layers:
            hidden[i] = x
        layer_cache = None if cache is None else cache[i]
        # Block.__call__'s two residual steps, with the head-major cache flag
        a, scores[i], layer_cache = block.attn(
            block.attn_norm(x), cos, sin, mask, segment_ids=segment_ids, impl=impl,
            cache=layer_cache, cache_index=cache_index, return_scores=i in attention_layers,
            head_major_cache=True)
        x = constrain(x + a, _ACT)
        x = constrain(x + block.mlp(block.mlp_norm(x)), _ACT)
        caches.append(layer_cache)
    scores = {i: s for i, s in scores.items() if s is not None}
    return x, hidden, scores, None if cache is None else tuple(caches)


def init_decoder(config: DecoderConfig, *, seed: int = 0,
                 mesh: jax.sharding.Mesh | None = None) -> Decoder:
    """A randomly initialized `Decoder` (the values of `Decoder(config,
    rngs=nnx.Rngs(seed))`, up to last-ulp rounding), built in one compiled function
    cached per (config, mesh), so new seeds do not recompile; with `mesh` the parameters
    are created directly in their sharding (no host copy)."""
    graphdef, create = _init_fn(config, mesh)
    return nnx.merge(graphdef, create(jnp.asarray(seed, jnp.uint32)))


@functools.lru_cache(maxsize=16)
def _init_fn(config: DecoderConfig, mesh):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    out_shardings = None if mesh is None else state_shardings(abstract, mesh)

    def create(seed):
        return nnx.state(Decoder(config, rngs=nnx.Rngs(jax.random.key(seed))))

    return graphdef, jax.jit(create, out_shardings=out_shardings)


def with_config(model: Decoder, **changes) -> Decoder:
    """The same parameters (shared, not copied) under a config with `changes` that do not
    alter the parameter structure, e.g. `remat="full"`, `dtype="bfloat16"`."""
    config = model.config.replace(**changes)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    state = nnx.state(model)
    want = jax.tree.map(lambda v: (v.shape, v.dtype), abstract)
    have = jax.tree.map(lambda v: (v.shape, v.dtype), state)
    if jax.tree.structure(want) != jax.tree.structure(have) or want != have:
        raise ValueError(f"with_config({changes}) changes the parameters' structure, shapes "
                         "or dtypes; build a new Decoder instead")
    return nnx.merge(graphdef, state)


def normalize_indices(indices: Sequence[int], n: int, name: str,
                      what: str | None = None) -> frozenset[int]:
    """Indices into an n-entry range (negatives count from the end), each checked.

    `what` describes the range in the error (default: "this n-entry range")."""
    out = set()
    for i in indices:
        if not -n <= int(i) < n:
            raise ValueError(f"{name} contains {i}, outside [-{n}, {n}) for "
                             f"{what or f'this {n}-entry range'}; pass indices in range or "
                             "negatives from the end")
        out.add(int(i) % n)
    return frozenset(out)


def weight_decay_mask(params) -> Any:
    """True for each weight matrix of a `Decoder`'s params (a pure dict or nnx State), False
    for norm scales and biases: the pytree optax's `mask=` takes.

    `ndim >= 2` alone is not enough: the stacked layers' parameters carry a leading
    "layers" axis (a norm scale is `[num_layers, H]`), and attention biases are
    `[heads, head_dim]`."""

    def one(path, leaf):
        # dict keys only: an nnx Variable adds a trailing `.value` attribute key
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if keys[-1] in ("bias", "scale"):
            return False
        return leaf.ndim - (keys[0] == "layers") >= 2

    return jax.tree_util.tree_map_with_path(one, params)
