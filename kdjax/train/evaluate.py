"""Held-out evaluation: CE / perplexity, KL(teacher ‖ student) at T = 1, top-1 agreement.

All metrics are token-weighted `Weighted(sum, count)` over `loss_mask` tokens, summed over
eval batches and divided once. They come from the fused kernel's forward sweep (the
`[B, L, V]` logits never exist; over a mesh each device evaluates its own tokens). The
teacher signal is, in order of preference: an online teacher model (exact), a dense or
top-k store on the eval data (exact / renormalized over the top-k), or a sampled store
(KL estimated from t̂ = counts/N, top-1 = the most drawn id). Without a teacher only CE
and perplexity are reported.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.losses.reduce import Weighted
from kdjax.train.objective import fused_loss, merge

EvalFn = Callable[[Any, Any, Mapping[str, jax.Array]], dict[str, Weighted]]


def _forward(model, batch):
    """`(hidden [B·L, H], lm_head [H, V])` of a model on a batch (no logits)."""
    out = model(batch["tokens"], segment_ids=batch["segment_ids"],
                positions=batch["positions"], return_logits=False)
    return out.hidden.reshape(-1, out.hidden.shape[-1]), model.lm_head()


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

    def eval_fn(params, rest, batch):
        return jitted(params, rest, dict(batch), t_arrays)

    eval_fn.jitted = jitted  # `jitted(params, rest, batch, (t_params, t_rest))`, for AOT
    return eval_fn


@functools.lru_cache(maxsize=16)
def _jitted_eval(graphdef, mesh, t_graphdef, manifest):
    """One compiled eval per (student, teacher, store) structure, shared between runs."""
    from kdjax.losses import TeacherHead
    from kdjax.teacher import teacher_from_batch

    manifest = dict(manifest)

    def eval_fn(params, rest, batch, t_arrays):
        hidden, lm_head = _forward(merge(graphdef, params, rest), batch)
        teacher = None
        if t_graphdef is not None:
            teacher = TeacherHead(*jax.lax.stop_gradient(
                _forward(merge(t_graphdef, *t_arrays), batch)))
        elif manifest:
            teacher = teacher_from_batch(batch, manifest, flatten=True)
        flat = lambda x: x.reshape(-1)
        _, m = fused_loss(mesh, lm_head)(hidden, lm_head, teacher,
                                         targets=flat(batch["targets"]),
                                         mask=flat(batch["loss_mask"]), divergence="forward_kl",
                                         temperature=1.0, with_top1=teacher is not None)
        out = {"ce": m["ce"]}
        if teacher is not None:
            out["kl_teacher"] = m["divergence"]
            out["top1_agreement"] = m["top1_agreement"]
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
