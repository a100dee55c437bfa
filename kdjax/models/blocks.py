"""The decoder's transformer blocks, stacked and scanned.

All `num_layers` blocks live in one `Block` whose parameters carry a leading "layers"
axis (`nnx.vmap` at construction), and the forward runs them with `jax.lax.scan` over
that axis, each layer under `jax.checkpoint` with the configured remat policy: the
program holds one block whatever the depth, so compile time and HLO size do not grow
with it (Levanter, MaxText). `scan_layers=False` runs a Python loop over the same
stacked parameters instead (the reference; its program grows with depth).

Layers whose input residual stream or attention scores are requested split the stack:
the spans between them are scanned, a block whose scores are wanted runs on its own.
"""

from __future__ import annotations

from collections.abc import Set

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.sharding import constrain

from .attention import Attention
from .config import DecoderConfig
from .layers import MLP, RMSNorm

REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
_ACT = ("batch", "length", "embed")


class Block(nnx.Module):
    """One pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        kw = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, **kw)

    def __call__(self, x, cos, sin, mask, segment_ids, cache=None, cache_index=None,
                 return_scores=False, impl="xla"):
        """`x [B, L, H]` → `(x [B, L, H], scores | None, cache | None)`; see `Attention`."""
        a, scores, cache = self.attn(self.attn_norm(x), cos, sin, mask,
                                     segment_ids=segment_ids, impl=impl, cache=cache,
                                     cache_index=cache_index, return_scores=return_scores)
        x = constrain(x + a, _ACT)
        x = constrain(x + self.mlp(self.mlp_norm(x)), _ACT)
        return x, scores, cache


def stacked_blocks(cfg: DecoderConfig, rngs: nnx.Rngs) -> Block:
    """`cfg.num_layers` independently initialized blocks as one `Block` whose parameters
    are `[num_layers, ...]`, with "layers" prepended to their logical axes."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return Block(cfg, rngs=rngs)

    return make(rngs)


def run_blocks(blocks: Block, cfg: DecoderConfig, x, cos, sin, mask, segment_ids, *,
               impl: str, hidden_layers: Set[int] = frozenset(),
               attention_layers: Set[int] = frozenset(), cache: dict | None = None,
               cache_index=None):
    """Runs the stacked blocks on `x [B, L, H]`.

    Args:
      blocks: the stacked `Block` (`stacked_blocks`).
      cos, sin, mask, segment_ids, impl: as `Attention` takes them (shared by all layers).
      hidden_layers: i in `[0, num_layers)` whose input residual stream to return.
      attention_layers: blocks whose scores to return.
      cache: None or `{"k", "v"}: [num_layers, B, S, kv_heads, head_dim]`, read only.
    Returns:
      `(x [B, L, H], {i: [B, L, H]}, {i: scores}, new keys/values | None)`: with a cache,
      `{"k", "v"}: [num_layers, B, L, kv_heads, head_dim]` of the L new tokens, for the
      caller to write into the cache.
    """
    n = cfg.num_layers
    graphdef, state = nnx.split(blocks)
    cuts = sorted({0, n} | {i for i in hidden_layers if i < n}
                  | set(attention_layers) | {i + 1 for i in attention_layers})
    hidden, scores, caches = {}, {}, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a in hidden_layers:
            hidden[a] = x
        if a in attention_layers:  # b == a + 1: one block, outside any scan
            step = _layer_step(graphdef, cfg.remat, True, impl, scan=False)
            x, scores[a], c = step(_index(state, a), x, cos, sin, mask, segment_ids,
                                   _index(cache, a), cache_index)
            c = None if c is None else jax.tree.map(lambda t: t[None], c)
        else:
            x, c = _run_span(graphdef, cfg, impl, _take(state, a, b, n), x, cos, sin, mask,
                             segment_ids, _take(cache, a, b, n), cache_index)
        caches.append(c)
    new_cache = None
    if cache is not None:
        new_cache = (caches[0] if len(caches) == 1 else
                     jax.tree.map(lambda *cs: jnp.concatenate(cs, axis=0), *caches))
    return x, hidden, scores, new_cache


def _run_span(graphdef, cfg, impl, span, x, cos, sin, mask, segment_ids, cache, index):
    """The layers of `span` (stacked state) in order, scanned unless `cfg.scan_layers`
    is False. Returns `(x, stacked new keys/values | None)`."""
    step = _layer_step(graphdef, cfg.remat, False, impl, scan=cfg.scan_layers)
    if cfg.scan_layers:
        def body(x, layer):
            layer_state, layer_cache = layer
            x, _, c = step(layer_state, x, cos, sin, mask, segment_ids, layer_cache, index)
            return x, c

        return jax.lax.scan(body, x, (span, cache))
    size = jax.tree.leaves(span)[0].shape[0]
    caches = []
    for i in range(size):
        x, _, c = step(_index(span, i), x, cos, sin, mask, segment_ids, _index(cache, i),
                       index)
        caches.append(c)
    if cache is None:
        return x, None
    return x, jax.tree.map(lambda *cs: jnp.stack(cs), *caches)


def _layer_step(graphdef, remat: str, want_scores: bool, impl: str, *, scan: bool):
    """`(layer state, x, cos, sin, mask, segment_ids, cache, index) → (x, scores, cache)`
    for one layer's (unstacked) parameters, under `jax.checkpoint` unless remat is
    "none". The block is rebuilt from (graph, state) so the checkpointed function is
    pure."""

    def step(layer_state, x, cos, sin, mask, segment_ids, cache, index):
        block = nnx.merge(graphdef, layer_state)
        return block(x, cos, sin, mask, segment_ids, cache, index, want_scores, impl)

    if remat == "none":
        return step
    # inside scan, XLA cannot CSE the recomputation into the forward, so no guard needed
    return jax.checkpoint(step, policy=REMAT[remat], prevent_cse=not scan)


def _take(tree, a: int, b: int, n: int):
    """Layers `[a, b)` of a stacked pytree (the tree itself when that is all of them)."""
    if tree is None or (a, b) == (0, n):
        return tree
    return jax.tree.map(lambda t: t[a:b], tree)


def _index(tree, i: int):
    return None if tree is None else jax.tree.map(lambda t: t[i], tree)
