"""The training state: student params (f32 masters), AdamW state, step, RNG, guard counters.

The student is an nnx module split once into a static `GraphDef` and pure-dict params,
so the state is a plain pytree that orbax saves, optax updates and `jax.jit` shards.
Learned projections of the hidden-state loss are student params too (`params["proj"]`)
but are never exported with the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kdjax import sharding as shd


def decay_mask(params):
    """The AdamW weight-decay mask of `OptimizerConfig.build`: weight matrices only, the
    student's per `weight_decay_mask` (its stacked layers carry a leading "layers" axis,
    so `ndim` alone cannot tell a norm scale `[layers, H]` from a matrix), every learned
    projection; nothing else."""
    from kdjax.models import weight_decay_mask

    out = {k: jax.tree.map(lambda x: x.ndim >= 2, v) for k, v in params.items()}
    if "model" in params:
        out["model"] = weight_decay_mask(params["model"])
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step reads and writes; `graphdef` is static (part of the treedef).

    Attributes:
      step: int32 `[]` number of optimizer steps taken (skipped updates count too, so
        the data position and the schedules advance deterministically).
      params: `{"model": pure dict of f32 nnx.Params, "proj": {name: f32 [H_s, H_t]}}`.
      opt_state: optax state for `params` (f32).
      rng: uint32 `[2]` base key; step keys are `fold_in(rng, step)` (resume-exact).
      nonfinite: int32 `[]` consecutive skipped (non-finite) updates.
      nonfinite_total: int32 `[]` skipped updates over the whole run.
      rest: the student's non-Param nnx state (pure dict), never updated.
      graphdef: the student's nnx GraphDef (static).
    """

    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array
    nonfinite: jax.Array
    nonfinite_total: jax.Array
    rest: Any = None
    graphdef: Any = dataclasses.field(default=None, metadata=dict(static=True))

    def model(self):
        """The student as an nnx module (views the current params)."""
        return nnx.merge(self.graphdef, self.params["model"],
                         *(() if self.rest is None else (self.rest,)))


def split_model(model: nnx.Module) -> tuple[Any, dict, dict | None]:
    """`(graphdef, params pure dict, rest pure dict | None)` of an nnx module."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.to_pure_dict(rest)
    return graphdef, nnx.to_pure_dict(params), (rest if jax.tree.leaves(rest) else None)


def param_shardings(mesh: Mesh, model: nnx.Module) -> dict:
    """NamedShardings (pure dict) for the model's params from their logical axis names."""
    return nnx.to_pure_dict(shd.state_shardings(nnx.state(model, nnx.Param), mesh))


def init_projections(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, jax.Array]:
    """P `[H_s, H_t]` initialised near identity (square) or N(0, 1/H_s) otherwise."""
    out = {}
    for i, (name, (hs, ht)) in enumerate(sorted(shapes.items())):
        r = np.random.default_rng([seed, i])
        p = r.normal(0.0, hs ** -0.5, (hs, ht)).astype(np.float32)
        if hs == ht:
            p = np.eye(hs, dtype=np.float32) + 0.01 * p
        out[name] = jnp.asarray(p)
    return out


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, mesh: Mesh,
                       seed: int, projections: dict[str, tuple[int, int]] | None = None
                       ) -> TrainState:
    """A fresh, sharded TrainState for `model` (params kept in f32 as master weights)."""
    graphdef, params, rest = split_model(model)
    model_sh = param_shardings(mesh, model)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Copies: the state is donated to the step, and the caller's model keeps its arrays.
    params = {"model": jax.device_put(_to_f32(params), model_sh),
              "proj": jax.device_put(init_projections(projections or {}, seed), replicated)}
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
    def zero():  # distinct buffers: the whole state is donated to the step
        return jax.device_put(jnp.zeros((), jnp.int32), replicated)

    return TrainState(step=zero(), params=params, opt_state=opt_state,
                      rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
                      nonfinite=zero(), nonfinite_total=zero(),
                      rest=None if rest is None else jax.device_put(rest, replicated),
                      graphdef=graphdef)


def opt_state_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
    """Optimizer-state shardings: per-param moments follow their param, the rest replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, params)
    params_sh = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(tx, lambda _, sh: sh, abstract, params_sh,
                                 transform_non_params=lambda _: replicated)


def _to_f32(tree):
    """f32 copies of floating leaves (new buffers, never aliases of the inputs)."""
    return jax.tree.map(lambda x: jnp.array(
        x, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, copy=True), tree)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """The sharding of every leaf of a placed state (scalars and the like replicated)."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        sh = getattr(x, "sharding", None)
        return sh if isinstance(sh, NamedSharding) and sh.mesh == mesh else replicated

    return jax.tree.map(one, state)
