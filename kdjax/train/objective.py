"""The distillation objective: one function from (params, batch) to a token-weighted loss.

    loss = α·CE(student, targets) + (1 − α)·s·D(teacher ‖ student; T)
           + w_h·Σ_layers hidden(h_s·P, h_t) + w_a·Σ_layers attention_kl(a_s, a_t)

with s = T² when `t2_scaling` (Hinton et al., 2015) else 1, α and T optionally optax
schedules of the step, D any divergence of the catalog. The teacher signal is either
offline (rows of the teacher store merged into the batch as `teacher_*` keys) or online
(a teacher `Decoder` run in the same step under `stop_gradient`). By default the
student's logits never exist in full: `kdjax.losses.fused_distill` consumes the final
hidden state and the lm_head chunk by chunk; `fused=False` is the naive reference.

Every term is a `Weighted(sum, count)` over the batch's `loss_mask` tokens, so gradient
accumulation and multi-host reduction divide once, at the end (see `step.py`).

A run builds its Objective from the config (`ObjectiveConfig.build`), which has checked
every value; the Objective itself refuses only combinations that cannot work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax import losses, sharding
from kdjax.losses import divergences
from kdjax.losses.reduce import Weighted, masked_sum_count
from kdjax.schema import ConfigError, check_choice

Schedule = Callable[[jax.Array], jax.Array]
TEACHER_SOURCES = ("store", "online", "none")


def at_step(value: float | Schedule, step: jax.Array) -> float | jax.Array:
    """A static float as is, a schedule evaluated at the (traced) step."""
    return value if isinstance(value, float) else value(step)


@dataclasses.dataclass(frozen=True)
class Objective:
    """What to minimise; all fields static (hashable), built once per run (by
    `kdjax.train.config.ObjectiveConfig.build`, which validates the values).

    Attributes:
      divergence: catalog name (`kdjax.losses.DIVERGENCES`).
      divergence_kwargs: extra static arguments as a tuple of (name, value) pairs.
      alpha: weight of the hard-label CE in [0, 1] (float or schedule). α = 1 is plain
        language-model training (no teacher needed).
      temperature: T > 0 (float or schedule).
      t2_scaling: multiply the divergence by T² (the config's `objective.t2_scaling`).
      teacher_source: "store" (offline), "online" or "none".
      store_manifest: the teacher store's manifest items (tuple of pairs) for offline KD.
      fused: use the chunked fused kernel (default) instead of materialising logits.
      chunk_size: vocabulary/token chunk of the fused kernel (None: its default).
      hidden_layers: ((student_layer, teacher_layer), ...) for the hidden-state term.
      hidden_loss: "mse" | "cosine"; hidden_weight: its weight; hidden_projection: learn
        P `[H_s, H_t]` per pair (student params `params["proj"]["s_t"]`).
      attention_layers: ((student_layer, teacher_layer), ...); attention_weight: weight.
    """

    divergence: str = "forward_kl"
    divergence_kwargs: tuple[tuple[str, Any], ...] = ()
    alpha: float | Schedule = 0.0
    temperature: float | Schedule = 1.0
    t2_scaling: bool = True
    teacher_source: str = "store"
    store_manifest: tuple[tuple[str, Any], ...] = ()
    fused: bool = True
    chunk_size: int | None = None
    hidden_layers: tuple[tuple[int, int], ...] = ()
    hidden_loss: str = "mse"
    hidden_weight: float = 0.0
    hidden_projection: bool = True
    attention_layers: tuple[tuple[int, int], ...] = ()
    attention_weight: float = 0.0

    def __post_init__(self):
        check_choice(self.teacher_source, TEACHER_SOURCES, "Objective.teacher_source")
        if self.uses_teacher and self.teacher_source == "none":
            raise ConfigError("the objective needs a teacher (alpha < 1 or hidden/attention "
                             "terms) but teacher_source='none'; set alpha=1.0 or a teacher")
        if self.attention_layers and self.teacher_source != "online":
            raise ConfigError("attention terms need teacher_source='online' (the teacher "
                             "store does not hold attention scores)")

    @property
    def kd_active(self) -> bool:
        return not (isinstance(self.alpha, float) and self.alpha == 1.0)

    @property
    def uses_teacher(self) -> bool:
        return self.kd_active or bool(self.hidden_layers) or bool(self.attention_layers)

    def projection_shapes(self, student_hidden: int, teacher_hidden: int) -> dict[str, tuple]:
        """Learned projections P `[H_s, H_t]` (student params) for each hidden-layer pair."""
        if not self.hidden_projection:
            return {}
        return {f"{s}_{t}": (student_hidden, teacher_hidden) for s, t in self.hidden_layers}

    def __call__(self, params: dict, batch: Mapping[str, jax.Array], *, graphdef,
                 step: jax.Array, teacher: tuple | None = None, rest=None, mesh=None
                 ) -> tuple[Weighted, dict[str, Weighted]]:
        """The loss on one (micro-)batch.

        Args:
          params: `{"model": pure dict of student nnx.Params, "proj": {name: [H_s, H_t]}}`.
          batch: `tokens, targets [B, L] int32`, `loss_mask [B, L] bool`, `segment_ids,
            positions [B, L] int32`, and for offline KD the `teacher_*` arrays `[B, L, ...]`.
          graphdef: the student's nnx GraphDef; rest: its non-Param state (or None).
          step: the optimizer step (int32 scalar), for the α and T schedules.
          teacher: `(graphdef, params, rest)` of an online teacher, or None.
          mesh: the device mesh the step runs on, or None (one device). With a mesh the
            fused loss runs on each device's own tokens (`fused_loss`).

        Returns:
          `(loss, metrics)`: loss as Weighted(Σ_tokens loss, Σ loss_mask) in f32, and
          Weighted metrics "loss", "ce" and, when active, "kd", "hidden", "attention".
          All terms share the count Σ loss_mask, so their weighted sum is the loss.
        """
        model = merge(graphdef, params["model"], rest)
        out = model(batch["tokens"], segment_ids=batch["segment_ids"],
                    positions=batch["positions"], return_logits=not self.fused,
                    hidden_layers=tuple(sorted({s for s, _ in self.hidden_layers})),
                    attention_layers=tuple(sorted({s for s, _ in self.attention_layers})))
        t_out = self._online_teacher(batch, teacher) if self.teacher_source == "online" else None
        alpha, temp = at_step(self.alpha, step), at_step(self.temperature, step)
        scale = (1.0 - alpha) * (temp * temp if self.t2_scaling else 1.0)
        if self.fused:
            total, metrics = _fused_logit_terms(self, model, out, t_out, batch, alpha=alpha,
                                                scale=scale, temperature=temp, mesh=mesh)
        else:
            metrics = _naive_logit_terms(self, out, t_out, batch, temperature=temp)
            total = _combine(metrics, {"ce": alpha, "kd": scale})
        mask = batch["loss_mask"]
        if self.hidden_layers:
            metrics["hidden"] = masked_sum_count(
                _hidden_term(self, out, t_out, batch, params.get("proj", {})), mask)
            total = _plus(total, _combine(metrics, {"hidden": self.hidden_weight}))
        if self.attention_layers:
            metrics["attention"] = masked_sum_count(_attention_term(self, out, t_out, batch),
                                                    mask)
            total = _plus(total, _combine(metrics, {"attention": self.attention_weight}))
        metrics["loss"] = total
        return total, metrics

    def _online_teacher(self, batch, teacher):
        if teacher is None:
            raise ValueError("teacher_source='online' but no teacher model was given")
        t_model = merge(*teacher)
        t_out = t_model(batch["tokens"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"], return_logits=not self.fused,
                        hidden_layers=tuple(sorted({t for _, t in self.hidden_layers})),
                        attention_layers=tuple(sorted({t for _, t in self.attention_layers})))
        # The teacher is a constant of the step: no gradient, no optimizer state.
        fields = {f.name: jax.lax.stop_gradient(getattr(t_out, f.name))
                  for f in dataclasses.fields(t_out)}
        return dataclasses.replace(t_out, **fields), jax.lax.stop_gradient(t_model.lm_head())


def merge(graphdef, params, rest=None):
    """nnx.merge of a GraphDef with pure-dict params (and the non-Param rest, if any)."""
    return nnx.merge(graphdef, params, *(() if rest is None else (rest,)))


def _combine(metrics: dict[str, Weighted], weights: dict[str, Any]) -> Weighted:
    """Σ_k w_k·sum_k over terms that share one count (the loss_mask tokens)."""
    names = [k for k in weights if k in metrics]
    total = sum(weights[k] * metrics[k].sum for k in names)
    return Weighted(jnp.asarray(total, jnp.float32), metrics[names[0]].count)


def _plus(a: Weighted, b: Weighted) -> Weighted:
    """Adds two terms over the same tokens: sums add, the token count stays (not `a + b`,
    which would count the tokens twice)."""
    return Weighted(a.sum + b.sum, a.count)


# ---------------------------------------------------------------- logit terms


def _flat(x: jax.Array) -> jax.Array:
    """`[B, L, ...]` → `[B·L, ...]`."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _store_teacher(obj: Objective, batch):
    """The offline teacher signal of the batch as a fused-kernel teacher, flattened `[N, ...]`."""
    from kdjax.teacher import teacher_from_batch

    return teacher_from_batch(batch, dict(obj.store_manifest), flatten=True)


def fused_loss(mesh, lm_head):
    """`fused_distill` on one device, or over `mesh` with each device on its own tokens
    (tokens over the batch axes, vocabulary over the tensor axis; `kdjax.sharding`)."""
    from kdjax.losses import fused

    if mesh is None:
        return fused.fused_distill
    h, v = lm_head.shape
    return functools.partial(fused.sharded_fused_distill, mesh=mesh,
                             **sharding.fused_loss_axes(mesh, h, v))


def _fused_logit_terms(obj, model, out, t_out, batch, *, alpha, scale, temperature, mesh):
    """α·CE + scale·D through the fused kernel (no `[N, V]` logits beyond one chunk)."""
    from kdjax.losses import fused

    hidden, mask, targets = _flat(out.hidden), _flat(batch["loss_mask"]), _flat(
        batch["targets"])
    lm_head = model.lm_head(model.config.param_dtype)  # its f32 gradient reaches the masters
    loss_fn = fused_loss(mesh, lm_head)
    if not obj.kd_active:  # plain language-model training: the CE sweep alone
        w, m = loss_fn(hidden, lm_head, None, targets=targets, mask=mask, ce_weight=1.0,
                       chunk_size=obj.chunk_size)
        return w, {"ce": m["ce"]}
    if obj.teacher_source == "online":
        (t, t_head) = t_out
        teacher = fused.TeacherHead(_flat(t.hidden), t_head)
    else:
        teacher = _store_teacher(obj, batch)
    # Both weights go into the kernel (not α/scale with the loss scaled back): it rounds
    # each term's 16-bit gradient on its own, so near α = 1 the KD term is not lost.
    w, m = loss_fn(hidden, lm_head, teacher, targets=targets, mask=mask,
                   divergence=obj.divergence, temperature=temperature, ce_weight=alpha,
                   kd_weight=scale, chunk_size=obj.chunk_size, **dict(obj.divergence_kwargs))
    return w, {"ce": m["ce"], "kd": m["divergence"]}


def _naive_logit_terms(obj, out, t_out, batch, *, temperature):
    """Reference path: full `[B, L, V]` student logits and the catalog kernels."""
    logits, mask = out.logits, batch["loss_mask"]
    metrics = {"ce": masked_sum_count(divergences.cross_entropy(logits, batch["targets"]),
                                      mask)}
    if not obj.kd_active:
        return metrics
    kw = dict(obj.divergence_kwargs)
    if obj.teacher_source == "online":
        t_logits = t_out[0].logits[..., :logits.shape[-1]]  # padded teacher vocab rows
        kd = divergences.divergence(obj.divergence, logits, t_logits, temperature=temperature,
                                    **kw)
    else:
        kd = _naive_store_kd(obj, logits, batch, temperature=temperature)
    metrics["kd"] = masked_sum_count(kd, mask)
    return metrics


def _naive_store_kd(obj, logits, batch, *, temperature):
    """Per-token divergence to the stored signal, with the full student softmax `[B, L]`."""
    mode = dict(obj.store_manifest).get("mode")
    if mode == "dense":
        return divergences.divergence(obj.divergence, logits, batch["teacher_logits"],
                                      temperature=temperature, **dict(obj.divergence_kwargs))
    if obj.divergence != "forward_kl":
        raise ValueError(f"the naive path supports only forward_kl with a {mode!r} store, got "
                         f"divergence={obj.divergence!r}; use fused=True or a dense store")
    z = logits.astype(jnp.float32) / temperature
    ids = batch["teacher_ids"].astype(jnp.int32)
    if mode == "sampled":
        return losses.sampled_forward_kl(z, ids, batch["teacher_counts"], num_samples=int(
            dict(obj.store_manifest)["num_samples"]))
    if mode == "topk":
        return losses.sparse_forward_kl(z, ids, batch["teacher_logprobs"], tail="renormalize")
    raise ValueError(f"unknown teacher store mode {mode!r}; expected dense | topk | sampled")


# ---------------------------------------------------------------- hidden and attention


def _teacher_hidden(t_out, batch, layer):
    if t_out is not None:
        return t_out[0].hidden_states[layer]
    key = f"teacher_hidden_{layer}"
    if key not in batch:
        raise ValueError(f"hidden term needs teacher layer {layer}, but the batch has no "
                         f"{key!r}; precompute the store with that layer, or go online")
    return batch[key]


def _hidden_term(obj: Objective, out, t_out, batch, proj) -> jax.Array:
    """Σ over layer pairs of `hidden_mse` / `hidden_cosine` per token `[B, L]` (f32)."""
    fn = getattr(losses, f"hidden_{obj.hidden_loss}")  # kdjax.catalog.HIDDEN_LOSSES
    return sum(fn(out.hidden_states[s], _teacher_hidden(t_out, batch, t), proj.get(f"{s}_{t}"))
               for s, t in obj.hidden_layers)


def _attention_term(obj: Objective, out, t_out, batch) -> jax.Array:
    """Σ over layer pairs of `attention_kl` (MiniLM) per query token `[B, L]` (f32).

    Keys outside the query's segment or in its future are removed from both softmaxes.
    """
    seg = batch["segment_ids"]
    length = seg.shape[-1]
    allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & jnp.tril(
        jnp.ones((length, length), bool))[None, None]
    return sum(losses.attention_kl(out.attention_scores[s], t_out[0].attention_scores[t],
                                   key_mask=allowed)
               for s, t in obj.attention_layers)
