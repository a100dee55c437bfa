"""The pure train step: `train_step(state, batch) -> (state, metrics)`, jitted once.

One step = k micro-batches scanned in order, each contributing the *sum* of its
per-token loss and the gradient of that sum; the gradient is divided by the total token
count once, after the scan (token-weighted: k micro-batches equal one big batch, and
since arrays are global, hosts are summed by the same reduction). Then a guard: a
non-finite loss or gradient skips the update (params and optimizer state unchanged),
counts it, and the loop stops after several in a row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax.losses.reduce import Weighted
from kdjax.train.objective import Objective
from kdjax.train.state import TrainState, state_shardings

Batch = Mapping[str, jax.Array]


def _micro_batches(batch: Batch, k: int, sharding_of) -> dict[str, jax.Array]:
    """`[B, ...]` → `[k, B/k, ...]` where micro-batch i holds rows i, i+k, i+2k, ….

    Strided rows keep every device's share of each micro-batch equal (rows are laid out
    contiguously per device along the batch axis), so no data moves between devices.
    """
    def split(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"global batch {b} is not divisible by micro_batches={k}; "
                             "choose micro_batches dividing the per-device batch")
        x = x.reshape(b // k, k, *x.shape[1:])
        x = jax.lax.with_sharding_constraint(x, sharding_of(x.ndim, 0))
        return jnp.swapaxes(x, 0, 1)

    return {name: split(x) for name, x in batch.items()}


def make_train_step(objective: Objective, tx: optax.GradientTransformation, *,
                    state: TrainState, mesh: Mesh, batch_sharding: NamedSharding,
                    micro_batches: int = 1, lr_schedule: optax.Schedule | None = None,
                    teacher: tuple | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds the jitted step (compiled on first call, never again for the same shapes).

    Args:
      objective: the loss (static).
      tx: the optax transformation (AdamW + clipping, see `OptimizerConfig.build`).
      state: a placed state; only its shardings and structure are used.
      mesh: the device mesh.
      batch_sharding: the sharding of every batch array (batch dimension first), e.g.
        the loader's `Loader.sharding`.
      micro_batches: k ≥ 1 gradient-accumulation micro-batches per step.
      lr_schedule: reported as the "learning_rate" metric when given.
      teacher: `(graphdef, params, rest)` of an online teacher: passed to the jitted
        function as an argument (not baked in as a constant), never differentiated.

    Returns:
      `train_step(state, batch) -> (state, metrics)`; metrics hold `Weighted` loss terms
      and scalars "grad_norm", "learning_rate", "skipped", "nonfinite".
    """
    t_graphdef, t_params, t_rest = teacher if teacher is not None else (None, None, None)
    state_sh = state_shardings(state, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    data_axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None

    def sharding_of(ndim, batch_dim):
        spec = [None] * ndim
        spec[batch_dim] = data_axes
        return NamedSharding(mesh, PartitionSpec(*spec))

    def loss_sum(params, rest, mb, step, teacher_arrays):
        t = None if t_graphdef is None else (t_graphdef, *teacher_arrays)
        loss, metrics = objective(params, mb, graphdef=state.graphdef, step=step, teacher=t,
                                  rest=rest, mesh=mesh)
        return loss.sum, metrics

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    prepare = getattr(objective, "prepare", None)

    def prepared(st: TrainState, mb, teacher_arrays):
        """The micro-batch the loss reads: as loaded, or (on-policy objectives) with
        completions sampled from the current params, outside the gradient."""
        if prepare is None:
            return mb
        t = None if t_graphdef is None else (t_graphdef, *teacher_arrays)
        return prepare(st.params, mb, graphdef=st.graphdef, rest=st.rest, rng=st.rng,
                       step=st.step, teacher=t)

    reuse = int(getattr(objective, "updates_per_rollout", 1))

    def reused_rollout_step(st: TrainState, mbs, teacher_arrays):
        """k = `updates_per_rollout` updates on one rollout (PPO-style reuse): every
        micro-batch is sampled once from the step's starting params, then k guarded
        updates each take the whole step's gradient on those samples (the importance
        ratios q_θ/q_old move away from 1, which the PPO clip bounds). The step counter
        advances once; optax counts k updates (the loop sizes schedules for that)."""
        pmbs = jax.lax.map(lambda mb: prepared(st, mb, teacher_arrays), mbs)

        def update(s: TrainState, _):
            def body(carry, mb):
                g_acc, m_acc = carry
                (_, metrics), g = grad_fn(s.params, s.rest, mb, st.step, teacher_arrays)
                return (jax.tree.map(jnp.add, g_acc, g),
                        jax.tree.map(jnp.add, m_acc, metrics)), None

            first = jax.tree.map(lambda x: x[0], pmbs)
            zeros_m = jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: grad_fn(s.params, s.rest, first, st.step, teacher_arrays)[0][1]))
            (g_sum, metrics), _ = jax.lax.scan(
                body, (jax.tree.map(jnp.zeros_like, s.params), zeros_m), pmbs)
            count = jnp.maximum(metrics["loss"].count, 1.0)
            new, out = _guarded_update(s, jax.tree.map(lambda g: g / count, g_sum), metrics,
                                       tx, lr_schedule)
            return dataclasses.replace(new, step=st.step), out

        last, outs = jax.lax.scan(update, st, None, length=reuse)
        metrics = jax.tree.map(lambda x: x[0], outs)  # the first update: on-policy values
        metrics["skipped"] = jnp.sum(outs["skipped"])
        metrics["nonfinite"] = outs["nonfinite"][-1]
        return dataclasses.replace(last, step=st.step + 1), metrics

    def step_fn(st: TrainState, batch: Batch, teacher_arrays):
        mbs = _micro_batches(batch, micro_batches, sharding_of)
        if reuse > 1:
            return reused_rollout_step(st, mbs, teacher_arrays)

        def body(carry, mb):
            g_acc, m_acc = carry
            mb = prepared(st, mb, teacher_arrays)
            (_, metrics), g = grad_fn(st.params, st.rest, mb, st.step, teacher_arrays)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, metrics)), None

        zeros_g = jax.tree.map(jnp.zeros_like, st.params)
        zeros_m = jax.tree.map(jnp.zeros_like, jax.eval_shape(
            lambda: grad_fn(st.params, st.rest, prepared(
                st, jax.tree.map(lambda x: x[0], mbs), teacher_arrays), st.step,
                teacher_arrays)[0][1]))
        (g_sum, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), mbs)
        count = jnp.maximum(metrics["loss"].count, 1.0)
        grads = jax.tree.map(lambda g: g / count, g_sum)
        return _guarded_update(st, grads, metrics, tx, lr_schedule)

    jitted = jax.jit(step_fn, donate_argnums=0,
                     in_shardings=(state_sh, batch_sharding, _teacher_sharding(t_params, t_rest)),
                     out_shardings=(state_sh, replicated))

    def train_step(st: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        return jitted(st, dict(batch), (t_params, t_rest))

    train_step.jitted = jitted  # for AOT lowering (memory analysis) and trace counting
    return train_step


def _teacher_sharding(t_params, t_rest):
    def one(x):
        return x.sharding if hasattr(x, "sharding") else None
    return (jax.tree.map(one, t_params), jax.tree.map(one, t_rest))


def _guarded_update(st: TrainState, grads, metrics: dict[str, Weighted], tx, lr_schedule):
    """Applies the update only when loss and gradient are finite; counts skips."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"].mean()) & jnp.isfinite(grad_norm)

    def apply(_):
        updates, opt_state = tx.update(grads, st.opt_state, st.params)
        return optax.apply_updates(st.params, updates), opt_state

    def skip(_):
        return st.params, st.opt_state

    params, opt_state = jax.lax.cond(finite, apply, skip, None)
    skipped = (~finite).astype(jnp.int32)
    new = TrainState(step=st.step + 1, params=params, opt_state=opt_state, rng=st.rng,
                     nonfinite=jnp.where(finite, 0, st.nonfinite + 1),
                     nonfinite_total=st.nonfinite_total + skipped, rest=st.rest,
                     graphdef=st.graphdef)
    out = dict(metrics)
    out["grad_norm"] = grad_norm
    out["skipped"] = skipped
    out["nonfinite"] = new.nonfinite
    if lr_schedule is not None:
        out["learning_rate"] = jnp.asarray(lr_schedule(st.step), jnp.float32)
    return new, out
