"""The real train / eval / precompute steps of a config, lowered on abstract inputs.

Each builder calls the same constructors `kdjax train` and `kdjax precompute` call
(`make_train_step`, the eval's `_jitted_eval`, `teacher.step.build_step`) and returns a
`Lowered` step: the `jax.stages.Lowered` plus the per-device bytes of each input group and
the step's model FLOPs. Lowering runs under `jax.set_mesh(mesh)` and
`kdjax.platform.target(mesh)`, so an ahead-of-time compile for a TPU takes the TPU path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from kdjax import platform
from kdjax.compile import abstract as ab
from kdjax.compile.flops import StepFlops, step_flops


@dataclasses.dataclass
class Lowered:
    """A lowered step and what it holds.

    Attributes:
      name: "train" | "eval" | "precompute".
      lowered: the `jax.stages.Lowered`.
      mesh: the mesh it was lowered for.
      inputs: {group: per-device bytes} of the arguments (params, opt_state, batch, …).
      flops: model FLOPs of one step (global).
      notes: where shapes came from (built-in architecture, synthetic store, …).
      args: the abstract arguments it was lowered with (to run it: benchmarks/scale.py).
    """

    name: str
    lowered: Any
    mesh: Any
    inputs: dict[str, int]
    flops: StepFlops
    notes: list[str]
    args: tuple = ()


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (or arrays); an
    array without a sharding counts whole."""
    total = 0
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return int(total)


@dataclasses.dataclass
class Plan:
    """Everything the builders share, resolved once from the config and the devices."""

    config: Any
    devices: list
    mesh: Any
    seq_len: int
    student: ab.AbstractModel
    teacher: ab.AbstractModel | None  # the online teacher of the train/eval steps
    manifest: dict | None
    precompute: Any  # PrecomputeConfig
    notes: list[str]


def _lower(mesh, fn, *args):
    with jax.set_mesh(mesh), platform.target(mesh):
        return fn.lower(*args)


def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def train_step(plan: Plan) -> Lowered:
    """The jitted step of `make_train_step`, exactly as `kdjax.train.loop.setup` builds it."""
    from kdjax.train.state import TrainState, opt_state_shardings
    from kdjax.train.step import make_train_step

    config, mesh, student, teacher = plan.config, plan.mesh, plan.student, plan.teacher
    objective = config.objective.build(config.teacher_source, config.steps, plan.manifest)
    tx = config.optimizer.build(config.steps)
    width = (teacher.config.hidden_size if teacher else (plan.manifest or {}).get(
        "hidden_size") or 0)
    proj = objective.projection_shapes(student.config.hidden_size, int(width))
    params = {"model": student.params,
              "proj": {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=_replicated(mesh))
                       for k, s in proj.items()}}
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             opt_abstract, opt_state_shardings(tx, params, mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=_replicated(mesh))
    state = TrainState(step=scalar, params=params, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=_replicated(mesh)),
                       nonfinite=scalar, nonfinite_total=scalar, rest=student.rest,
                       graphdef=student.graphdef)
    rows = config.global_batch_size
    batch = ab.token_batch(rows, plan.seq_len, mesh)
    if plan.manifest is not None and teacher is None:
        batch.update(ab.teacher_batch(plan.manifest, rows, mesh))
    t = (teacher.graphdef, teacher.params, teacher.rest) if teacher else None
    step = make_train_step(objective, tx, state=state, mesh=mesh,
                           batch_sharding=ab.batch_sharding(mesh),
                           micro_batches=config.micro_batches,
                           lr_schedule=config.optimizer.schedule(config.steps),
                           teacher=t)
    t_args = (t[1], t[2]) if t else (None, None)
    lowered = _lower(mesh, step.jitted, state, batch, t_args)
    inputs = {"params": device_bytes(params), "opt_state": device_bytes(opt_state),
              "batch": device_bytes(batch)}
    if teacher:
        inputs["teacher_params"] = device_bytes(t_args)
    flops = step_flops("train", tokens=rows * plan.seq_len, seq_len=plan.seq_len,
                       student=student.config, teacher=teacher.config if teacher else None)
    return Lowered("train", lowered, mesh, inputs, flops, list(plan.notes),
                   (state, batch, t_args))


def eval_step(plan: Plan) -> Lowered:
    """The jitted eval of `kdjax.train.evaluate.make_eval_fn` on one eval batch."""
    from kdjax.train import evaluate as ev

    config, mesh, student, teacher = plan.config, plan.mesh, plan.student, plan.teacher
    eval_store = plan.manifest if config.store.eval_path and teacher is None else None
    t = (teacher.graphdef, teacher.params, teacher.rest) if teacher else None
    jitted = ev.make_eval_fn(student.graphdef, mesh, teacher=t, store_manifest=eval_store).jitted
    rows = config.eval.batch_size or config.global_batch_size
    batch = ab.token_batch(rows, plan.seq_len, mesh)
    if eval_store is not None:
        batch.update(ab.teacher_batch(eval_store, rows, mesh))
    t_args = (teacher.params, teacher.rest) if teacher else (None, None)
    lowered = _lower(mesh, jitted, student.params, student.rest, batch, t_args)
    inputs = {"params": device_bytes(student.params), "batch": device_bytes(batch)}
    if teacher:
        inputs["teacher_params"] = device_bytes(t_args)
    flops = step_flops("eval", tokens=rows * plan.seq_len, seq_len=plan.seq_len,
                       student=student.config, teacher=teacher.config if teacher else None)
    notes = list(plan.notes)
    if not config.data.eval:
        notes.append("data.eval is not set: `kdjax train` would build no eval step")
    return Lowered("eval", lowered, mesh, inputs, flops, notes,
                   (student.params, student.rest, batch, t_args))


def precompute_step(plan: Plan, teacher_path: str) -> Lowered:
    """The jitted step of `kdjax precompute` (teacher forward → store signal), with the
    precompute settings' dtype, mesh and global batch size."""
    from flax import nnx

    from kdjax.models import Decoder
    from kdjax.sharding import data_parallel_size, make_mesh, state_shardings
    from kdjax.teacher.step import build_step, normalize_layers

    pc = plan.precompute
    cfg, source = ab.decoder_config(teacher_path, dtype=pc.dtype,
                                    param_dtype=pc.teacher_param_dtype)
    mesh = make_mesh(*pc.mesh, devices=plan.devices)
    ways = data_parallel_size(mesh)
    if pc.batch_size % ways:
        raise ValueError(f"precompute batch_size {pc.batch_size} is not divisible by its "
                         f"{ways} data-parallel devices (mesh {tuple(mesh.shape.values())}); "
                         f"pass --precompute batch_size=<a multiple of {ways}>")
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    layers = normalize_layers(pc.hidden_layers, cfg.num_layers)
    sharding = ab.batch_sharding(mesh)
    step, state = build_step(nnx.merge(graphdef, state), pc, sharding, layers)
    rows = pc.batch_size
    ints = jax.ShapeDtypeStruct((rows, plan.seq_len), jnp.int32, sharding=sharding)
    row_ids = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding)
    lowered = _lower(mesh, step, state, ints, ints, ints, row_ids)
    inputs = {"teacher_params": device_bytes(state), "batch": 3 * device_bytes(ints)
              + device_bytes(row_ids)}
    flops = step_flops("precompute", tokens=rows * plan.seq_len, seq_len=plan.seq_len,
                       teacher=cfg)
    notes = [f"teacher {teacher_path}: {source}; dtype {cfg.dtype}, params "
             f"{cfg.param_dtype}; mesh data×fsdp×tensor = {tuple(mesh.shape.values())}"]
    return Lowered("precompute", lowered, mesh, inputs, flops, notes,
                   (state, ints, ints, ints, row_ids))
