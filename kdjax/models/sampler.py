"""Batched autoregressive generation with a KV cache, compiled once per shape.

Prompts are left-aligned into a cache of `P + max_new_tokens` slots (padding slots get
segment 0 and are never attended), prefilled in one forward, then decoded one token
per step inside a single `lax.while_loop`: every shape is static, so a call compiles
once for its (batch, prompt length, max_new_tokens, sampling mode) and never per step;
callers bucket prompt lengths so that each bucket compiles once (`TRACE_COUNTS` counts
the traces). Sampling: greedy (`temperature=0`), temperature, top-k, top-p (nucleus;
Holtzman et al. 2020), see `kdjax.models.sampling`. Every row draws from its own key, so
a row's completion does not depend on the batch, bucket, device or host it ran in.

Each decode step writes only the new token's keys/values into the cache, in place (the
cache is a loop carry and the layers only read it; see `attention.attend_cached`). The
prefill and the loop are `kdjax.models.rollout.decode`, which in-step rollouts share.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from .decoder import Decoder
from .rollout import Sampling, decode, init_cache, sampling_for

__all__ = ["FINISH_REASONS", "GenerateOutput", "example_keys", "generate", "init_cache",
           "trace_count"]

FINISH_REASONS = ("length", "eos", "stop")  # finish_reason codes 0, 1, 2
# (batch, prompt length, max_new_tokens, mode) -> times `_generate` was traced; a test
# asserts one trace per bucket
TRACE_COUNTS: collections.Counter = collections.Counter()


@struct.dataclass
class GenerateOutput:
    """What `generate` returns (`R` = rows = batch × n).

    Attributes:
      tokens: `[R, max_new_tokens]` int32 generated ids; after a row ends, `pad_token_id`.
      lengths: `[R]` int32 number of generated tokens, the stop token included.
      sequences: `[R, P + max_new_tokens]` prompt (right-padded as given) then tokens.
      logprobs: `[R, max_new_tokens]` f32 log-probability of each generated token under
        the model at temperature 1 (`log_softmax` of the raw logits, before temperature,
        top-k and top-p), 0 after the row ends; the mean over a row is
        `logprobs.sum(1) / lengths`.
      finish_reason: `[R]` int32 index into `FINISH_REASONS`: 0 "length" (ran
        max_new_tokens), 1 "eos" (emitted an eos id), 2 "stop" (another stop id).
    """

    tokens: jax.Array
    lengths: jax.Array
    sequences: jax.Array
    logprobs: jax.Array
    finish_reason: jax.Array

    def finish_reasons(self) -> list[str]:
        """`finish_reason` as names ("length", "eos", "stop")."""
        return [FINISH_REASONS[int(i)] for i in np.asarray(self.finish_reason)]

    def mean_logprobs(self) -> np.ndarray:
        """`[R]` mean log-probability of each row's generated tokens (stop token included)."""
        lp, n = np.asarray(self.logprobs, np.float64), np.asarray(self.lengths)
        return (lp.sum(axis=1) / np.maximum(n, 1)).astype(np.float32)


def example_keys(seed: int, example_ids, sample_index: int | None = None) -> jax.Array:
    """`[B]` PRNG keys `fold_in(key(seed), example_id)` (and then `fold_in(·,
    sample_index)` when given): a key per example that does not depend on its position
    in a batch, for `generate(seeds=...)`."""
    ids = jnp.asarray(np.asarray(example_ids, np.uint32))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(ids)
    if sample_index is not None:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, sample_index))(keys)
    return keys


def trace_count() -> int:
    """How many times the generation program has been traced (compiled) so far."""
    return sum(TRACE_COUNTS.values())


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "filtered",
                                             "candidates"))
def _generate(graphdef, state, prompts, lengths, keys, temperature, top_k,
              top_p, eos, stop, pad_id, *, max_new_tokens: int, greedy: bool, filtered: bool,
              candidates: int):
    b, p = prompts.shape
    TRACE_COUNTS[(b, p, max_new_tokens, "greedy" if greedy else
                  "filtered" if filtered else "sample")] += 1
    sampling = Sampling(greedy, filtered, candidates, temperature, top_k, top_p)
    out = decode(nnx.merge(graphdef, state), prompts, lengths, keys, sampling,
                 max_new_tokens=max_new_tokens, eos=eos, stop=stop, pad_id=pad_id)
    return out["tokens"], out["count"], out["logprobs"], out["reason"]


def _global(x: np.ndarray, sharding) -> jax.Array:
    """`x` (whole on every process) as a global array of `sharding`, multi-host too."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _gathered(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) row-sharded array on this host: every process
    runs the same rows, so each gets all of them."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _row_keys(seed, seeds, batch: int, n: int) -> jax.Array:
    """`[batch * n]` keys: example key e_i (`seeds[i]`, or `fold_in(key(seed), i)`), then
    `fold_in(e_i, j)` for its j-th sample."""
    if seeds is None:
        base = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        if not (isinstance(base, jax.Array) and jnp.issubdtype(base.dtype,
                                                                 jax.dtypes.prng_key)
                and base.shape == ()):
            raise ValueError("seed must be an int or a single PRNG key (jax.random.key)")
        examples = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch))
    else:
        if isinstance(seeds, jax.Array) and jnp.issubdtype(seeds.dtype, jax.dtypes.prng_key):
            examples = seeds
        else:
            ints = np.asarray(seeds)
            if not np.issubdtype(ints.dtype, np.integer):
                raise ValueError(f"seeds must be [batch] ints or PRNG keys, got dtype "
                                 f"{ints.dtype}")
            examples = jax.vmap(jax.random.key)(jnp.asarray(ints.astype(np.uint32)))
        if examples.shape != (batch,):
            raise ValueError(f"seeds must be one per prompt, [{batch}], got shape "
                             f"{examples.shape}")
    samples = jnp.arange(n, dtype=jnp.uint32)
    keys = jax.vmap(lambda e: jax.vmap(lambda j: jax.random.fold_in(e, j))(samples))(examples)
    return keys.reshape(batch * n)


def _ids(value, name: str) -> list[int]:
    if value is None:
        return []
    ids = [int(i) for i in np.atleast_1d(np.asarray(value))]
    if any(i < 0 for i in ids):
        raise ValueError(f"{name} must be token ids >= 0, got {ids}")
    return ids


def generate(model: Decoder, prompts, *, max_new_tokens: int,
             prompt_lengths: Sequence[int] | np.ndarray | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             stop_token_ids: Sequence[int] = (), pad_token_id: int = 0,
             seed: int | jax.Array = 0, seeds=None, n: int = 1,
             mesh: jax.sharding.Mesh | None = None) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per row, `n` rows per prompt.

    Args:
      model: a `Decoder`.
      prompts: `[B, P]` int token ids, right-padded when rows differ in length.
      max_new_tokens: number of decode steps (static; the cache holds P + this).
      prompt_lengths: `[B]` real prompt lengths (default: all P); each must be ≥ 1.
      temperature: 0 = greedy (argmax, equal to transformers' greedy `generate`); > 0
        samples from `softmax(logits / temperature)`, optionally restricted to the
        `top_k` largest logits (exactly k; ties to the lower id) and then to the `top_p`
        nucleus of that distribution.
      eos_token_id: id or ids that end a row with finish reason "eos"; None (default):
        the model config's eos, if any; `[]`: none.
      stop_token_ids: more ids that end a row (finish reason "stop"). A stop or eos token
        is kept in `tokens` and counted in `lengths`; later slots hold `pad_token_id`
        (with pad == eos, the first eos is the real one).
      pad_token_id: id written after a row ends.
      seed: int or PRNG key, when `seeds` is None: prompt i's key is
        `fold_in(key(seed), i)` (depends on its position in this call).
      seeds: `[B]` ints or PRNG keys, one per prompt (see `example_keys`): a row's
        completion then depends only on its prompt and key, not on the batch, its
        position, the device count or the host count.
      n: completions per prompt: rows `i * n + j` (j < n) continue prompt i with key
        `fold_in(e_i, j)`, e_i prompt i's key.
      mesh: split the rows over the mesh's data-parallel axes ("batch" logical axis;
        the rows are padded to a multiple of that size); the model's parameters are
        placed by their logical axes unless already on the mesh.
    Returns:
      `GenerateOutput` (`B * n` rows, gathered onto the default device).
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or prompts.shape[1] == 0 or not np.issubdtype(prompts.dtype,
                                                                         np.integer):
        raise ValueError(f"prompts must be [batch, length>0] int token ids, got shape "
                         f"{prompts.shape} dtype {prompts.dtype}")
    b, p = prompts.shape
    vocab = model.config.vocab_size
    lengths = np.full((b,), p) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > p:
        raise ValueError(f"prompt_lengths must be [{b}] ints in [1, {p}], got {lengths}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (completions per prompt) must be an int >= 1, got {n!r}")
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    eos, stop = _ids(eos_token_id, "eos_token_id"), _ids(stop_token_ids, "stop_token_ids")
    stop = [i for i in stop if i not in eos]
    sampling = sampling_for(vocab, temperature, top_k, top_p)
    keys = _row_keys(seed, seeds, b, n)
    if n > 1:
        prompts, lengths = np.repeat(prompts, n, axis=0), np.repeat(lengths, n)
    rows = b * n
    graphdef, state = nnx.split(model)
    args = [np.asarray(prompts, np.int32), np.asarray(lengths, np.int32), keys]
    context = None
    if mesh is not None:
        from kdjax.sharding import data_parallel_size, logical_to_spec, state_shardings

        dp = data_parallel_size(mesh)
        extra = -rows % dp  # pad rows to a multiple of the data-parallel size
        if extra:
            args = [np.concatenate([args[0], np.repeat(args[0][-1:], extra, 0)]),
                    np.concatenate([args[1], np.repeat(args[1][-1:], extra, 0)]),
                    jnp.concatenate([keys, jnp.repeat(keys[-1:], extra)])]
        spec = logical_to_spec(("batch",), mesh=mesh)
        rows_sharding = jax.sharding.NamedSharding(mesh, spec)
        matrix_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*spec, None))
        # every process holds all rows: each places the shards its devices own
        key_data = np.asarray(jax.random.key_data(args[2]))
        args = [_global(args[0], matrix_sharding), _global(args[1], rows_sharding),
                jax.random.wrap_key_data(_global(key_data, jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec(*spec, None))),
                    impl=jax.random.key_impl(args[2]))]
        placed = all(getattr(x.sharding, "mesh", None) == mesh
                     for x in jax.tree.leaves(state))
        if not placed:
            state = jax.device_put(state, state_shardings(state, mesh))
        context = jax.set_mesh(mesh)
    call = functools.partial(
        _generate, graphdef, state, *args, sampling.temperature, sampling.top_k,
        sampling.top_p, jnp.asarray(eos or [-1], jnp.int32),
        jnp.asarray(stop or [-1], jnp.int32), jnp.int32(pad_token_id),
        max_new_tokens=int(max_new_tokens), greedy=sampling.greedy,
        filtered=sampling.filtered, candidates=sampling.candidates)
    if context is None:
        tokens, count, logprobs, reason = call()
    else:
        with context:
            tokens, count, logprobs, reason = call()
    # gathered (and the mesh's padding rows dropped) into arrays on the default device
    tokens, count, logprobs, reason = (jnp.asarray(_gathered(x)[:rows])
                                       for x in (tokens, count, logprobs, reason))
    sequences = jnp.concatenate([jnp.asarray(prompts, jnp.int32), tokens], axis=1)
    return GenerateOutput(tokens=tokens, lengths=count, sequences=sequences,
                          logprobs=logprobs, finish_reason=reason)
