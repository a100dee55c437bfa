"""The one place that names mesh axes and maps logical axis names onto them.

Everything else in kdjax speaks logical names (`"batch"`, `"vocab"`, `"embed"`, …);
this table decides which mesh axis, if any, shards each one (MaxText-style rules).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": (DATA, FSDP),
    "length": None,
    "embed": FSDP,
    "vocab": TENSOR,
    "mlp": TENSOR,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "layers": None,
    "norm": None,
    "candidates": None,
    "topk": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, "
                         f"tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into fixed axes of size "
                             f"{known} (data={data}, fsdp={fsdp}, tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} = "
                         f"{int(np.prod(sizes))} devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None],
                    rules: dict[str, str | tuple[str, ...] | None] | None = None,
                    mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec. Mesh axes of size 1 are dropped and
    a mesh axis is used at most once (later uses become replicated). With `shape` (and a
    mesh), a mesh axis that does not divide its array dimension is dropped too, e.g. 2
    kv heads on a 4-way tensor axis stay replicated rather than failing."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
        target = rules[name]
        axes = () if target is None else (target,) if isinstance(target, str) else target
        keep = tuple(a for a in axes if a not in used
                     and (mesh is None or mesh.shape.get(a, 1) > 1))
        if shape is not None and mesh is not None:
            size, divisible = shape[dim], []
            for a in keep:  # greedily keep the mesh axes whose product divides the dim
                if size % (mesh.shape[a] * int(np.prod([mesh.shape[b] for b in divisible]))
                           ) == 0:
                    divisible.append(a)
            keep = tuple(divisible)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                   shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh=mesh, shape=shape))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch axis is split (data × fsdp)."""
    return int(mesh.shape[DATA] * mesh.shape[FSDP])


def fused_loss_axes(mesh: Mesh, hidden_size: int, vocab_size: int) -> dict:
    """Mesh axes for `kdjax.losses.sharded_fused_distill` / `fused_sequence_logprobs`.

    Tokens split over the axes of "batch" (each device keeps its own), the vocabulary over
    the axis of "vocab" when it divides V, and the lm_head gradient reduce-scattered over
    the axis of "embed" when that is a batch axis dividing H (FSDP: the gradient lands in
    the lm_head's own row sharding). Size-1 axes are left out.
    """
    def axes(logical):
        target = LOGICAL_RULES[logical]
        names = () if target is None else (target,) if isinstance(target, str) else target
        return tuple(a for a in names if mesh.shape.get(a, 1) > 1)

    data = axes("batch")
    vocab = [a for a in axes("vocab") if vocab_size % mesh.shape[a] == 0][:1]
    scatter = [a for a in axes("embed") if a in data and hidden_size % mesh.shape[a] == 0][:1]
    return dict(data_axis=data or None, vocab_axis=vocab[0] if vocab else None,
                grad_scatter_axis=scatter[0] if scatter else None)


def current_mesh():
    """The mesh set by `jax.set_mesh`/`jax.sharding.use_mesh` (abstract inside jit), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` of an activation by logical names, under the current mesh.

    Without a mesh in context (plain CPU runs, tests) this is the identity, so models
    run unchanged on one device.
    """
    mesh = current_mesh()
    if mesh is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} "
                         f"for an array of shape {x.shape}")
    # with the shape, an axis that does not divide its dimension (2 kv heads on a 4-way
    # tensor axis) stays replicated instead of padding unevenly, which gathers the batch
    return jax.lax.with_sharding_constraint(
        x, logical_to_spec(logical_axes, mesh=mesh, shape=x.shape))


def variable_logical_axes(variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on an nnx Variable (`out_sharding` metadata)."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding") or meta.get("sharding_names")
    return None if names is None else tuple(names)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx State (or any pytree of nnx Variables) from each
    variable's logical axes; variables without names are replicated."""
    from flax import nnx

    def one(variable):
        axes = variable_logical_axes(variable)
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        if axes is None:
            axes = (None,) * len(value.shape)
        return variable.replace(named_sharding(mesh, axes, value.shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model, mesh: Mesh):
    """Moves an nnx model's parameters onto `mesh` following their logical axes (in place)."""
    from flax import nnx

    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model
