"""Held-out evaluation: CE / perplexity, KL(teacher ‖ student) at T = 1, top-1 agreement.

All metrics are token-weighted `Weighted(sum, count)` over `loss_mask` tokens, summed over
eval batches and divided once. The teacher signal is, in order of preference: an online
teacher model (exact), a dense or top-k store on the eval data (exact / renormalized
over the top-k), or a sampled store (KL estimated from t̂ = counts/N, top-1 = the most
drawn id). Without a teacher only CE and perplexity are reported.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.losses import divergences
from kdjax.losses.reduce import Weighted, masked_sum_count
from kdjax.train.objective import merge

EvalFn = Callable[[Any, Any, Mapping[str, jax.Array]], dict[str, Weighted]]


def _forward(model, batch):
    return model(batch["tokens"], segment_ids=batch["segment_ids"],
                 positions=batch["positions"]).logits.astype(jnp.float32)


def _store_terms(logq, batch, manifest) -> tuple[jax.Array, jax.Array]:
    """Per-token KL(p ‖ q) `[B, L]` and the teacher's top-1 id `[B, L]` from stored signal."""
    mode = manifest["mode"]
    if mode == "dense":
        logp = jax.nn.log_softmax(batch["teacher_logits"].astype(jnp.float32), axis=-1)
        kl = jnp.sum(divergences.pointwise_terms("forward_kl", logp, logq), axis=-1)
        return kl, jnp.argmax(logp, axis=-1)
    ids = batch["teacher_ids"].astype(jnp.int32)
    logq_ids = jnp.take_along_axis(logq, ids, axis=-1)
    if mode == "topk":
        logp = batch["teacher_logprobs"].astype(jnp.float32)
        logp = logp - jax.nn.logsumexp(logp, axis=-1, keepdims=True)
        kl = jnp.sum(jnp.exp(logp) * (logp - logq_ids), axis=-1)
        weights = logp
    else:  # sampled: the t̂ = counts/N estimate
        t_hat = batch["teacher_counts"].astype(jnp.float32) / float(manifest["num_samples"])
        live = t_hat > 0
        log_t = jnp.log(jnp.where(live, t_hat, 1.0))
        kl = jnp.sum(jnp.where(live, t_hat * (log_t - logq_ids), 0.0), axis=-1)
        weights = t_hat
    top = jnp.take_along_axis(ids, jnp.argmax(weights, axis=-1)[..., None], axis=-1)[..., 0]
    return kl, top


def make_eval_fn(graphdef, mesh: Mesh, *, teacher: tuple | None = None,
                 store_manifest: Mapping[str, Any] | None = None) -> EvalFn:
    """A jitted `eval_fn(params, rest, batch) -> {"ce", "kl_teacher", "top1_agreement"}`.

    Args:
      graphdef: the student's nnx GraphDef.
      mesh: the device mesh (the results are replicated).
      teacher: `(graphdef, params, rest)` of a teacher model, or None.
      store_manifest: the eval teacher store's manifest (when the batch carries
        `teacher_*` arrays), or None.
    """
    keep = ("mode", "num_samples")  # all the eval reads from the manifest (hashable)
    manifest = tuple((k, store_manifest[k]) for k in keep if k in (store_manifest or {}))
    jitted = _jitted_eval(graphdef, mesh, None if teacher is None else teacher[0], manifest)
    t_arrays = (teacher[1], teacher[2]) if teacher is not None else (None, None)
    return lambda params, rest, batch: jitted(params, rest, dict(batch), t_arrays)


@functools.lru_cache(maxsize=16)
def _jitted_eval(graphdef, mesh, t_graphdef, manifest):
    """One compiled eval per (student, teacher, store) structure, shared between runs."""
    manifest = dict(manifest)

    def eval_fn(params, rest, batch, t_arrays):
        logits = _forward(merge(graphdef, params, rest), batch)
        mask = batch["loss_mask"]
        out = {"ce": masked_sum_count(divergences.cross_entropy(logits, batch["targets"]),
                                      mask)}
        logq = jax.nn.log_softmax(logits, axis=-1)
        if t_graphdef is not None:
            t_logits = _forward(merge(t_graphdef, *t_arrays), batch)
            t_logits = t_logits[..., :logits.shape[-1]]  # padded teacher vocab rows
            logp = jax.nn.log_softmax(t_logits, axis=-1)
            kl = jnp.sum(divergences.pointwise_terms("forward_kl", logp, logq), axis=-1)
            top = jnp.argmax(t_logits, axis=-1)
        elif manifest:
            kl, top = _store_terms(logq, batch, manifest)
        else:
            return out
        out["kl_teacher"] = masked_sum_count(kl, mask)
        out["top1_agreement"] = masked_sum_count(
            (jnp.argmax(logits, axis=-1) == top).astype(jnp.float32), mask)
        return out

    return jax.jit(eval_fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def evaluate(eval_fn: EvalFn, params, rest, batches) -> dict[str, float]:
    """Runs `eval_fn` over `batches` and returns token-weighted means (and perplexity).

    Returns:
      `{"ce", "perplexity"[, "kl_teacher", "top1_agreement"], "tokens"}` as floats.
    """
    total: dict[str, Weighted] | None = None
    for batch in batches:
        out = eval_fn(params, rest, batch)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    if total is None:
        raise ValueError("evaluate got no batches; check eval.batches and the eval store")
    total = jax.device_get(total)
    result = {k: float(w.sum) / max(float(w.count), 1.0) for k, w in total.items()}
    result["perplexity"] = math.exp(min(result["ce"], 50.0))
    result["tokens"] = float(total["ce"].count)
    return result
