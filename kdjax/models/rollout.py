"""Rollouts: completions sampled from a decoder inside a jitted computation (the
on-policy half of GKD, Agarwal et al. 2024, and MiniLLM, Gu et al. 2024), and the one
KV-cache decode loop that `kdjax.models.generate` runs as well.

`rollout` is pure and traceable: a train step calls it on the current (stop-gradient)
student parameters, with fixed shapes and no host round trip. Prompts are prefilled in
one forward into a cache of `P + max_new_tokens` slots; then one `lax.while_loop` runs
a decode forward and a token choice per step and stops as soon as every row has ended
(all shapes static; the loop is not differentiable, and need not be: nothing flows
through sampling). On CPU the decode step runs the layers one by one on separate
weight buffers and per-layer head-major caches (`Decoder(..., blocks=...)`), which XLA
reads in place; elsewhere it scans the stacked layers. An optional teacher keeps its
own KV cache in the same loop, so its log-probs of the sampled tokens come for free and
MiniLLM's teacher-mixed sampling (`mix_alpha`) draws each token from `α·p + (1−α)·q`.

Row r's tokens depend only on its prompt, its key `keys[r]` (step t draws Gumbel noise
from `fold_in(keys[r], t)`) and the models, never on the other rows, so a batch can be
split into micro-batches or over devices without changing any sample.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kdjax import platform
from kdjax.sharding import constrain

from .sampling import check_sampling_args, num_candidates, select_tokens


@struct.dataclass
class RolloutOutput:
    """What `rollout` returns (`C` = max_new_tokens). After a row ends, `tokens` hold
    `pad_id` and every log-prob array holds 0.

    Attributes:
      tokens: `[B, C]` int32 sampled ids.
      lengths: `[B]` int32 generated tokens, the stop token included.
      finished: `[B]` bool, the row emitted a stop id (else it ran C tokens).
      logprobs: `[B, C]` f32 `log q(y_t)`: the student at temperature 1 (raw logits, no
        filter), the `log q_old` of importance ratios.
      sample_logprobs: `[B, C]` f32 log-probability of y_t under the distribution it was
        actually drawn from: temperature, top-k / top-p and the teacher mixture applied
        (0 when greedy). `exp(logprobs - sample_logprobs)` is the importance weight
        `q(y_t) / m(y_t)` of the temperature-1 student against the sampling distribution
        m; at temperature 1 without filters and with `mix_alpha` it is exactly MiniLLM's
        `q / (α·p + (1−α)·q)`.
      teacher_logprobs: `[B, C]` f32 `log p(y_t)`, the teacher at temperature 1; None
        without a teacher.
    """

    tokens: jax.Array
    lengths: jax.Array
    finished: jax.Array
    logprobs: jax.Array
    sample_logprobs: jax.Array
    teacher_logprobs: jax.Array | None = None


class Sampling(NamedTuple):
    """How each token is chosen: static flags (`greedy`, `filtered` = top-k or top-p on,
    `candidates` = `num_candidates`) and scalars that may be traced (`temperature` > 0,
    `top_k` 0 = off, `top_p` 1 = off); see `sampling.select_tokens`."""

    greedy: bool
    filtered: bool
    candidates: int
    temperature: Any
    top_k: Any
    top_p: Any


def sampling_for(vocab_size: int, temperature: float, top_k: int | None,
                 top_p: float | None) -> Sampling:
    """The `Sampling` of checked Python values (errors name the bad one)."""
    check_sampling_args(vocab_size, temperature, top_k, top_p)
    greedy = temperature == 0
    filtered = not greedy and (top_k is not None or (top_p is not None and top_p < 1))
    return Sampling(greedy, filtered, num_candidates(vocab_size, top_k) if filtered else 0,
                    jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k or 0),
                    jnp.float32(1.0 if top_p is None else top_p))


def init_cache(config, batch: int, length: int, dtype=None) -> dict:
    """An empty KV cache: `layers: {"k", "v"}: [num_layers, B, length, kv_heads, head_dim]`
    (stacked on the layer axis like the blocks' parameters), key `segment_ids [B, length]`
    (0 = empty) and the next write `index`. Under a mesh the rows are split like the
    batch."""
    dtype = dtype or config.dtype
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    axes = ("layers", "batch", "length", "kv_heads", "head_dim")
    layers = {name: constrain(jnp.zeros(shape, dtype), axes) for name in ("k", "v")}
    return {"layers": layers,
            "segment_ids": constrain(jnp.zeros((batch, length), jnp.int32),
                                     ("batch", "length")),
            "index": jnp.zeros((), jnp.int32)}


def unstack_cache(cache: dict) -> dict:
    """A stacked cache (`init_cache`) as the per-layer head-major caches that
    `Decoder(..., blocks=...)` reads: `layers` becomes a tuple of `{"k", "v"}: [B,
    kv_heads, S, head_dim]` (one transposed copy, made once)."""
    axes = ("batch", "kv_heads", "length", "head_dim")
    stacked = cache["layers"]
    layers = tuple({name: constrain(stacked[name][i].transpose(0, 2, 1, 3), axes)
                    for name in ("k", "v")} for i in range(stacked["k"].shape[0]))
    return dict(cache, layers=layers)


def rollout(student, prompts: jax.Array, prompt_len: jax.Array, keys: jax.Array, *,
            max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
            teacher=None, mix_alpha: float | None = None) -> RolloutOutput:
    """Samples `max_new_tokens` tokens per row from `student` (pure; call it under jit).

    Args:
      student: `(graphdef, params, rest)` from `nnx.split(model, nnx.Param, ...)` (rest
        may be None: `(graphdef, state)`), or a `Decoder`. Its floating leaves go through
        `lax.stop_gradient` here: no gradient flows through sampling.
      prompts: `[B, P]` int32, left-aligned and right-padded.
      prompt_len: `[B]` int32 real prompt lengths, each in `[1, P]` (not checked: they
        may be traced).
      keys: `[B]` PRNG keys (or `[B, 2]` uint32 raw keys); `keys[r]` drives row r alone.
      max_new_tokens: C, the decode steps (static; the caches hold P + C slots).
      temperature: 0 = greedy (argmax of the student), else sampling from
        `softmax(logits / temperature)` (static).
      top_k, top_p: filters as in `kdjax.models.generate` (static; None = off). With
        `mix_alpha` they apply to the mixture `m` (its log as the logits).
      stop_ids: ids that end a row (static; include the eos). The stop token is kept.
      pad_id: id written after a row ends.
      teacher: `(graphdef, params, rest)` or a `Decoder` with the student's vocabulary:
        its log-probs of the sampled tokens come back as `teacher_logprobs`.
      mix_alpha: α in [0, 1] (needs a teacher and temperature > 0): each token is drawn
        from `m = α·p_T + (1−α)·q_T`, p_T / q_T the teacher / student softmax at the
        sampling temperature (MiniLLM's teacher-mixed sampling); α = 0 draws what the
        student alone draws, α = 1 what the teacher alone draws (same keys; the mixture's
        log-probs differ from the plain logits by a per-row shift, so only an exact float
        tie could differ). A Python number is range-checked; a traced scalar is not.
    Returns:
      `RolloutOutput`; log-prob conventions in its docstring.

    Memory: besides the caches (`2 · layers · B · (P + C) · kv_heads · head_dim` each for
    student and teacher), on CPU a per-layer copy of each model's layer weights lives for
    the call (see `decode`).
    """
    s_model, t_model = _as_model(student), None if teacher is None else _as_model(teacher)
    vocab = s_model.config.vocab_size
    sampling = sampling_for(vocab, temperature, top_k, top_p)
    _check_rollout_args(s_model, t_model, prompts, prompt_len, keys, max_new_tokens,
                        stop_ids, mix_alpha, sampling.greedy)
    out = decode(s_model, jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_len, jnp.int32),
                 keys, sampling, max_new_tokens=int(max_new_tokens),
                 eos=jnp.asarray(list(stop_ids) or [-1], jnp.int32),
                 stop=jnp.asarray([-1], jnp.int32), pad_id=jnp.int32(pad_id), teacher=t_model,
                 mix_alpha=mix_alpha, track_sample=True)
    return RolloutOutput(tokens=out["tokens"], lengths=out["count"],
                         finished=out["reason"] > 0, logprobs=out["logprobs"],
                         sample_logprobs=out["sample_logprobs"],
                         teacher_logprobs=out.get("teacher_logprobs"))


def _as_model(model):
    """A merged `Decoder` of stop-gradient parameters from a model or `(graphdef, *states)`."""
    if isinstance(model, nnx.Module):
        model = nnx.split(model)
    if not isinstance(model, tuple) or len(model) not in (2, 3):
        raise ValueError("a rollout model must be a Decoder or a (graphdef, params, rest) "
                         f"tuple from nnx.split, got {type(model).__name__}")
    graphdef, *states = (m for m in model if m is not None)
    states = [jax.tree.map(_stop, s) for s in states]
    return nnx.merge(graphdef, *states)


def _stop(x):
    return jax.lax.stop_gradient(x) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x


def _check_rollout_args(student, teacher, prompts, prompt_len, keys, max_new_tokens,
                        stop_ids, mix_alpha, greedy: bool) -> None:
    """Checks of the static arguments and shapes (never of traced values)."""
    if len(prompts.shape) != 2 or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be [batch, length>0] token ids, got shape "
                         f"{prompts.shape}")
    b = prompts.shape[0]
    if tuple(prompt_len.shape) != (b,):
        raise ValueError(f"prompt_len must be [{b}] (one per prompt row), got shape "
                         f"{prompt_len.shape}")
    raw = keys.dtype == jnp.uint32 and len(keys.shape) == 2
    if keys.shape[:1] != (b,) or not (raw or jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)):
        raise ValueError(f"keys must be [{b}] PRNG keys (jax.random.split(key, {b})), got "
                         f"shape {keys.shape} dtype {keys.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if any(not isinstance(i, int) or i < 0 for i in stop_ids):
        raise ValueError(f"stop_ids must be a tuple of token ids >= 0, got {stop_ids!r}")
    if teacher is not None and teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from"
                         f" the student's ({student.config.vocab_size}); rollout scores the "
                         "student's token ids with the teacher, so they must share a tokenizer")
    if mix_alpha is None:
        return
    if teacher is None:
        raise ValueError("mix_alpha (teacher-mixed sampling) needs a teacher; pass teacher= "
                         "or mix_alpha=None")
    if greedy:
        raise ValueError("mix_alpha needs temperature > 0: greedy decoding of a mixture is "
                         "not defined; sample (temperature=1.0) or drop mix_alpha")
    if isinstance(mix_alpha, (int, float)) and not 0 <= mix_alpha <= 1:
        raise ValueError(f"mix_alpha must be in [0, 1] (the teacher's share), got {mix_alpha}")


def decode(student, prompts, lengths, keys, sampling: Sampling, *, max_new_tokens: int, eos,
           stop, pad_id, teacher=None, mix_alpha=None, track_sample: bool = False) -> dict:
    """The decode loop shared by `rollout` and `generate` (traceable, no checks).

    Args:
      student, teacher: merged `Decoder`s (teacher optional).
      prompts: `[B, P]` int32 left-aligned; lengths: `[B]` int32; keys: `[B]` keys
        (unused when greedy); eos, stop: `[n]` int32 ids (-1 = none) ending a row with
        reason 1 / 2; pad_id: int32 scalar.
      mix_alpha: None, or the teacher's share of the sampling mixture.
      track_sample: also return `sample_logprobs`.
    Returns:
      `{"tokens", "count", "reason", "logprobs"}` (and "sample_logprobs",
      "teacher_logprobs" when asked / with a teacher), shapes as in `RolloutOutput`.
    """
    b, p = prompts.shape
    models = (student,) if teacher is None else (student, teacher)
    unstack = platform.is_cpu() and max_new_tokens > 1  # no decode step: nothing to gain
    starts = [_prefill(m, *_right_aligned(prompts, lengths, pad_id), p + max_new_tokens,
                       unstack) for m in models]
    heads, blocks, caches, logits = (tuple(x) for x in zip(*starts))
    names = ["tokens", "logprobs"] + ["sample_logprobs"] * track_sample + [
        "teacher_logprobs"] * (teacher is not None)
    outputs = {name: jnp.full((b, max_new_tokens), pad_id if name == "tokens" else 0,
                              jnp.int32 if name == "tokens" else jnp.float32)
               for name in names}
    state = dict(t=jnp.int32(0), done=jnp.zeros((b,), bool), reason=jnp.zeros((b,), jnp.int32),
                 count=jnp.zeros((b,), jnp.int32), outputs=outputs, caches=caches)

    def choose(state, logits):
        """Token t from each model's logits, recorded; returns the new state and the
        token to feed next."""
        t, done = state["t"], state["done"]
        step_keys = (None if sampling.greedy else
                     jax.vmap(lambda k: jax.random.fold_in(k, t))(keys))
        tok, sample_lp = _select(logits, step_keys, sampling, mix_alpha, track_sample)
        values = {"tokens": tok, "logprobs": _logprob(logits[0], tok)}
        if track_sample:
            values["sample_logprobs"] = sample_lp
        if teacher is not None:
            values["teacher_logprobs"] = _logprob(logits[1], tok)
        outputs = {name: jax.lax.dynamic_update_slice(
            buf, jnp.where(done, pad_id if name == "tokens" else 0,
                           values[name]).astype(buf.dtype)[:, None], (0, t))
            for name, buf in state["outputs"].items()}
        hit_eos = ~done & jnp.isin(tok, eos)
        hit_stop = ~done & ~hit_eos & jnp.isin(tok, stop)
        reason = jnp.where(hit_eos, 1, jnp.where(hit_stop, 2, state["reason"]))
        new = dict(state, t=t + 1, done=done | hit_eos | hit_stop, reason=reason,
                   count=state["count"] + (~done).astype(jnp.int32), outputs=outputs)
        return new, jnp.where(done, pad_id, tok)

    def cond(carry):
        state, _ = carry
        return (state["t"] < max_new_tokens) & ~jnp.all(state["done"])

    def body(carry):
        state, tok = carry
        steps = [_step(m, h, blk, tok, lengths + state["t"] - 1, c)
                 for m, h, blk, c in zip(models, heads, blocks, state["caches"])]
        caches, logits = zip(*steps)
        return choose(dict(state, caches=tuple(caches)), logits)

    # token 0 from the prefill's logits; each loop step feeds the previous token, so
    # exactly C - 1 decode forwards run (none after the last token)
    state, _ = jax.lax.while_loop(cond, body, choose(state, logits))
    return {"count": state["count"], "reason": state["reason"], **state["outputs"]}


def _right_aligned(prompts, lengths, pad_id):
    """`(tokens, segment_ids, positions)` `[B, P]`: each prompt moved to end at slot P - 1
    (so every row's next token goes to slot P), padding slots first, in segment 0."""
    p = prompts.shape[1]
    shift = p - lengths
    slots = jnp.arange(p, dtype=jnp.int32)[None, :]
    real = slots >= shift[:, None]
    src = jnp.clip(slots - shift[:, None], 0, p - 1)
    tokens = jnp.where(real, jnp.take_along_axis(prompts, src, axis=1), pad_id)
    return tokens, real.astype(jnp.int32), jnp.where(real, slots - shift[:, None], 0)


def _prefill(model, tokens, segments, positions, cache_len: int, unstack: bool):
    """One forward of the prompts into a new cache: `(lm_head, blocks, cache, logits [B,
    V] f32)`. With `unstack` (CPU) the decode steps then run separate per-layer weights
    (`blocks`) and per-layer head-major caches, made here, once: a scanned step would
    copy every layer's weights and cache out of their stacks on every step (the decode
    program then grows with depth; the prefill stays scanned). Else `blocks` is None."""
    lm_head = model.lm_head()
    cache = init_cache(model.config, tokens.shape[0], cache_len)
    # an opaque index: with the literal 0, XLA constant-folds the (empty) cache's masked
    # scores, seconds of compile time at larger batches
    cache["index"] = jax.lax.optimization_barrier(cache["index"])
    out = model(tokens, segment_ids=segments, positions=positions, cache=cache,
                return_logits=False)
    blocks, cache = None, out.cache
    if unstack:
        blocks, cache = model.unstacked_blocks(), unstack_cache(cache)
    return lm_head, blocks, cache, _logits(out.hidden[:, -1], lm_head)


def _step(model, lm_head, blocks, tok, positions, cache):
    """One decode forward of `tok [B]` at `positions [B]`: `(cache, logits [B, V] f32)`."""
    out = model(tok[:, None], segment_ids=jnp.ones((tok.shape[0], 1), jnp.int32),
                positions=positions[:, None], cache=cache, return_logits=False,
                blocks=blocks)
    return out.cache, _logits(out.hidden[:, -1], lm_head)


def _logits(hidden, lm_head):
    return jnp.einsum("bh,hv->bv", hidden, lm_head).astype(jnp.float32)


def _logprob(logits, tok):
    """`log_softmax(logits)[r, tok[r]]` `[B]`."""
    picked = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _select(logits, keys, sampling: Sampling, mix_alpha, with_logprob: bool):
    """`(tokens [B], sample log-probs [B] | None)` from the student's (and teacher's)
    logits; with `mix_alpha`, from the log of the mixture at temperature 1."""
    s = sampling
    if mix_alpha is None:
        z, temperature = logits[0], s.temperature
    else:
        alpha = jnp.asarray(mix_alpha, jnp.float32)
        log_q = jax.nn.log_softmax(logits[0] / s.temperature, axis=-1)
        log_p = jax.nn.log_softmax(logits[1] / s.temperature, axis=-1)
        # log(α p + (1 − α) q); α = 0 or 1 gives exactly one side (log 0 = -inf)
        z = jnp.logaddexp(jnp.log(alpha) + log_p, jnp.log1p(-alpha) + log_q)
        temperature = jnp.float32(1.0)
    out = select_tokens(z, keys, temperature, s.top_k, s.top_p, greedy=s.greedy,
                        filtered=s.filtered, candidates=s.candidates,
                        with_logprob=with_logprob)
    return out if with_logprob else (out, None)
